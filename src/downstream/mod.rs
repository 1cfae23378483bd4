//! The client side: listeners (TCP, optional Unix socket) and one
//! [`session`] per client connection.

pub mod clients;
pub mod face;
mod in_place;
mod replies;
pub mod session;

use crate::metrics::Metrics;
use session::Context;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

/// Counts live clients and refuses those past `listen.max_clients`.
pub struct Admission {
    current: AtomicUsize,
    max: usize,
}

impl Admission {
    pub fn new(max: usize) -> Self {
        Admission {
            current: AtomicUsize::new(0),
            max,
        }
    }
}

struct Ticket<'a>(&'a Admission, Arc<Metrics>);

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.0.current.fetch_sub(1, Ordering::AcqRel);
        self.1.clients_current.dec();
    }
}

/// One listener: TCP or Unix.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// Accept clients until `stop_accepting` fires; each session runs until it ends
/// drains when `drain` fires. Sessions are tracked in `tracker` so the caller can
/// wait for them to drain.
pub async fn serve(
    listener: Listener,
    ctx: Arc<Context>,
    admission: Arc<Admission>,
    tracker: TaskTracker,
    stop_accepting: CancellationToken,
    drain: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            a = accept(&listener) => a,
            _ = stop_accepting.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: say so and keep going after a breath.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let metrics = ctx.metrics.clone();
        metrics.clients_total.inc();
        if admission.current.fetch_add(1, Ordering::AcqRel) >= admission.max {
            admission.current.fetch_sub(1, Ordering::AcqRel);
            metrics.clients_rejected.inc();
            let max = admission.max;
            tracker.spawn(async move {
                let mut s = stream;
                let msg =
                    format!("-ERR max number of clients reached (listen.max_clients = {max})\r\n");
                let _ = s.write_all(msg.as_bytes()).await;
            });
            continue;
        }
        metrics.clients_current.inc();
        let ctx = ctx.clone();
        let admission = admission.clone();
        let drain = drain.clone();
        tracker.spawn(in_place::InPlace::new(async move {
            let _ticket = Ticket(&admission, metrics);
            match stream {
                ClientStream::Tcp(s) => {
                    let local = s.local_addr().ok();
                    session::run(s, peer, local, ctx, drain).await
                }
                ClientStream::Unix(s) => session::run(s, peer, None, ctx, drain).await,
            }
        }));
    }
    info!("listener closed");
}

enum ClientStream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

impl ClientStream {
    async fn write_all(&mut self, b: &[u8]) -> std::io::Result<()> {
        match self {
            ClientStream::Tcp(s) => s.write_all(b).await,
            ClientStream::Unix(s) => s.write_all(b).await,
        }
    }
}

/// Where a client connected from; formatted only when shown (logs, CLIENT
/// INFO), not for every connection.
#[derive(Debug, Clone, Copy)]
pub enum Peer {
    Tcp(std::net::SocketAddr),
    Unix,
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Tcp(a) => a.fmt(f),
            Peer::Unix => f.write_str("unix"),
        }
    }
}

async fn accept(l: &Listener) -> std::io::Result<(ClientStream, Peer)> {
    match l {
        Listener::Tcp(l) => {
            let (s, a) = l.accept().await?;
            let _ = s.set_nodelay(true);
            Ok((ClientStream::Tcp(s), Peer::Tcp(a)))
        }
        Listener::Unix(l) => {
            let (s, _) = l.accept().await?;
            Ok((ClientStream::Unix(s), Peer::Unix))
        }
    }
}
