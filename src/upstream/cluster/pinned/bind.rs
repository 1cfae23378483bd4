//! Binding a client's virtual dedicated connection to a real one on the node
//! of its keys: waiting for a new owner when the node cannot be reached,
//! giving up a dial the slot map has moved past, and keeping the connections
//! of a client mode.

use super::{Bound, Virtual};
use crate::upstream::conn::PushSink;
use crate::upstream::pool::{Pinned, ServerConn};
use crate::upstream::topology::Node;
use crate::upstream::UpstreamError;
use bytes::BytesMut;
use tokio_util::sync::CancellationToken;

impl Virtual {
    /// [`bind`](Self::bind); when the node of `slot` cannot be reached,
    /// wait (bounded, as the shared path does) for the cluster to name a
    /// new owner and bind there.
    pub(super) async fn bind_held(
        &mut self,
        mut node: Node,
        slot: Option<u16>,
    ) -> Result<(), (UpstreamError, Node)> {
        use crate::upstream::cluster::dispatch::NODE_DOWN_HOLD;
        let start = tokio::time::Instant::now();
        let mut attempt = 0u32;
        let mut moves = 0;
        loop {
            let dialled = match slot {
                Some(s) if moves < crate::upstream::cluster::dispatch::MAX_REDIRECTS => {
                    self.dial_unless_moved(&node, s).await
                }
                _ => Ok(self.dial(&node).await),
            };
            let bound = match dialled {
                Err(to) => {
                    moves += 1;
                    node = to;
                    continue;
                }
                Ok(Ok(pin)) => self.attach(node.clone(), pin).await,
                Ok(Err(e)) => Err(e),
            };
            match bound {
                Ok(()) => return Ok(()),
                Err(e)
                    if slot.is_some()
                        && crate::upstream::cluster::node_unreachable(&e)
                        && start.elapsed() < NODE_DOWN_HOLD =>
                {
                    attempt += 1;
                    self.cluster.stale();
                    let until = (tokio::time::Instant::now()
                        + crate::upstream::conn::backoff(attempt + 2))
                    .min(start + NODE_DOWN_HOLD);
                    loop {
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        let now = self.cluster.node_for(slot, self.spread);
                        if now.as_ref().is_some_and(|n| *n != node) {
                            node = now.expect("checked");
                            break;
                        }
                        if tokio::time::Instant::now() >= until {
                            break;
                        }
                    }
                }
                Err(e) => return Err((e, node)),
            }
        }
    }

    pub(super) async fn bind(&mut self, node: Node) -> Result<(), UpstreamError> {
        let pin = self.dial(&node).await?;
        self.attach(node, pin).await
    }

    /// A dedicated connection on `node` (a warm one, or dialled).
    pub(super) async fn dial(&self, node: &Node) -> Result<Pinned, UpstreamError> {
        // Unmarked: this task answers some commands itself and sends
        // others in several parts, so replies and marks would not pair.
        let push = PushSink::new(self.push.clone());
        self.cluster.node_pool(node).pin(self.proto, push).await
    }

    /// [`dial`](Self::dial) for a command of `slot`, given up (`Err`: the
    /// new owner) when the map names another owner of the slot: a frozen
    /// node accepts TCP and never answers the TLS handshake, so its dial
    /// would otherwise run to `upstream.connect_timeout` while its replica
    /// is promoted. Counted in `cluster_dials_abandoned`.
    ///
    /// # Cancel safety
    /// The dial dropped drops its half-made connection; nothing else is held.
    pub(super) async fn dial_unless_moved(
        &self,
        node: &Node,
        slot: u16,
    ) -> Result<Result<Pinned, UpstreamError>, Node> {
        let cluster = &self.cluster;
        let moved = async {
            // A dial that is not done in half a second asks for the map
            // (a healthy one is long done), then every second.
            for polls in 1u32.. {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                if polls % 20 == 10 {
                    cluster.stale();
                }
                if let Some(to) = cluster.node_for(Some(slot), 0).filter(|n| n != node) {
                    return to;
                }
            }
            unreachable!("an unbounded count")
        };
        tokio::select! {
            r = self.dial(node) => Ok(r),
            to = moved => {
                cluster.metrics.cluster_dials_abandoned.inc();
                tracing::info!(from = %node, to = %to, slot, "dedicated connection's dial given up: the cluster names another owner of its slot");
                Err(to)
            }
        }
    }

    /// Bind to `pin` on `node`, sending a transaction's queued start first.
    pub(super) async fn attach(&mut self, node: Node, pin: Pinned) -> Result<(), UpstreamError> {
        // While bound, an abort of this one closes that connection. The task
        // holds no sender of it: dropping the binding lets it go back.
        let released = CancellationToken::new();
        let (abort, real, done) = (self.abort.clone(), pin.abort.clone(), released.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = abort.cancelled() => real.cancel(),
                _ = done.cancelled() => {}
            }
        });
        self.stand_on(Bound {
            node,
            pin,
            asking: false,
            _released: released.drop_guard(),
        });
        if !self.queued.is_empty() {
            let queued = std::mem::take(&mut self.queued);
            let mut bytes = BytesMut::new();
            for q in &queued {
                bytes.extend_from_slice(q);
            }
            // Their replies (+OK, +QUEUED) were given already. If they did
            // not get through, neither does the command that needed the
            // binding (the transaction fails, EXEC discards it): sent on, it
            // would run outside any transaction. Kept for the next binding.
            let n = queued.len();
            if let Err(e) = self.request(bytes.freeze(), n, true).await {
                self.bound = None;
                self.queued = queued;
                return Err(e);
            }
        }
        Ok(())
    }

    /// Bind to `b`, and say which server connection that is (CLIENT UNBLOCK).
    pub(super) fn stand_on(&mut self, mut b: Bound) {
        self.was_on = Some(b.node.clone());
        b.asking = self.ask_at.as_ref() == Some(&b.node);
        self.server.set(b.pin.server.get().map(|s| ServerConn {
            id: s.id,
            node: Some(b.node.clone()),
        }));
        self.bound = Some(b);
    }

    /// The transaction is over: its connection goes back to its node now,
    /// not when the client next needs one (as a new MULTI would anyway).
    pub(super) fn release(&mut self) {
        if !self.held() {
            self.bound = None;
        }
    }

    /// Leave the bound connection: kept for later in a client mode (its
    /// mode stays on it), released otherwise.
    pub(super) fn unbind(&mut self) {
        if let Some(b) = self.bound.take() {
            if self.sticky && !b.pin.lost.is_cancelled() {
                self.parked.push(b);
            }
        }
    }
}
