//! Wiring: config -> credential source -> upstream connector and pool ->
//! listeners -> sessions. [`start`] binds everything and returns at once, so
//! `main` and tests drive the same code; [`Running::shutdown`] drains.

use crate::admin::{self, AdminState, Health};
use crate::auth::{self, TokenWatch};
use crate::config::Config;
use crate::downstream::session::Context;
use crate::downstream::{self, Admission, Listener};
use crate::metrics::Metrics;
use crate::resp::scan::Limits;
use crate::upstream::pool::Pool;
use crate::upstream::pubsub::Hub;
use crate::upstream::tls::Connector;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

/// The proxy could not start. Says which setting to look at.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {what} ({key}): {source}")]
    Bind {
        what: String,
        key: &'static str,
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(String),
}

/// A started proxy.
pub struct Running {
    pub tcp_addr: SocketAddr,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub tokens: TokenWatch,
    pub admin_addr: Option<SocketAddr>,
    /// Cancelled by `/quitquitquit` (and by main on a signal): time to drain.
    pub stop: CancellationToken,
    min_delay: Duration,
    admin_shutdown: CancellationToken,
    admin_task: Option<tokio::task::JoinHandle<()>>,
    tracker: TaskTracker,
    stop_accepting: CancellationToken,
    /// Cancels sessions and upstream connections.
    shutdown: CancellationToken,
    unix_path: Option<std::path::PathBuf>,
}

/// Bind the listeners, start the credential source and the upstream pool.
pub async fn start(cfg: &Config) -> Result<Running, StartError> {
    let shutdown = CancellationToken::new();
    let metrics = Arc::new(Metrics::new());
    let tokens = auth::start(&cfg.auth, metrics.clone(), shutdown.clone())
        .map_err(|e| StartError::Config(e.to_string()))?;
    let connector = Arc::new(Connector::new(cfg, tokens.clone()).map_err(StartError::Config)?);
    let addr = cfg
        .listen_addr()
        .map_err(|e| StartError::Config(e.to_string()))?;
    let tcp = TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind {
            what: addr.to_string(),
            key: "listen.address",
            source,
        })?;
    let tcp_addr = tcp.local_addr().map_err(|source| StartError::Bind {
        what: addr.to_string(),
        key: "listen.address",
        source,
    })?;
    let unix = match &cfg.listen.unix_socket {
        Some(path) => {
            // A stale socket file from a previous run would make bind fail.
            if std::fs::symlink_metadata(path).is_ok_and(|m| {
                use std::os::unix::fs::FileTypeExt;
                m.file_type().is_socket()
            }) {
                let _ = std::fs::remove_file(path);
            }
            Some(UnixListener::bind(path).map_err(|source| StartError::Bind {
                what: path.display().to_string(),
                key: "listen.unix_socket",
                source,
            })?)
        }
        None => None,
    };
    let health = Arc::new(Health::new(tokens.clone()));
    let stop = CancellationToken::new();
    let admin_shutdown = CancellationToken::new();
    let mut admin_task = None;
    let admin_addr = if cfg.admin.enabled {
        let l = TcpListener::bind(cfg.admin.address)
            .await
            .map_err(|source| StartError::Bind {
                what: cfg.admin.address.to_string(),
                key: "admin.address",
                source,
            })?;
        let a = l.local_addr().ok();
        let state = AdminState {
            health: health.clone(),
            metrics: metrics.clone(),
            quit: stop.clone(),
        };
        let admin_stop = admin_shutdown.clone();
        admin_task = Some(tokio::spawn(async move {
            if let Err(e) = admin::serve(l, state, admin_stop).await {
                warn!(error = %e, "admin server stopped");
            }
        }));
        a
    } else {
        None
    };
    let hub = Hub::start(
        cfg,
        connector.clone(),
        metrics.clone(),
        health.clone(),
        shutdown.clone(),
    );
    let pool = Pool::new(
        cfg,
        connector.clone(),
        metrics.clone(),
        health.clone(),
        shutdown.clone(),
    );
    // A clustered cache: the cluster layer takes the pool's clients over.
    crate::upstream::cluster::Cluster::start(
        cfg,
        connector,
        pool.clone(),
        metrics.clone(),
        health.clone(),
        shutdown.clone(),
    );
    let ctx = Arc::new(Context {
        pool,
        hub,
        metrics: metrics.clone(),
        limits: Limits::from(&cfg.limits),
        max_buffered_bytes: cfg.limits.max_buffered_bytes,
        max_push_bytes: cfg.limits.max_pubsub_queued_bytes,
        password: cfg.listen.password.clone(),
        next_id: AtomicU64::new(1),
        clients: Default::default(),
        laddr: cfg.listen.address.as_str().into(),
    });
    let admission = Arc::new(Admission::new(cfg.listen.max_clients));
    let tracker = TaskTracker::new();
    let stop_accepting = CancellationToken::new();
    tokio::spawn(downstream::serve(
        Listener::Tcp(tcp),
        ctx.clone(),
        admission.clone(),
        tracker.clone(),
        stop_accepting.clone(),
        // Sessions drain when the listener closes: replies to commands
        // already read are written, then the client is closed.
        stop_accepting.clone(),
    ));
    if let Some(u) = unix {
        tokio::spawn(downstream::serve(
            Listener::Unix(u),
            ctx,
            admission,
            tracker.clone(),
            stop_accepting.clone(),
            stop_accepting.clone(),
        ));
    }
    health.set_listening();
    info!(
        listen = %tcp_addr,
        admin = ?admin_addr,
        unix_socket = ?cfg.listen.unix_socket,
        upstream = %format!("{}:{}", cfg.upstream.host, cfg.upstream.port),
        tls_name = cfg.tls_server_name(),
        auth_source = ?cfg.auth.source,
        "redis-entra-proxy listening"
    );
    Ok(Running {
        tcp_addr,
        metrics,
        health,
        tokens,
        admin_addr,
        stop,
        min_delay: cfg.shutdown.min_delay,
        admin_shutdown,
        admin_task,
        tracker,
        stop_accepting,
        shutdown,
        unix_path: cfg.listen.unix_socket.clone(),
    })
}

impl Running {
    /// Readiness false, keep accepting for `shutdown.min_delay`, stop accepting,
    /// let sessions finish within `grace`, then cut the rest.
    pub async fn shutdown(self, grace: Duration) {
        self.health.set_draining();
        crate::shutdown::min_delay(self.min_delay).await;
        self.stop_accepting.cancel();
        self.tracker.close();
        let _ = crate::shutdown::drain(grace, self.tracker.wait()).await;
        self.admin_shutdown.cancel();
        // Answers still being written (the 200 to `/quitquitquit` itself) go out
        // before the process exits.
        if let Some(t) = self.admin_task {
            let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
        }
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(1), self.tracker.wait()).await;
        if let Some(p) = &self.unix_path {
            let _ = std::fs::remove_file(p);
        }
        info!("redis-entra-proxy stopped");
    }
}
