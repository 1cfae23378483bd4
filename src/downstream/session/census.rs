//! On a single endpoint, PUBLISH, SPUBLISH and the PUBSUB counts reach the
//! server as they are and its reply counts the hub once for all the local
//! clients it carries: the reply is made what one Redis would answer
//! ([`crate::upstream::pubsub::count`]) before the client gets it. On a
//! cluster the dispatcher does this itself (`upstream/cluster/dispatch`).
//! Inside MULTI the counts in EXEC's reply are the server's (README).

use super::*;
use crate::upstream::pubsub::count::{Fix, Question};

/// Counting commands queued in a transaction, by position in EXEC's array.
pub(super) type Queued = Vec<(usize, Question)>;

impl Session {
    /// The counting command `frame` is, if its reply is the session's to
    /// make whole (not on a cluster, not queued in a transaction).
    pub(super) fn census_question(&self, frame: &[u8], cmd: &scan::Command) -> Option<Question> {
        if self.st.in_multi {
            return None;
        }
        self.counting(frame, cmd)
    }

    /// The counting command `frame` is, unless on a cluster.
    pub(super) fn counting(&self, frame: &[u8], cmd: &scan::Command) -> Option<Question> {
        let name = cmd.arg(frame, 0)?;
        let counting = [&b"PUBLISH"[..], b"SPUBLISH", b"PUBSUB"]
            .iter()
            .any(|n| name.eq_ignore_ascii_case(n));
        if !counting || self.ctx.pool.cluster_active() {
            return None;
        }
        Question::parse(&scan::args_of(frame, cmd))
    }

    /// Make the reply just queued (the last one owed, for `count` commands)
    /// one Redis's where `fixes` say.
    pub(super) fn census_reply(&mut self, count: usize, fixes: Vec<Fix>) {
        if fixes.is_empty() {
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
                Ok(Ok(b)) if !pool.cluster_active() => Ok(hub.census_batch(b, count, fixes).await),
                Ok(r) => r,
                Err(_) => Err(connection_ended()),
            };
            let _ = tx.send(r);
        });
    }

    /// [`Self::census_reply`] for one command sent alone; inside MULTI,
    /// where its count will be in EXEC's reply (at `queued`, the position
    /// it is queued at).
    pub(super) fn census_one(&mut self, frame: &[u8], queued: usize) {
        let Ok(Some(cmd)) = CommandScanner::new(self.ctx.limits).scan(frame) else {
            return;
        };
        let Some(question) = self.counting(frame, &cmd) else {
            return;
        };
        if self.st.in_multi {
            self.st.tx.census.push((queued, question));
        } else {
            let fix = Fix {
                at: 0,
                element: None,
                question,
            };
            self.census_reply(1, vec![fix]);
        }
    }

    /// EXEC's reply (just queued, or `reply` when given) with the counts of
    /// the transaction's counting commands made one Redis's.
    pub(super) async fn census_exec(
        &mut self,
        census: Vec<(usize, Question)>,
        reply: Option<Bytes>,
    ) -> Option<Bytes> {
        let fixes: Vec<Fix> = census
            .into_iter()
            .map(|(i, question)| Fix {
                at: 0,
                element: Some(i),
                question,
            })
            .collect();
        match reply {
            Some(b) if !fixes.is_empty() => Some(self.ctx.hub.census_batch(b, 1, fixes).await),
            Some(b) => Some(b),
            None => {
                self.census_reply(1, fixes);
                None
            }
        }
    }
}
