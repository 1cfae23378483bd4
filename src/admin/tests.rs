//! Tests for the admin server: the judgements as plain functions, then every
//! endpoint over a real loopback listener.

use super::*;
use crate::auth::Credential;
use crate::secret::Secret;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

fn credential(expires_at: Option<SystemTime>) -> Option<Arc<Credential>> {
    Some(Arc::new(Credential {
        username: "oid-1".into(),
        password: Secret::new("s3cr3t-token-value"),
        expires_at,
    }))
}

fn state(generation: u64, expires_at: Option<SystemTime>, last_error: Option<&str>) -> TokenState {
    TokenState {
        current: credential(expires_at),
        generation,
        last_error: last_error.map(str::to_string),
        ..TokenState::default()
    }
}

#[test]
fn margin_is_five_minutes_or_a_tenth_of_the_lifetime() {
    assert_eq!(
        token_margin(Duration::from_secs(24 * 3600)),
        Duration::from_secs(300)
    );
    assert_eq!(
        token_margin(Duration::from_secs(3600)),
        Duration::from_secs(300)
    );
    assert_eq!(
        token_margin(Duration::from_secs(60)),
        Duration::from_secs(6)
    );
    assert_eq!(token_margin(Duration::ZERO), Duration::ZERO);
}

#[test]
fn credential_judgements_say_why() {
    let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let none = TokenState {
        last_error: Some("IMDS timed out".into()),
        ..TokenState::default()
    };
    assert_eq!(
        judge_credential(&none, t0, t0).unwrap_err(),
        "no credential yet (last refresh error: IMDS timed out)"
    );
    let fixed = state(1, None, None);
    assert_eq!(
        judge_credential(&fixed, t0, t0 + Duration::from_secs(1 << 30)).unwrap(),
        "static credential (never expires)"
    );
    // A one-hour token: fine until 5 minutes before expiry.
    let hour = state(2, Some(t0 + Duration::from_secs(3600)), Some("HTTP 500"));
    assert_eq!(
        judge_credential(&hour, t0, t0 + Duration::from_secs(3000)).unwrap(),
        "token expires in 600s"
    );
    assert_eq!(
        judge_credential(&hour, t0, t0 + Duration::from_secs(3558)).unwrap_err(),
        "token expires in 42s, less than the 300s margin (last refresh error: HTTP 500)"
    );
    assert_eq!(
        judge_credential(&hour, t0, t0 + Duration::from_secs(3610)).unwrap_err(),
        "token expired 10s ago (last refresh error: HTTP 500)"
    );
    assert!(judge_credential(&hour, t0, t0 + Duration::from_secs(3600)).is_err());
    // A 60 s test token keeps a 6 s margin.
    let short = state(3, Some(t0 + Duration::from_secs(60)), None);
    assert!(judge_credential(&short, t0, t0 + Duration::from_secs(53)).is_ok());
    assert!(judge_credential(&short, t0, t0 + Duration::from_secs(55)).is_err());
}

#[test]
fn refresh_errors_are_one_short_line() {
    let long = format!("line one\nline two {}", "x".repeat(500));
    let s = error_suffix(&state(1, None, Some(&long)));
    assert!(!s.contains('\n'), "{s}");
    assert!(
        s.starts_with(" (last refresh error: line one line two xx"),
        "{s}"
    );
    assert!(s.ends_with("...)"), "{s}");
    assert!(s.chars().count() < MAX_ERROR_CHARS + 40, "{s}");
}

#[test]
fn startup_needs_listener_and_first_credential_then_latches() {
    let (tx, rx) = watch::channel(TokenState::default());
    let health = Health::new(rx);
    assert!(!health.startup().ok);
    health.set_listening();
    let c = health.startup();
    assert!(!c.ok);
    assert_eq!(c.message, "starting: waiting for the first credential");
    tx.send(state(
        1,
        Some(SystemTime::now() + Duration::from_secs(3600)),
        None,
    ))
    .unwrap();
    assert_eq!(health.startup(), Check::pass("started"));
    // Losing the credential later is readiness' business, not startup's.
    tx.send(TokenState::default()).unwrap();
    assert!(health.startup().ok);
}

#[test]
fn readiness_follows_draining_credential_and_upstream() {
    let now = SystemTime::now();
    let (tx, rx) = watch::channel(TokenState::default());
    let health = Arc::new(Health::new(rx).with_readiness(Readiness::Upstream));
    assert_eq!(
        health.readiness(now).message,
        "not ready: client listener not up yet"
    );
    health.set_listening();
    assert!(health.readiness(now).message.contains("no credential yet"));
    tx.send(state(1, Some(now + Duration::from_secs(3600)), None))
        .unwrap();
    let c = health.readiness(now);
    assert!(
        c.message
            .starts_with("not ready: no healthy upstream connection"),
        "{c:?}"
    );
    let first = health.healthy_upstream();
    let second = health.healthy_upstream();
    let c = health.readiness(now);
    assert!(c.ok, "{c:?}");
    assert!(
        c.message.ends_with("2 healthy upstream connections"),
        "{c:?}"
    );
    drop(first);
    assert!(health.readiness(now).ok);
    drop(second);
    assert!(!health.readiness(now).ok);
    assert_eq!(health.upstream_healthy(), 0);
    health.upstream_down();
    assert_eq!(health.upstream_healthy(), 0, "never below zero");
    health.set_upstream_healthy(3);
    assert!(health.readiness(now).ok);
    // The token endpoint fails long enough for the token to come near expiry...
    let late = now + Duration::from_secs(3600 - 120);
    let c = health.readiness(late);
    assert!(!c.ok && c.message.contains("expires in 1"), "{c:?}");
    // ... and recovers with a new token: ready again.
    tx.send(state(2, Some(late + Duration::from_secs(3600)), None))
        .unwrap();
    assert!(health.readiness(late).ok);
    health.set_draining();
    assert_eq!(
        health.readiness(late),
        Check::fail("not ready: draining (shutting down)")
    );
    assert!(health.liveness().ok, "liveness ignores draining");
}

/// The default: a cache blip (no healthy upstream connection) leaves the pod ready;
/// the credential running out does not.
#[test]
fn readiness_by_default_needs_a_credential_but_no_upstream() {
    let now = SystemTime::now();
    let (tx, rx) = watch::channel(TokenState::default());
    let health = Health::new(rx);
    health.set_listening();
    assert!(!health.readiness(now).ok, "no credential yet");
    tx.send(state(1, Some(now + Duration::from_secs(3600)), None))
        .unwrap();
    let c = health.readiness(now);
    assert!(c.ok, "{c:?}");
    assert!(
        c.message.ends_with(
            "0 healthy upstream connections (not required: admin.readiness = credential)"
        ),
        "{c:?}"
    );
    assert!(!health.readiness(now + Duration::from_secs(3600 - 60)).ok);
    health.set_draining();
    assert!(!health.readiness(now).ok);

    // `listening`: only the listener and the drain count.
    let (_tx, rx) = watch::channel(TokenState::default());
    let health = Health::new(rx).with_readiness(Readiness::Listening);
    assert!(!health.readiness(now).ok);
    health.set_listening();
    assert_eq!(
        health.readiness(now),
        Check::pass("ready: listening (admin.readiness = listening)")
    );
    health.set_draining();
    assert!(!health.readiness(now).ok);
}

#[test]
fn token_expiry_seconds_for_metrics() {
    let now = SystemTime::now();
    let (tx, rx) = watch::channel(TokenState::default());
    let health = Health::new(rx);
    assert_eq!(health.token_expiry_seconds(now), Some(0.0));
    tx.send(state(1, Some(now + Duration::from_secs(90)), None))
        .unwrap();
    assert_eq!(health.token_expiry_seconds(now), Some(90.0));
    assert_eq!(
        health.token_expiry_seconds(now + Duration::from_secs(100)),
        Some(0.0)
    );
    tx.send(state(2, None, None)).unwrap();
    assert_eq!(health.token_expiry_seconds(now), None);
}

#[test]
fn quitquitquit_is_refused_from_a_non_loopback_peer() {
    // No traffic: only the peer address the router is told about.
    let (_tx, rx) = watch::channel(TokenState::default());
    let admin = AdminState {
        health: Arc::new(Health::new(rx)),
        metrics: Arc::new(Metrics::new()),
        quit: CancellationToken::new(),
    };
    let req = Request::post("/quitquitquit").body(()).unwrap();
    let remote: SocketAddr = "192.0.2.1:40000".parse().unwrap();
    assert_eq!(
        respond(&admin, &req, remote).status(),
        StatusCode::FORBIDDEN
    );
    assert!(!admin.quit.is_cancelled());
    let sidecar: SocketAddr = "127.0.0.6:40000".parse().unwrap();
    assert_eq!(
        respond(&admin, &req, sidecar).status(),
        StatusCode::FORBIDDEN
    );
    assert!(!admin.quit.is_cancelled());
    let mapped: SocketAddr = "[::ffff:127.0.0.1]:40000".parse().unwrap();
    assert_eq!(respond(&admin, &req, mapped).status(), StatusCode::OK);
    assert!(admin.quit.is_cancelled());
}

/// A running admin server on an ephemeral loopback port.
struct Running {
    addr: SocketAddr,
    tokens: watch::Sender<TokenState>,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    quit: CancellationToken,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

async fn start() -> Running {
    let (tokens, rx) = watch::channel(TokenState::default());
    let health = Arc::new(Health::new(rx).with_readiness(Readiness::Upstream));
    let metrics = Arc::new(Metrics::new());
    let quit = CancellationToken::new();
    let shutdown = CancellationToken::new();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = AdminState {
        health: health.clone(),
        metrics: metrics.clone(),
        quit: quit.clone(),
    };
    let task = tokio::spawn(serve(listener, state, shutdown.clone()));
    Running {
        addr,
        tokens,
        health,
        metrics,
        quit,
        shutdown,
        task,
    }
}

/// A raw HTTP/1.1 request; returns (status, head, body).
async fn request(addr: SocketAddr, method: &str, path: &str) -> (u16, String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("{method} {path} HTTP/1.1\r\nHost: admin\r\nContent-Length: 0\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .expect("the server closes the connection after one response")
        .unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head.to_string(), body.to_string())
}

#[tokio::test]
async fn probes_over_http() {
    let r = start().await;
    r.tokens
        .send(TokenState {
            last_error: Some("connect timeout to 169.254.169.254".into()),
            ..TokenState::default()
        })
        .unwrap();

    let (status, _, body) = request(r.addr, "GET", "/startup").await;
    assert_eq!(
        (status, body.as_str()),
        (503, "starting: client listener not up yet\n")
    );
    let (status, _, body) = request(r.addr, "GET", "/livez").await;
    assert_eq!(status, 200);
    assert!(body.starts_with("alive: up "), "{body}");
    r.health.set_listening();
    let (status, _, body) = request(r.addr, "GET", "/readyz").await;
    assert_eq!(status, 503);
    assert_eq!(
        body,
        "not ready: no credential yet (last refresh error: connect timeout to 169.254.169.254)\n"
    );

    r.tokens
        .send(state(
            1,
            Some(SystemTime::now() + Duration::from_secs(3600)),
            None,
        ))
        .unwrap();
    assert_eq!(request(r.addr, "GET", "/startup").await.0, 200);
    let (status, _, body) = request(r.addr, "GET", "/readyz").await;
    assert_eq!(status, 503);
    assert!(
        body.starts_with("not ready: no healthy upstream connection (token expires in 3"),
        "{body}"
    );
    let _up = r.health.healthy_upstream();
    let (status, head, body) = request(r.addr, "GET", "/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("ready: token expires in 3"), "{body}");
    assert!(
        body.ends_with("; 1 healthy upstream connection\n"),
        "{body}"
    );
    assert!(!body.contains("s3cr3t"), "{body}");
    assert!(
        head.contains("content-type: text/plain; charset=utf-8"),
        "{head}"
    );
    let (status, head, body) = request(r.addr, "HEAD", "/readyz").await;
    assert_eq!((status, body.as_str()), (200, ""), "{head}");

    // An expired credential turns readiness false at once.
    r.tokens
        .send(state(
            2,
            Some(SystemTime::now() - Duration::from_secs(5)),
            Some("HTTP 429"),
        ))
        .unwrap();
    let (status, _, body) = request(r.addr, "GET", "/readyz").await;
    assert_eq!(status, 503);
    assert!(body.starts_with("not ready: token expired "), "{body}");
    assert!(
        body.ends_with(" (last refresh error: HTTP 429)\n"),
        "{body}"
    );

    r.health.set_draining();
    assert_eq!(
        request(r.addr, "GET", "/readyz").await.2,
        "not ready: draining (shutting down)\n"
    );
    assert_eq!(request(r.addr, "GET", "/livez").await.0, 200);

    r.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), r.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn metrics_over_http() {
    let r = start().await;
    r.health.set_listening();
    r.metrics.clients_total.inc();
    let (status, head, body) = request(r.addr, "GET", "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        head.contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{head}"
    );
    assert!(
        body.contains("redis_entra_proxy_client_connections_accepted_total 1\n"),
        "{body}"
    );
    assert!(
        body.contains("\nredis_entra_proxy_token_expiry_seconds 0.0\n"),
        "{body}"
    );
    assert!(body.contains("\nredis_entra_proxy_ready 0\n"), "{body}");
    assert!(body.ends_with("# EOF\n"), "{body}");

    r.tokens
        .send(state(
            1,
            Some(SystemTime::now() + Duration::from_secs(1000)),
            None,
        ))
        .unwrap();
    r.health.set_upstream_healthy(1);
    r.metrics.clients_total.inc();
    let body = request(r.addr, "GET", "/metrics").await.2;
    assert!(
        body.contains("redis_entra_proxy_client_connections_accepted_total 2\n"),
        "{body}"
    );
    assert!(body.contains("\nredis_entra_proxy_ready 1\n"), "{body}");
    let expiry: f64 = body
        .lines()
        .find_map(|l| l.strip_prefix("redis_entra_proxy_token_expiry_seconds "))
        .expect("token_expiry_seconds present")
        .parse()
        .unwrap();
    assert!((990.0..=1000.0).contains(&expiry), "{expiry}");
    assert!(!body.contains("s3cr3t"));

    // A static credential never expires: the gauge goes away.
    r.tokens.send(state(2, None, None)).unwrap();
    let body = request(r.addr, "GET", "/metrics").await.2;
    assert!(!body.contains("token_expiry_seconds"), "{body}");
    r.shutdown.cancel();
}

#[tokio::test]
async fn quitquitquit_wants_post_and_cancels_quit() {
    let r = start().await;
    let (status, head, _) = request(r.addr, "GET", "/quitquitquit").await;
    assert_eq!(status, 405);
    assert!(head.contains("allow: POST"), "{head}");
    assert!(!r.quit.is_cancelled());
    let (status, head, _) = request(r.addr, "POST", "/readyz").await;
    assert_eq!(status, 405);
    assert!(head.contains("allow: GET, HEAD"), "{head}");
    assert_eq!(request(r.addr, "GET", "/nope").await.0, 404);

    let (status, _, body) = request(r.addr, "POST", "/quitquitquit").await;
    assert_eq!((status, body.as_str()), (200, "shutting down\n"));
    tokio::time::timeout(Duration::from_secs(1), r.quit.cancelled())
        .await
        .unwrap();
    let (status, _, body) = request(r.addr, "POST", "/quitquitquit").await;
    assert_eq!((status, body.as_str()), (200, "already shutting down\n"));
    // The admin server itself keeps answering until its own shutdown.
    assert_eq!(request(r.addr, "GET", "/livez").await.0, 200);
    r.shutdown.cancel();
}

#[tokio::test]
async fn shutdown_is_not_held_up_by_a_silent_connection() {
    let r = start().await;
    // Connected, says nothing: the header-read timeout and the shutdown wait bound it.
    let _silent = tokio::net::TcpStream::connect(r.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    r.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), r.task)
        .await
        .expect("serve returns after shutdown")
        .unwrap()
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(4));
    assert!(
        tokio::net::TcpStream::connect(r.addr).await.is_err(),
        "listener closed"
    );
}

#[tokio::test]
async fn healthcheck_exit_status() {
    let r = start().await;
    let addr = r.addr;
    let live = tokio::task::spawn_blocking(move || healthcheck(addr, "/livez"));
    assert_eq!(live.await.unwrap(), 0);
    let ready = tokio::task::spawn_blocking(move || healthcheck(addr, "/readyz"));
    assert_eq!(ready.await.unwrap(), 1);
    // 0.0.0.0 is probed on loopback.
    let any = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), addr.port());
    let live = tokio::task::spawn_blocking(move || healthcheck(any, "/livez"));
    assert_eq!(live.await.unwrap(), 0);
    r.shutdown.cancel();
    r.task.await.unwrap().unwrap();
    // Nothing listening any more.
    let gone = tokio::task::spawn_blocking(move || healthcheck(addr, "/livez"));
    assert_eq!(gone.await.unwrap(), 1);
}

/// POST /quitquitquit from a client socket bound to `from`.
async fn quit_from(addr: SocketAddr, from: &str, extra_header: &str) -> u16 {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let mut s = socket.connect(addr).await.unwrap();
    let req = format!(
        "POST /quitquitquit HTTP/1.1\r\nHost: x\r\n{extra_header}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out).await;
    out.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// A service mesh's sidecar relays other pods' requests from 127.0.0.6 (Istio),
/// or says in a header that it relayed them: neither is this host.
#[tokio::test]
async fn quitquitquit_from_a_mesh_sidecar_address_is_refused() {
    let r = start().await;
    assert_eq!(quit_from(r.addr, "127.0.0.6", "").await, 403);
    assert!(!r.quit.is_cancelled(), "127.0.0.6 stopped the proxy");
    let relayed = "X-Forwarded-For: 10.1.2.3\r\n";
    assert_eq!(quit_from(r.addr, "127.0.0.1", relayed).await, 403);
    assert!(
        !r.quit.is_cancelled(),
        "a relayed request stopped the proxy"
    );
    assert_eq!(quit_from(r.addr, "127.0.0.1", "").await, 200);
    assert!(r.quit.is_cancelled());
    r.shutdown.cancel();
}

/// A web page open on the same machine can make the browser POST to
/// `127.0.0.1:9090/quitquitquit` (a "simple" cross-origin request needs no CORS
/// preflight). Browsers mark such requests (`Origin`, `Sec-Fetch-*`) and can only
/// send form content types without a preflight: each is refused. A plain
/// `curl -X POST` still works.
#[test]
fn quitquitquit_refuses_what_a_browser_sends() {
    let (_tx, rx) = watch::channel(TokenState::default());
    let admin = AdminState {
        health: Arc::new(Health::new(rx)),
        metrics: Arc::new(Metrics::new()),
        quit: CancellationToken::new(),
    };
    let local: SocketAddr = "127.0.0.1:40000".parse().unwrap();
    for (name, value) in [
        ("origin", "http://any.page"),
        ("origin", "null"),
        ("sec-fetch-site", "cross-site"),
        ("sec-fetch-mode", "no-cors"),
        ("content-type", "text/plain"),
        ("content-type", "text/plain;charset=UTF-8"),
        ("content-type", "application/x-www-form-urlencoded"),
        ("content-type", "Multipart/Form-Data; boundary=x"),
    ] {
        let req = Request::post("/quitquitquit")
            .header(name, value)
            .body(())
            .unwrap();
        let resp = respond(&admin, &req, local);
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{name}: {value}");
        assert!(!admin.quit.is_cancelled(), "{name}: {value}");
    }
    let curl = Request::post("/quitquitquit")
        .header("user-agent", "curl/8.0")
        .header("accept", "*/*")
        .body(())
        .unwrap();
    assert_eq!(respond(&admin, &curl, local).status(), StatusCode::OK);
    assert!(admin.quit.is_cancelled());
}

/// With `upstream.tls_insecure_skip_verify` on, every `/readyz` answer says so.
#[test]
fn readiness_says_when_the_upstream_certificate_is_not_verified() {
    let (_tx, rx) = watch::channel(TokenState::default());
    let health = Health::new(rx)
        .with_readiness(Readiness::Listening)
        .with_insecure_tls(true);
    health.set_listening();
    let check = health.readiness(SystemTime::now());
    assert!(check.ok);
    assert!(check.message.contains("NOT verified"), "{}", check.message);
}
