//! Admin HTTP server: `/startup`, `/livez`, `/readyz`, `/metrics`, `/quitquitquit`.
//!
//! It sits beside the data path, never in it. The listener, the upstream pool and
//! `main` record what they know in a shared [`Health`] (a few atomics, cheap to
//! update from hot code); `auth` publishes the credential on its `watch` channel.
//! Every probe is answered from that state alone: `/readyz` never dials Azure, so a
//! kubelet probing every few seconds costs the cache nothing.
//!
//! Plain HTTP/1.1 over hyper, one request per connection (probes and scrapes open a
//! new connection anyway), with a header-read timeout, a per-connection deadline and
//! a cap on concurrent connections, so a stuck or hostile peer cannot pin the
//! server. Off by default (`admin.enabled`), on loopback by default (`admin.address`).
//!
//! [`healthcheck`] is the client side: a tiny blocking GET for the container
//! `HEALTHCHECK`, where there is no curl and no shell.

use crate::acceptance::Acceptance;
use crate::auth::{TokenState, TokenWatch};
use crate::config::Readiness;
use crate::metrics::Metrics;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// The most a credential must have left for `/readyz` to answer 200. The actual
/// margin is `min(READY_TOKEN_MARGIN, 10% of the credential's lifetime)`: with
/// Entra tokens (60 min to 24 h) that is 5 minutes, which is still above the 3
/// minutes before expiry by which Azure wants a new token applied, and well past the
/// point (15 minutes before expiry at the latest) where the rotator should have
/// refreshed. Readiness turning false therefore means refreshing has been failing
/// for a while, early enough for traffic to move elsewhere before the server starts
/// closing connections. The 10% keeps short-lived test tokens usable.
pub const READY_TOKEN_MARGIN: Duration = Duration::from_secs(5 * 60);

/// The fraction of a credential's lifetime (here 1/10) that caps the margin.
const READY_TOKEN_MARGIN_DIVISOR: u32 = 10;

/// Concurrent admin connections beyond which new ones are closed at once.
const MAX_CONNECTIONS: usize = 32;
/// How long a client may take to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one connection may live, request and response included.
const CONNECTION_DEADLINE: Duration = Duration::from_secs(15);
/// How long `serve` waits for open connections once shut down.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(2);
/// Longest `last_error` quoted in a probe body.
const MAX_ERROR_CHARS: usize = 200;

/// Health of the whole proxy, shared (`Arc`) by the listener, the upstream pool,
/// `main` and the admin server. Updates are single atomic stores.
#[derive(Debug)]
pub struct Health {
    listening: AtomicBool,
    draining: AtomicBool,
    started: AtomicBool,
    upstream_healthy: AtomicUsize,
    token: TokenWatch,
    /// (generation, when this process first saw it): gives a credential's lifetime.
    received: Mutex<(u64, SystemTime)>,
    /// Last readiness answered (0 unknown, 1 ready, 2 not ready), to log changes once.
    last_ready: AtomicU8,
    created: Instant,
    /// `admin.readiness`.
    mode: Readiness,
    /// What the cache answered to the proxy's own AUTHs (`None`: not judged).
    acceptance: Option<Arc<Acceptance>>,
    /// `upstream.tls_insecure_skip_verify`: said in every `/readyz` answer.
    insecure_tls: bool,
}

/// The answer to a probe: whether it passed and a short line saying why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub ok: bool,
    /// One line of plain text, never containing a secret.
    pub message: String,
}

impl Check {
    fn pass(message: impl Into<String>) -> Self {
        Check {
            ok: true,
            message: message.into(),
        }
    }

    fn fail(message: impl Into<String>) -> Self {
        Check {
            ok: false,
            message: message.into(),
        }
    }
}

impl Health {
    /// A fresh state: not listening, not draining, no healthy upstream connection,
    /// judging credentials from `token`.
    pub fn new(token: TokenWatch) -> Self {
        let generation = token.borrow().generation;
        Health {
            listening: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            started: AtomicBool::new(false),
            upstream_healthy: AtomicUsize::new(0),
            token,
            received: Mutex::new((generation, SystemTime::now())),
            last_ready: AtomicU8::new(0),
            created: Instant::now(),
            mode: Readiness::Credential,
            acceptance: None,
            insecure_tls: false,
        }
    }

    /// The upstream certificate is not verified: `/readyz` says so in every answer.
    pub fn with_insecure_tls(mut self, insecure: bool) -> Self {
        self.insecure_tls = insecure;
        self
    }

    /// Readiness (beyond `listening`) also wants the cache to have accepted the
    /// current credential (see [`Acceptance::judge`]).
    pub fn with_acceptance(mut self, acceptance: Arc<Acceptance>) -> Self {
        self.acceptance = Some(acceptance);
        self
    }

    /// What readiness waits for (`admin.readiness`); [`Readiness::Credential`] unless set.
    pub fn with_readiness(mut self, mode: Readiness) -> Self {
        self.mode = mode;
        self
    }

    /// The client listener is bound and accepting.
    pub fn set_listening(&self) {
        self.listening.store(true, Ordering::Release);
    }

    /// Shutdown has begun: `/readyz` answers 503 from now on (`/livez` stays 200).
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Whether [`Health::set_draining`] was called.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// One more upstream connection is connected and authenticated.
    pub fn upstream_up(&self) {
        self.upstream_healthy.fetch_add(1, Ordering::AcqRel);
    }

    /// One healthy upstream connection went away (never goes below zero).
    pub fn upstream_down(&self) {
        let _ = self
            .upstream_healthy
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                Some(n.saturating_sub(1))
            });
    }

    /// Set the number of healthy upstream connections outright (for a pool that counts
    /// its own).
    pub fn set_upstream_healthy(&self, n: usize) {
        self.upstream_healthy.store(n, Ordering::Release);
    }

    /// Upstream connections currently connected and authenticated.
    pub fn upstream_healthy(&self) -> usize {
        self.upstream_healthy.load(Ordering::Acquire)
    }

    /// Count one healthy upstream connection for as long as the guard lives: take it
    /// once the connection has authenticated, drop it when the connection is retired.
    pub fn healthy_upstream(self: &Arc<Self>) -> HealthyUpstream {
        self.upstream_up();
        HealthyUpstream(Arc::clone(self))
    }

    /// Remember when a new credential generation first appeared, for its lifetime.
    fn note_generation(&self, state: &TokenState, now: SystemTime) -> SystemTime {
        let mut received = self.received.lock().unwrap_or_else(|e| e.into_inner());
        if received.0 != state.generation {
            *received = (state.generation, now);
        }
        received.1
    }

    /// Keep [`Health`]'s view of when each credential arrived exact, rather than as
    /// late as the next probe. Returns when `shutdown` is cancelled or the credential
    /// source is gone.
    async fn track_credentials(self: Arc<Self>, shutdown: CancellationToken) {
        let mut token = self.token.clone();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = token.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let state = token.borrow_and_update().clone();
                    self.note_generation(&state, SystemTime::now());
                }
            }
        }
    }

    /// `/startup`: passes once the listener is up and a first credential was obtained,
    /// and keeps passing after that (it only gates the other probes).
    pub fn startup(&self) -> Check {
        if self.started.load(Ordering::Acquire) {
            return Check::pass("started");
        }
        let listening = self.listening.load(Ordering::Acquire);
        let state = self.token.borrow().clone();
        match (listening, state.current.is_some()) {
            (true, true) => {
                self.started.store(true, Ordering::Release);
                Check::pass("started")
            }
            (false, _) => Check::fail("starting: client listener not up yet"),
            (true, false) => Check::fail(format!(
                "starting: waiting for the first credential{}",
                error_suffix(&state)
            )),
        }
    }

    /// `/livez`: the process answers. Deliberately independent of the token and of
    /// upstream: restarting the proxy cures neither, and would drop every client.
    pub fn liveness(&self) -> Check {
        Check::pass(format!("alive: up {}s", self.created.elapsed().as_secs()))
    }

    /// `/readyz` at `now`: not draining, listener up, a credential usable with at
    /// least the margin of [`READY_TOKEN_MARGIN`] left, and at least one healthy
    /// upstream connection. Answered from held state only.
    pub fn readiness(&self, now: SystemTime) -> Check {
        let mut check = self.judge_readiness(now);
        if self.insecure_tls {
            check.message.push_str(
                "; WARNING: the upstream certificate is NOT verified (upstream.tls_insecure_skip_verify)",
            );
        }
        let code = if check.ok { 1 } else { 2 };
        if self.last_ready.swap(code, Ordering::AcqRel) != code {
            if check.ok {
                tracing::info!(reason = %check.message, "readiness: ready");
            } else {
                tracing::warn!(reason = %check.message, "readiness: not ready");
            }
        }
        check
    }

    fn judge_readiness(&self, now: SystemTime) -> Check {
        if self.is_draining() {
            return Check::fail("not ready: draining (shutting down)");
        }
        if !self.listening.load(Ordering::Acquire) {
            return Check::fail("not ready: client listener not up yet");
        }
        if self.mode == Readiness::Listening {
            return Check::pass("ready: listening (admin.readiness = listening)");
        }
        let state = self.token.borrow().clone();
        let received = self.note_generation(&state, now);
        let mut token = match judge_credential(&state, received, now) {
            Ok(line) => line,
            Err(why) => return Check::fail(format!("not ready: {why}")),
        };
        if let (Some(acceptance), Some(current)) = (&self.acceptance, &state.current) {
            match acceptance.judge(state.generation, &current.username) {
                Ok(line) => token = format!("{token}, {line}"),
                Err(why) => return Check::fail(format!("not ready: {token}, but {why}")),
            }
        }
        let healthy = match self.upstream_healthy() {
            1 => "1 healthy upstream connection".to_string(),
            n => format!("{n} healthy upstream connections"),
        };
        match (self.mode, self.upstream_healthy()) {
            (Readiness::Upstream, 0) => Check::fail(format!(
                "not ready: no healthy upstream connection ({token})"
            )),
            (Readiness::Upstream, _) => Check::pass(format!("ready: {token}; {healthy}")),
            // The count is shown, not required: a cache blip must not take every
            // pod out of its Service at once.
            _ => Check::pass(format!(
                "ready: {token}; {healthy} (not required: admin.readiness = credential)"
            )),
        }
    }

    /// Seconds the current credential has left at `now`, for `token_expiry_seconds`:
    /// `None` for a credential that never expires, 0 when none is usable.
    pub fn token_expiry_seconds(&self, now: SystemTime) -> Option<f64> {
        let state = self.token.borrow();
        match &state.current {
            None => Some(0.0),
            Some(c) => c.expires_at.map(|exp| {
                exp.duration_since(now)
                    .map(|left| left.as_secs_f64())
                    .unwrap_or(0.0)
            }),
        }
    }
}

/// A healthy upstream connection, counted by [`Health`] until dropped.
#[derive(Debug)]
pub struct HealthyUpstream(Arc<Health>);

impl Drop for HealthyUpstream {
    fn drop(&mut self) {
        self.0.upstream_down();
    }
}

/// The margin a credential that lived `lifetime` must keep: `min(5 min, lifetime / 10)`.
pub fn token_margin(lifetime: Duration) -> Duration {
    READY_TOKEN_MARGIN.min(lifetime / READY_TOKEN_MARGIN_DIVISOR)
}

/// Whether the credential in `state` (first seen at `received`) is good enough for
/// readiness at `now`: `Ok` with a line describing it, or `Err` saying why not.
fn judge_credential(
    state: &TokenState,
    received: SystemTime,
    now: SystemTime,
) -> Result<String, String> {
    let Some(credential) = &state.current else {
        return Err(format!("no credential yet{}", error_suffix(state)));
    };
    let Some(expires_at) = credential.expires_at else {
        return Ok("static credential (never expires)".into());
    };
    let left = match expires_at.duration_since(now) {
        Ok(left) if !left.is_zero() => left,
        _ => {
            let ago = now.duration_since(expires_at).unwrap_or_default();
            return Err(format!(
                "token expired {}s ago{}",
                ago.as_secs(),
                error_suffix(state)
            ));
        }
    };
    let lifetime = expires_at.duration_since(received).unwrap_or_default();
    let margin = token_margin(lifetime);
    if left < margin {
        return Err(format!(
            "token expires in {}s, less than the {}s margin{}",
            left.as_secs(),
            margin.as_secs(),
            error_suffix(state)
        ));
    }
    Ok(format!("token expires in {}s", left.as_secs()))
}

/// ` (last refresh error: ...)` when the source reported one, on one short line.
fn error_suffix(state: &TokenState) -> String {
    match &state.last_error {
        None => String::new(),
        Some(e) => {
            let mut line: String = e
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .take(MAX_ERROR_CHARS)
                .collect();
            if e.chars().count() > MAX_ERROR_CHARS {
                line.push_str("...");
            }
            format!(" (last refresh error: {line})")
        }
    }
}

/// What the admin server needs.
#[derive(Clone)]
pub struct AdminState {
    pub health: Arc<Health>,
    pub metrics: Arc<Metrics>,
    /// Cancelled by `POST /quitquitquit`: `main` treats it like SIGTERM.
    pub quit: CancellationToken,
}

/// Serve the admin endpoints on `listener` until `shutdown` is cancelled, then give
/// open connections a moment to finish and return.
///
/// Cancel `shutdown` only once the proxy has drained, not at SIGTERM: kubelet keeps
/// probing during the drain, and `/livez` must keep answering (while `/readyz` says
/// "draining") or the container is killed before its grace runs out.
pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let local = listener.local_addr()?;
    tracing::info!(address = %local, "admin: listening");
    let tracker = tokio::spawn(Arc::clone(&state.health).track_credentials(shutdown.clone()));
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // EMFILE, ECONNABORTED and the like pass; back off a little.
                    tracing::warn!(error = %e, "admin: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            tracing::warn!(%peer, "admin: too many connections; closing this one");
            continue;
        };
        let state = state.clone();
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            serve_connection(stream, peer, state, shutdown).await;
            drop(permit);
        });
    }
    drop(listener);
    tracker.abort();
    let all_done = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(SHUTDOWN_WAIT, all_done).await.is_err() {
        tracing::debug!("admin: closing connections still open at shutdown");
        connections.shutdown().await;
    }
    tracing::info!(address = %local, "admin: stopped");
    Ok(())
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    state: AdminState,
    shutdown: CancellationToken,
) {
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let response = respond(&state, &req, peer);
        async move { Ok::<_, Infallible>(response) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), service);
    let mut conn = std::pin::pin!(conn);
    let finished = tokio::time::timeout(CONNECTION_DEADLINE, async {
        tokio::select! {
            result = conn.as_mut() => result,
            _ = shutdown.cancelled() => {
                conn.as_mut().graceful_shutdown();
                conn.as_mut().await
            }
        }
    })
    .await;
    match finished {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "admin: connection error"),
        Err(_) => tracing::debug!(%peer, "admin: connection deadline passed; closed"),
    }
}

const GET_ONLY: &str = "GET, HEAD";

/// Route one request. Everything here is synchronous and reads held state only.
/// The metrics text, with what is computed at scrape time (token expiry,
/// readiness) brought up to date first: `/metrics` and the OTLP export.
pub fn render_metrics(health: &Health, metrics: &Metrics) -> String {
    let now = SystemTime::now();
    metrics.set_token_expiry_seconds(health.token_expiry_seconds(now));
    metrics.ready.set(i64::from(health.readiness(now).ok));
    metrics.render()
}

fn respond<B>(state: &AdminState, req: &Request<B>, peer: SocketAddr) -> Response<Full<Bytes>> {
    let method = req.method();
    let path = req.uri().path();
    let readable = method == Method::GET || method == Method::HEAD;
    match path {
        "/startup" | "/livez" | "/readyz" | "/metrics" if !readable => method_not_allowed(GET_ONLY),
        "/startup" => check_response(state.health.startup()),
        "/livez" => check_response(state.health.liveness()),
        "/readyz" => check_response(state.health.readiness(SystemTime::now())),
        "/metrics" => {
            let text = render_metrics(&state.health, &state.metrics);
            let mut response = Response::new(Full::new(Bytes::from(text)));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            response
        }
        "/quitquitquit" if method != Method::POST => method_not_allowed("POST"),
        "/quitquitquit" => quit(state, req, peer),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; endpoints: /startup /livez /readyz /metrics /quitquitquit (POST)"
                .to_string(),
        ),
    }
}

/// `POST /quitquitquit`: start a graceful exit. Only from the same host: a peer
/// address of exactly 127.0.0.1 or ::1, and no header saying a proxy forwarded the
/// request, and nothing a web browser adds (see [`from_a_browser`]). Any other loopback address is someone else's: a service mesh's
/// sidecar hands inbound traffic from other pods to the app from 127.0.0.6
/// (Istio), so "any loopback address" would let every pod of the mesh that can
/// reach the admin port (open for kubelet and Prometheus) stop the proxy.
fn quit<B>(state: &AdminState, req: &Request<B>, peer: SocketAddr) -> Response<Full<Bytes>> {
    if let Err(why) = same_host(req, peer) {
        tracing::warn!(%peer, "admin: /quitquitquit refused: {why}");
        return text(
            StatusCode::FORBIDDEN,
            format!("forbidden: /quitquitquit is accepted from this host only (127.0.0.1 or ::1, not from a browser): {why}"),
        );
    }
    if state.quit.is_cancelled() {
        return text(StatusCode::OK, "already shutting down".into());
    }
    tracing::info!(%peer, "admin: /quitquitquit received; draining and exiting");
    state.quit.cancel();
    text(StatusCode::OK, "shutting down".into())
}

/// Whether a request comes from this host itself, or why not.
fn same_host<B>(req: &Request<B>, peer: SocketAddr) -> Result<(), String> {
    let ip = peer.ip().to_canonical();
    if ip != IpAddr::V4(Ipv4Addr::LOCALHOST) && ip != IpAddr::V6(Ipv6Addr::LOCALHOST) {
        return Err(format!("the peer address is {ip}"));
    }
    // A proxy on this host relaying someone else's request says so.
    if let Some(name) = req.headers().keys().find(|name| {
        let n = name.as_str();
        n == "forwarded"
            || n.starts_with("x-forwarded-")
            || n.starts_with("x-envoy-")
            || n.starts_with("l5d-")
    }) {
        return Err(format!(
            "the request was relayed by a proxy (header {name})"
        ));
    }
    from_a_browser(req)
}

/// Refuse what a web browser sends: a page open on this machine could otherwise
/// stop the proxy with a cross-origin "simple" POST (no CORS preflight), whose
/// peer address is 127.0.0.1. Browsers add `Origin` and `Sec-Fetch-*` to such
/// requests and may only send the form content types without a preflight; a
/// script or `curl -X POST` sends none of these.
fn from_a_browser<B>(req: &Request<B>) -> Result<(), String> {
    let headers = req.headers();
    if let Some(name) = headers
        .keys()
        .find(|n| n.as_str() == "origin" || n.as_str().starts_with("sec-fetch-"))
    {
        return Err(format!(
            "the request came from a web browser (header {name})"
        ));
    }
    if let Some(ct) = headers.get(CONTENT_TYPE) {
        let essence = ct
            .to_str()
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if matches!(
            essence.as_str(),
            "text/plain" | "application/x-www-form-urlencoded" | "multipart/form-data"
        ) || ct.to_str().is_err()
        {
            return Err(format!(
                "form content type {essence:?}, as a browser sends; send no body (curl -X POST)"
            ));
        }
    }
    Ok(())
}

fn check_response(check: Check) -> Response<Full<Bytes>> {
    let status = if check.ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    text(status, check.message)
}

fn method_not_allowed(allow: &'static str) -> Response<Full<Bytes>> {
    let mut response = text(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method not allowed; use {allow}"),
    );
    response
        .headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    response
}

fn text(status: StatusCode, mut body: String) -> Response<Full<Bytes>> {
    body.push('\n');
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

mod healthcheck;
pub use healthcheck::healthcheck;

#[cfg(test)]
mod tests;
