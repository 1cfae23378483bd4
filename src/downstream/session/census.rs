//! On a single endpoint, PUBLISH, SPUBLISH and the PUBSUB counts reach the
//! server as they are and its reply counts the hub once for all the local
//! clients it carries: the reply is made what one Redis would answer
//! ([`crate::upstream::pubsub::count`]) before the client gets it. On a
//! cluster the dispatcher does this itself (`upstream/cluster/dispatch`).
//! Inside MULTI the counts in EXEC's reply are the server's (README).

use super::*;
use crate::upstream::pubsub::count::Question;

impl Session {
    /// The counting command `frame` is, if its reply is the session's to
    /// make whole (not on a cluster, not queued in a transaction).
    pub(super) fn census_question(&self, frame: &[u8], cmd: &scan::Command) -> Option<Question> {
        let name = cmd.arg(frame, 0)?;
        let counting = [&b"PUBLISH"[..], b"SPUBLISH", b"PUBSUB"]
            .iter()
            .any(|n| name.eq_ignore_ascii_case(n));
        if !counting || self.st.in_multi || self.ctx.pool.cluster_active() {
            return None;
        }
        Question::parse(&scan::args_of(frame, cmd))
    }

    /// Make the reply just queued (the last one owed, for `count` commands)
    /// one Redis's at the positions of `questions`.
    pub(super) fn census_reply(&mut self, count: usize, questions: Vec<(usize, Question)>) {
        if questions.is_empty() {
            return;
        }
        let Some(Out::Wait { rx, .. }) = self.client.owed.back_mut() else {
            return;
        };
        let (tx, fixed) = oneshot::channel();
        let server = std::mem::replace(rx, fixed);
        let hub = self.ctx.hub.clone();
        let pool = self.ctx.pool.clone();
        tokio::spawn(async move {
            let r = match server.await {
                // Undecided when sent, a cluster now: the dispatcher made it whole.
                Ok(Ok(b)) if !pool.cluster_active() => {
                    Ok(hub.census_batch(b, count, questions).await)
                }
                Ok(r) => r,
                Err(_) => Err(connection_ended()),
            };
            let _ = tx.send(r);
        });
    }

    /// [`Self::census_reply`] for one command sent alone.
    pub(super) fn census_one(&mut self, frame: &[u8]) {
        let Ok(Some(cmd)) = CommandScanner::new(self.ctx.limits).scan(frame) else {
            return;
        };
        if let Some(q) = self.census_question(frame, &cmd) {
            self.census_reply(1, vec![(0, q)]);
        }
    }
}
