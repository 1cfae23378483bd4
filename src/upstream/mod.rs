//! The server side: TLS connections to Azure Redis that the proxy authenticates
//! itself.
//!
//! - [`tls`]: dial, TLS handshake (SNI, verification), `HELLO <proto> AUTH`.
//! - [`conn`]: one connection as a task: pipelined writes, FIFO reply matching,
//!   re-AUTH on every new credential, keepalive.
//! - [`pool`]: shared multiplexed connections per protocol and warm connections
//!   for clients that need their own (pinned).
//! - [`pubsub`]: the pub/sub hub, one RESP3 connection carrying every client's
//!   subscriptions, each channel subscribed once however many clients share it.

pub mod cluster;
pub mod conn;
pub mod maintenance;
pub mod pinned_hold;
pub mod policy;
pub mod pool;
pub mod pubsub;
pub mod tls;
pub mod topology;

/// What went wrong on the upstream side. The `Display` text is what the client
/// sees after `-ERR ` (or `-NOAUTH `, etc.): it names the cause, never a secret.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream {addr}: connect failed: {reason}")]
    Connect { addr: String, reason: String },
    #[error("upstream {addr}: TLS handshake failed: {reason}")]
    Tls { addr: String, reason: String },
    #[error("upstream {addr}: authentication failed: {reason}")]
    Auth { addr: String, reason: String },
    #[error("upstream {addr}: no credential yet: {reason}")]
    NoCredential { addr: String, reason: String },
    #[error("upstream {addr}: timed out after {secs:.1}s while {during}")]
    Timeout {
        addr: String,
        secs: f64,
        during: &'static str,
    },
    /// The connection dropped after the command was written: it may or may not
    /// have run, so it is not sent again.
    #[error("upstream connection lost with the command in flight ({reason}); it may or may not have been executed")]
    Lost { reason: String },
    /// The connection closed before the command was written to it: the
    /// command did not run, and may go to whichever node serves it next.
    #[error("upstream {addr}: the connection closed before the command was sent ({reason}); it did not run")]
    Closed { addr: String, reason: String },
    #[error("upstream sent invalid data: {0}")]
    Protocol(String),
    #[error("proxy is shutting down")]
    Shutdown,
}

impl UpstreamError {
    /// The error reply a client gets for this failure.
    pub fn to_reply(&self) -> bytes::Bytes {
        crate::resp::error(&format!("ERR {self}"))
    }
}
