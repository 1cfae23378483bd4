//! The handle a client holds on its own upstream connection, and where that
//! connection stands on the server.

use crate::resp::Proto;
use crate::upstream::conn::Request;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A client's own upstream connection; dropping it closes the connection.
pub struct Pinned {
    pub tx: mpsc::Sender<Request>,
    /// Expiry (Unix seconds, 0 = never) of the credential this connection is
    /// authenticated with right now: blocking commands are capped at it.
    pub expiry: Arc<AtomicU64>,
    /// Cancelled when the connection failed: the client's state on it is gone.
    pub lost: CancellationToken,
    /// Cancel to close the connection at once, with whatever is in flight
    /// (a blocked wait whose client left).
    pub abort: CancellationToken,
    /// Set by the client before it lets go of the connection when nothing
    /// of its state is on it (no MULTI, WATCH, other database or client
    /// mode: see the session's `needs_pin`); the pool then keeps it warm
    /// without `RESET`. Unset: reset first (a client gone in the middle of
    /// anything).
    pub clean: Arc<AtomicBool>,
    /// The protocol it was handed out speaking, which the pool keeps it warm
    /// under: a connection that switched with its client (`HELLO` while it
    /// held the client's state) is not clean for that set.
    pub proto: Proto,
    /// The server connection it stands on now (what `CLIENT UNBLOCK` names);
    /// a cluster's virtual pinned connection changes it as it binds.
    pub server: ServerRef,
    /// Its push frames come with a mark before each reply (see
    /// [`crate::upstream::conn::PushSink::marks`]).
    pub marks: bool,
}

/// A server-side connection: its `CLIENT ID`, and the cluster node it is on
/// (`None`: the configured host).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConn {
    pub id: u64,
    pub node: Option<crate::upstream::topology::Node>,
}

/// Where a pinned connection stands now (`None`: unknown, or not bound yet).
#[derive(Debug, Clone, Default)]
pub struct ServerRef(pub Arc<std::sync::Mutex<Option<ServerConn>>>);

impl ServerRef {
    pub fn new(conn: Option<ServerConn>) -> ServerRef {
        ServerRef(Arc::new(std::sync::Mutex::new(conn)))
    }

    pub fn get(&self) -> Option<ServerConn> {
        self.0.lock().expect("not poisoned").clone()
    }

    pub fn set(&self, conn: Option<ServerConn>) {
        *self.0.lock().expect("not poisoned") = conn;
    }
}

/// The same place (shown states compare by it).
impl PartialEq for ServerRef {
    fn eq(&self, other: &ServerRef) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for ServerRef {}
