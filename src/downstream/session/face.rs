//! The session's side of the face ([`crate::downstream::face`]): the answer
//! written now, or the command forwarded (INFO, keys in a slot) with its
//! reply passed through the face's rewrite on its way to the client, in its
//! place among the client's replies.

use super::*;
use crate::downstream::face::{self, Answer};

impl Session {
    /// Where this client reached the proxy: the accepted socket's local
    /// address, or for a Unix-socket client the first TCP listener's.
    fn face_addr(&self) -> Option<std::net::SocketAddr> {
        self.local_addr.or(self.ctx.face.tcp)
    }

    fn face_answer(&self, args: &[Bytes]) -> Answer {
        let refs: Vec<&[u8]> = args.iter().map(|a| &a[..]).collect();
        face::answer(&self.ctx.face, &refs, self.face_addr(), self.st.proto)
    }

    /// The reply of a face command queued inside MULTI, at EXEC.
    pub(super) fn face_reply(&self, args: &[Bytes]) -> Bytes {
        match self.face_answer(args) {
            Answer::Reply(b) => b,
            _ => resp::error("ERR internal: a forwarded face command was queued locally"),
        }
    }

    pub(super) async fn face(&mut self, frame: Bytes, args: &[Bytes], since: Instant) -> bool {
        let answer = self.face_answer(args);
        if self.st.in_multi {
            match answer {
                Answer::Reply(_) => {
                    // Queued as Redis queues it; answered in EXEC's array.
                    let at = self.st.tx.queued;
                    self.st.tx.queued += 1;
                    self.st.tx.locals.push((at, Local::Face, args.to_vec()));
                    self.reply(resp::simple("QUEUED")).await;
                }
                // Queued by the server; its reply comes in EXEC's array.
                _ => self.forward_pinned(frame, 1, since).await,
            }
            return true;
        }
        match answer {
            Answer::Reply(b) => self.reply(b).await,
            Answer::Info => {
                if self.st.pinned.is_some() && self.st.needs_pin() {
                    let Some(tx) = self.st.pinned.as_ref().map(|p| p.tx.clone()) else {
                        return true;
                    };
                    self.ctx.metrics.command(Route::Pinned);
                    self.send_mapped(&tx, frame, since, face::rewrite_info)
                        .await;
                } else {
                    self.maybe_unpin().await;
                    self.switch_to(Target::Shared).await;
                    let handle = self.shared_handle();
                    self.ctx.metrics.command(Route::Shared);
                    self.send_mapped(&handle.tx, frame, since, face::rewrite_info)
                        .await;
                }
            }
            Answer::ToSlotOwner(slot) => {
                self.switch_to(Target::Shared).await;
                self.ctx.metrics.command(Route::Shared);
                let owner = self
                    .ctx
                    .pool
                    .slot_owner(slot)
                    .and_then(|n| self.ctx.pool.node_shared(&n, self.st.proto));
                match owner {
                    Some(handle) => self.send_mapped(&handle.tx, frame, since, |b| b).await,
                    None => {
                        let handle = self.shared_handle();
                        self.send_mapped(&handle.tx, frame, since, face::standalone_slot_reply)
                            .await
                    }
                }
            }
        }
        true
    }

    /// Send one command on `tx`; its reply, passed through `map`, is owed to
    /// the client in order (other replies are not held up meanwhile).
    pub(super) async fn send_mapped(
        &mut self,
        tx: &mpsc::Sender<Request>,
        frame: Bytes,
        since: Instant,
        map: fn(Bytes) -> Bytes,
    ) {
        self.same_connection(tx).await;
        let (up_tx, up_rx) = oneshot::channel();
        let req = Request {
            bytes: frame,
            count: 1,
            reply: Some(up_tx),
            in_multi_after: false,
            pushes: 0,
        };
        if let Err(mpsc::error::SendError(req)) = tx.send(req).await {
            if let Some(t) = req.reply {
                let _ = t.send(Err(self.unsent(tx)));
            }
        }
        let (back_tx, back_rx) = oneshot::channel();
        tokio::spawn(async move {
            let r = up_rx.await.unwrap_or_else(|_| Err(connection_ended()));
            let _ = back_tx.send(r.map(map));
        });
        self.client.owed.push_back(Out::Wait {
            rx: back_rx,
            count: 1,
            since,
            silent: self.silent,
            own: None,
            op: self.op,
            marked: false,
        });
        self.client.owed_replies += 1;
        self.client.waits += 1;
    }
}
