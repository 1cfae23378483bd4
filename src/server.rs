//! Wiring: config -> credential source -> upstream connector and pool ->
//! listeners -> sessions. [`start`] binds everything and returns at once, so
//! `main` and tests drive the same code; [`Running::shutdown`] drains.

use crate::admin::{self, AdminState, Health};
use crate::auth::{self, TokenWatch};
use crate::config::{Config, ListenAddrs};
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
use tokio::net::TcpListener;

mod unix_socket;
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
/// The clients' password as SIGHUP re-reads it from `listen.password_file`:
/// clients that authenticate from then on use the new one (those already
/// authenticated stay so, as with Redis's `CONFIG SET requirepass`).
#[derive(Clone)]
pub struct ListenPassword {
    ctx: Arc<Context>,
    file: Option<std::path::PathBuf>,
}

impl ListenPassword {
    pub fn reload(&self) {
        let Some(path) = &self.file else { return };
        match crate::config::read_secret_file("listen.password_file", path) {
            Ok(p) => {
                *self.ctx.password.write().expect("not poisoned") = Some(p);
                tracing::info!("SIGHUP: listen.password_file re-read");
            }
            Err(e) => tracing::error!("SIGHUP: keeping the clients' password: {e}"),
        }
    }
}

pub struct Running {
    /// The first TCP listener's address (127.0.0.1 by default).
    pub tcp_addr: SocketAddr,
    /// Every TCP listener's address (127.0.0.1 and [::1] by default).
    pub tcp_addrs: Vec<SocketAddr>,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub tokens: TokenWatch,
    /// Re-reads `listen.password_file` (SIGHUP).
    pub listen_password: ListenPassword,
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
    /// The socket file we created, removed on exit if still ours.
    unix_socket: Option<unix_socket::OwnedSocket>,
}

/// Bind the listeners, start the credential source and the upstream pool.
pub async fn start(cfg: &Config) -> Result<Running, StartError> {
    let shutdown = CancellationToken::new();
    let metrics = Arc::new(Metrics::new());
    // Before the credential source starts: its first token fetch is a span.
    let otel = start_otel(cfg, &metrics)?;
    let tokens = auth::start(&cfg.auth, metrics.clone(), shutdown.clone())
        .map_err(|e| StartError::Config(e.to_string()))?;
    let connector = Arc::new(
        Connector::new(cfg, tokens.clone())
            .map_err(StartError::Config)?
            .with_acceptance(metrics.acceptance.clone())
            .with_otel(metrics.otel_handle()),
    );
    let addrs = cfg
        .listen_addrs()
        .map_err(|e| StartError::Config(e.to_string()))?;
    let tcp = bind_clients(&addrs).await?;
    let tcp_addrs: Vec<SocketAddr> = tcp.iter().filter_map(|l| l.local_addr().ok()).collect();
    let tcp_addr = tcp_addrs[0];
    let unix = match &cfg.listen.unix_socket {
        Some(path) => Some(unix_socket::bind(path).map_err(|source| StartError::Bind {
            what: path.display().to_string(),
            key: "listen.unix_socket",
            source,
        })?),
        None => None,
    };
    let health = Arc::new(
        Health::new(tokens.clone())
            .with_readiness(cfg.admin.readiness)
            .with_acceptance(metrics.acceptance.clone())
            .with_insecure_tls(cfg.upstream.tls_insecure_skip_verify),
    );
    metrics
        .tls_insecure
        .set(i64::from(cfg.upstream.tls_insecure_skip_verify));
    if let Some(o) = otel {
        spawn_otel(o, health.clone(), metrics.clone(), shutdown.clone());
    }
    let stop = CancellationToken::new();
    let admin_shutdown = CancellationToken::new();
    let mut admin_task = None;
    let admin_addr = if cfg.admin.enabled {
        let l = bind_admin(cfg.admin.address)
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
        hub.clone(),
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
        password: std::sync::RwLock::new(cfg.listen.password.clone()),
        next_id: AtomicU64::new(1),
        clients: Default::default(),
        laddr: cfg.listen.address.as_str().into(),
        face: crate::downstream::face::Face::new(
            cfg.listen.cluster_face,
            &format!("{}:{}", cfg.upstream.host, cfg.upstream.port),
            tcp.first().and_then(|l| l.local_addr().ok()),
        ),
    });
    let admission = Arc::new(Admission::new(cfg.listen.max_clients));
    let tracker = TaskTracker::new();
    let stop_accepting = CancellationToken::new();
    for l in tcp {
        tokio::spawn(downstream::serve(
            Listener::Tcp(l),
            ctx.clone(),
            admission.clone(),
            tracker.clone(),
            stop_accepting.clone(),
            // Sessions drain when the listener closes: replies to commands
            // already read are written, then the client is closed.
            stop_accepting.clone(),
        ));
    }
    let unix_socket = unix.as_ref().map(|(_, owned)| owned.clone());
    if let Some((u, _)) = unix {
        tokio::spawn(downstream::serve(
            Listener::Unix(u),
            ctx.clone(),
            admission,
            tracker.clone(),
            stop_accepting.clone(),
            stop_accepting.clone(),
        ));
    }
    health.set_listening();
    info!(
        listen = ?tcp_addrs,
        admin = ?admin_addr,
        unix_socket = ?cfg.listen.unix_socket,
        upstream = %format!("{}:{}", cfg.upstream.host, cfg.upstream.port),
        tls_name = cfg.tls_server_name(),
        auth_source = ?cfg.auth.source,
        "redis-entra-proxy listening"
    );
    Ok(Running {
        tcp_addr,
        tcp_addrs,
        metrics,
        health,
        tokens,
        listen_password: ListenPassword {
            ctx: ctx.clone(),
            file: cfg.listen.password_file.clone(),
        },
        admin_addr,
        stop,
        min_delay: cfg.shutdown.min_delay,
        admin_shutdown,
        admin_task,
        tracker,
        stop_accepting,
        shutdown,
        unix_socket,
    })
}

/// Bind the client listeners: every required address, and the others where the
/// machine has them. `localhost:0` (tests) puts [::1] on the port 127.0.0.1 got.
async fn bind_clients(addrs: &ListenAddrs) -> Result<Vec<TcpListener>, StartError> {
    let bind_err = |addr: SocketAddr| {
        move |source| StartError::Bind {
            what: addr.to_string(),
            key: "listen.address",
            source,
        }
    };
    let mut listeners = Vec::new();
    for &addr in &addrs.required {
        listeners.push(TcpListener::bind(addr).await.map_err(bind_err(addr))?);
    }
    let first_port = listeners
        .first()
        .and_then(|l| l.local_addr().ok())
        .map(|a| a.port());
    for &addr in &addrs.if_available {
        let mut addr = addr;
        if addr.port() == 0 {
            addr.set_port(first_port.unwrap_or(0));
        }
        match TcpListener::bind(addr).await {
            Ok(l) => listeners.push(l),
            Err(e) if no_such_address(&e) => {
                info!(address = %addr, error = %e, "not listening on {addr}: this machine has no such address")
            }
            Err(e) => return Err(bind_err(addr)(e)),
        }
    }
    Ok(listeners)
}

/// The error of binding an address family or address the machine does not have
/// (IPv6 turned off in a container).
fn no_such_address(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::AddrNotAvailable
        || matches!(e.raw_os_error(), Some(97 /* EAFNOSUPPORT */))
}

/// Bind the admin listener. `[::]:PORT` takes IPv6 and IPv4 (Linux's default
/// dual-stack sockets), and becomes `0.0.0.0:PORT` on a machine without IPv6, so
/// one setting suits IPv4, IPv6 and dual-stack clusters.
async fn bind_admin(addr: SocketAddr) -> std::io::Result<TcpListener> {
    match TcpListener::bind(addr).await {
        Err(e) if addr.ip() == std::net::Ipv6Addr::UNSPECIFIED && no_such_address(&e) => {
            let v4 = SocketAddr::from(([0, 0, 0, 0], addr.port()));
            info!(error = %e, "admin: no IPv6 here; listening on {v4} instead of {addr}");
            TcpListener::bind(v4).await
        }
        other => other,
    }
}

/// Turn OpenTelemetry recording on when `otel.enabled`; the exporter is
/// spawned by [`spawn_otel`] once readiness can be computed.
fn start_otel(cfg: &Config, metrics: &Arc<Metrics>) -> Result<Option<OtelStart>, StartError> {
    let Some(settings) = cfg.otel.settings().map_err(StartError::Config)? else {
        return Ok(None);
    };
    info!(
        metrics = %settings.metrics_url,
        traces = %settings.traces_url,
        interval_secs = settings.metrics_interval.as_secs_f64(),
        sample_ratio = settings.trace_sample_ratio,
        "OpenTelemetry export on (OTLP/HTTP JSON)"
    );
    let (telemetry, spans) = crate::otel::Telemetry::new(settings.trace_sample_ratio);
    let telemetry = Arc::new(telemetry);
    metrics.set_otel(telemetry.clone());
    Ok(Some(OtelStart {
        settings,
        telemetry,
        spans,
    }))
}

struct OtelStart {
    settings: crate::otel::Settings,
    telemetry: Arc<crate::otel::Telemetry>,
    spans: tokio::sync::mpsc::Receiver<crate::otel::encode::SpanRecord>,
}

fn spawn_otel(
    start: OtelStart,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    tokio::spawn(crate::otel::export::run(
        start.settings,
        start.telemetry,
        start.spans,
        Box::new(move || admin::render_metrics(&health, &metrics)),
        shutdown,
    ));
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
        if let Some(s) = &self.unix_socket {
            s.remove();
        }
        info!("redis-entra-proxy stopped");
    }
}
