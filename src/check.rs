//! `redis-entra-proxy check`: will this configuration work? With the same
//! configuration as a run, it obtains a credential and shows the token's claims
//! that matter (never the token), resolves and connects to the cache, shows the
//! TLS version and the certificate's names, authenticates as that identity, says
//! HELLO, finds out whether the cache is clustered, checks that the identity may
//! run the commands the proxy itself needs, and times one round trip. A line per
//! step ([`verdict::render`]); a hint under each failure. Exit 0 only when every
//! step passed. cloud-sql-proxy's `--run-connection-test` is the model.
//!
//! This file is the I/O driver; what the outcomes mean is in [`verdict`].

pub mod verdict;

use crate::auth::{self, Credential};
use crate::config::{AuthSource, Config};
use crate::metrics::Metrics;
use crate::resp;
use crate::resp::scan::ReplyScanner;
use bytes::BytesMut;
use redis_protocol::resp3::types::OwnedFrame as F;
use rustls::pki_types::ServerName;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use verdict::{Outcome, Step};

/// What the proxy itself sends besides HELLO and AUTH, checked with ACL DRYRUN
/// (or, where the identity may not run that, by running them).
const NEEDED: &[&[&str]] = &[&["PING"], &["COMMAND", "COUNT"]];
/// Also needed on a clustered cache.
const NEEDED_CLUSTER: &[&[&str]] = &[&["CLUSTER", "SLOTS"], &["CLUSTER", "SHARDS"]];

/// Run every step; returns them in order.
pub async fn run(cfg: &Config) -> Vec<Step> {
    let mut steps = Vec::new();
    let shutdown = CancellationToken::new();
    let cred = credential(cfg, &shutdown, &mut steps).await;
    let session = match connect(cfg, &mut steps).await {
        Some(s) => s,
        None => {
            for name in ["auth", "hello", "cluster", "acl", "latency"] {
                steps.push(Step::skip(name, "needs a TLS connection"));
            }
            shutdown.cancel();
            return steps;
        }
    };
    let mut session = session;
    let authed = match &cred {
        Some(c) => authenticate(&mut session, c, &mut steps).await,
        None => {
            steps.push(Step::skip("auth", "needs a credential"));
            false
        }
    };
    if !authed {
        for name in ["hello", "cluster", "acl", "latency"] {
            steps.push(Step::skip(name, "needs AUTH to pass"));
        }
        shutdown.cancel();
        return steps;
    }
    let user = cred
        .as_ref()
        .map(|c| c.username.clone())
        .unwrap_or_default();
    let clustered = hello(&mut session, &user, &mut steps).await;
    match clustered {
        Some(c) => {
            cluster(&mut session, c, &mut steps).await;
            acl(&mut session, &user, c, &mut steps).await;
        }
        None => {
            steps.push(Step::skip("cluster", "needs HELLO to pass"));
            steps.push(Step::skip("acl", "needs HELLO to pass"));
        }
    }
    latency(&mut session, &mut steps).await;
    shutdown.cancel();
    steps
}

/// Obtain the configured credential and describe it (the `token` step).
async fn credential(
    cfg: &Config,
    shutdown: &CancellationToken,
    steps: &mut Vec<Step>,
) -> Option<Arc<Credential>> {
    let mut tokens = match auth::start(&cfg.auth, Arc::new(Metrics::new()), shutdown.clone()) {
        Ok(t) => t,
        Err(e) => {
            steps.push(Step::fail(
                "token",
                e.to_string(),
                "fix the auth.* settings named above",
            ));
            return None;
        }
    };
    let limit = cfg.auth.entra.attempt_timeout + Duration::from_secs(5);
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let state = tokens.borrow_and_update().clone();
        if let Some(c) = state.current.clone() {
            steps.push(describe_credential(cfg, &c));
            return Some(c);
        }
        if let Some(e) = state.last_error {
            steps.push(Step::fail(
                "token",
                format!("no token: {e}"),
                token_hint(&e),
            ));
            return None;
        }
        match tokio::time::timeout_at(deadline, tokens.changed()).await {
            Ok(Ok(())) => continue,
            _ => {
                steps.push(Step::fail(
                    "token",
                    format!("no token within {}s", limit.as_secs()),
                    "the token endpoint did not answer: check the credential settings and that \
                     the endpoint is reachable (IMDS at 169.254.169.254 on Azure VMs)",
                ));
                return None;
            }
        }
    }
}

fn token_hint(error: &str) -> String {
    let e = error.to_ascii_lowercase();
    if e.contains("aadsts500011") || e.contains("resource principal") || e.contains("scope") {
        "the scope is wrong: auth.entra.scope should be https://redis.azure.com/.default".into()
    } else if e.contains("identity") && (e.contains("not found") || e.contains("no managed")) {
        "no managed identity here, or not the one named: check auth.entra.client_id / object_id / \
         resource_id and that the identity is assigned to this machine"
            .into()
    } else {
        "see the error: check auth.entra.credential and its settings".into()
    }
}

fn describe_credential(cfg: &Config, c: &Credential) -> Step {
    if cfg.auth.source == AuthSource::Static {
        return Step::ok(
            "token",
            format!(
                "static credential for user `{}` (never expires)",
                c.username
            ),
        );
    }
    let expires = c
        .expires_at
        .and_then(|e| e.duration_since(SystemTime::now()).ok())
        .map(|d| format!("expires in {}s", d.as_secs()))
        .unwrap_or_else(|| "no expiry".into());
    let claims = auth::jwt::claims(c.password.expose()).unwrap_or_default();
    let aud = claims.audiences();
    let who = match (&claims.upn, &claims.appid) {
        (Some(upn), _) => format!(", upn {upn}"),
        (None, Some(app)) => format!(", appid {app}"),
        _ => String::new(),
    };
    let line = format!(
        "aud {}, oid {}{who}, tenant {}, {expires}; AUTH username `{}`",
        if aud.is_empty() {
            "(none)".to_string()
        } else {
            aud.join(" ")
        },
        claims.oid.as_deref().unwrap_or("(none)"),
        claims.tid.as_deref().unwrap_or("(none)"),
        c.username
    );
    if !aud.iter().any(|a| verdict::is_redis_audience(a)) {
        return Step::fail(
            "token",
            line,
            format!(
                "audience wrong: the token is not for Azure Redis (auth.entra.scope = {}); set \
                 auth.entra.scope to https://redis.azure.com/.default",
                cfg.auth.entra.scope
            ),
        );
    }
    if !verdict::audience_matches(&aud, &cfg.auth.entra.scope) {
        return Step::fail(
            "token",
            line,
            format!(
                "the token's audience is not {}: auth.entra.scope should be \
                 https://redis.azure.com/.default (the cache refuses tokens for anything else)",
                verdict::expected_audience(&cfg.auth.entra.scope)
            ),
        );
    }
    Step::ok("token", line)
}

/// A TLS connection to the cache and its buffer.
struct Session {
    stream: tokio_rustls::client::TlsStream<TcpStream>,
    buf: BytesMut,
    timeout: Duration,
}

/// Resolve, connect and shake hands (`resolve`, `connect`, `tls`).
async fn connect(cfg: &Config, steps: &mut Vec<Step>) -> Option<Session> {
    let (host, port) = (cfg.upstream.host.as_str(), cfg.upstream.port);
    let timeout = cfg.upstream.connect_timeout;
    let addrs: Vec<std::net::SocketAddr> =
        match tokio::time::timeout(timeout, tokio::net::lookup_host((host, port))).await {
            Ok(Ok(a)) => a.collect(),
            Ok(Err(e)) => {
                steps.push(Step::fail(
                    "resolve",
                    format!("{host}: {e}"),
                    "the host name does not resolve: check upstream.host (a private endpoint \
                     needs its private DNS zone)",
                ));
                return None;
            }
            Err(_) => {
                steps.push(Step::fail(
                    "resolve",
                    format!("{host}: timed out"),
                    "check DNS",
                ));
                return None;
            }
        };
    steps.push(Step::ok(
        "resolve",
        format!(
            "{host} -> {}",
            addrs
                .iter()
                .map(|a| a.ip().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    ));
    let mut tcp = None;
    let mut last_err = String::from("no address");
    for addr in &addrs {
        let started = Instant::now();
        match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                steps.push(Step::ok(
                    "connect",
                    format!("{addr} in {}", millis(started.elapsed())),
                ));
                tcp = Some(s);
                break;
            }
            Ok(Err(e)) => last_err = format!("{addr}: {e}"),
            Err(_) => last_err = format!("{addr}: timed out after {}s", timeout.as_secs()),
        }
    }
    let Some(tcp) = tcp else {
        let hint = verdict::connect_hint(&last_err);
        steps.push(Step::fail("connect", last_err, hint));
        return None;
    };
    let _ = tcp.set_nodelay(true);
    let config = match crate::upstream::tls::client_config(cfg) {
        Ok(c) => c,
        Err(e) => {
            steps.push(Step::fail("tls", e, "fix upstream.ca_file"));
            return None;
        }
    };
    let name = cfg.tls_server_name().to_string();
    let Ok(server_name) = ServerName::try_from(name.clone()) else {
        steps.push(Step::fail(
            "tls",
            format!("`{name}` is not a valid TLS name"),
            "fix upstream.server_name",
        ));
        return None;
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let stream = match tokio::time::timeout(timeout, connector.connect(server_name, tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let what = crate::upstream::tls::tls_reason(&e);
            let hint = verdict::tls_hint(&what);
            steps.push(Step::fail(
                "tls",
                format!("handshake as `{name}`: {what}"),
                hint,
            ));
            return None;
        }
        Err(_) => {
            steps.push(Step::fail(
                "tls",
                format!(
                    "no TLS answer within {}s: the server did not speak TLS (plaintext port?)",
                    timeout.as_secs()
                ),
                verdict::tls_hint("did not speak TLS"),
            ));
            return None;
        }
    };
    let (_, conn) = stream.get_ref();
    let version = conn
        .protocol_version()
        .map(|v| format!("{v:?}").replace("TLSv1_", "TLS 1."))
        .unwrap_or_else(|| "?".into());
    let suite = conn
        .negotiated_cipher_suite()
        .map(|s| format!("{:?}", s.suite()))
        .unwrap_or_default();
    let names = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| verdict::certificate_names(c.as_ref()))
        .unwrap_or_default();
    let insecure = if cfg.upstream.tls_insecure_skip_verify {
        " (certificate NOT verified: upstream.tls_insecure_skip_verify)"
    } else {
        ", verified"
    };
    steps.push(Step::ok(
        "tls",
        format!(
            "{version} {suite}; certificate names: {}{insecure} as `{name}`",
            if names.is_empty() {
                "(none read)".into()
            } else {
                names.join(", ")
            }
        ),
    ));
    Some(Session {
        stream,
        buf: BytesMut::with_capacity(4096),
        timeout,
    })
}

impl Session {
    /// Send one command and read its reply (`Err`: the connection failed).
    async fn call(&mut self, args: &[&[u8]]) -> Result<BytesMut, String> {
        self.stream
            .write_all(&resp::command(args))
            .await
            .map_err(|e| e.to_string())?;
        let mut scanner = ReplyScanner::new();
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            if let Some(r) = scanner.scan(&self.buf).map_err(|e| e.to_string())? {
                return Ok(self.buf.split_to(r.len));
            }
            resp::reserve_for_read(&mut self.buf);
            let n = tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf))
                .await
                .map_err(|_| format!("no reply within {}s", self.timeout.as_secs()))?
                .map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("the server closed the connection".into());
            }
        }
    }
}

async fn authenticate(s: &mut Session, c: &Credential, steps: &mut Vec<Step>) -> bool {
    let reply = s
        .call(&[
            b"AUTH",
            c.username.as_bytes(),
            c.password.expose().as_bytes(),
        ])
        .await;
    match reply {
        Ok(r) => match resp::error_text(&r) {
            None => {
                steps.push(Step::ok(
                    "auth",
                    format!("AUTH as `{}` accepted", c.username),
                ));
                true
            }
            Some(e) => {
                steps.push(Step::fail(
                    "auth",
                    format!("AUTH as `{}`: {e}", c.username),
                    verdict::auth_hint(&e, &c.username),
                ));
                false
            }
        },
        Err(e) => {
            steps.push(Step::fail("auth", e, "the connection failed during AUTH"));
            false
        }
    }
}

/// `HELLO 3`; `Some(clustered)` when it passed.
async fn hello(s: &mut Session, user: &str, steps: &mut Vec<Step>) -> Option<bool> {
    let reply = match s.call(&[b"HELLO", b"3"]).await {
        Ok(r) => r,
        Err(e) => {
            steps.push(Step::fail("hello", e, "the connection failed during HELLO"));
            return None;
        }
    };
    if let Some(e) = resp::error_text(&reply) {
        let hint = verdict::auth_hint(&e, user);
        steps.push(Step::fail("hello", format!("HELLO 3: {e}"), hint));
        return None;
    }
    let fields = map_fields(resp::decode_reply(&reply));
    let get = |k: &str| {
        fields
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| "?".into())
    };
    let mode = get("mode");
    steps.push(Step::ok(
        "hello",
        format!(
            "{} {}, RESP{}, mode {mode}",
            get("server"),
            get("version"),
            get("proto")
        ),
    ));
    Some(mode == "cluster")
}

/// A RESP3 map (or RESP2 flat array) of simple values as (key, text) pairs.
fn map_fields(frame: Option<F>) -> Vec<(String, String)> {
    let text = |f: &F| match f {
        F::BlobString { data, .. } | F::SimpleString { data, .. } => {
            String::from_utf8_lossy(data).into_owned()
        }
        F::Number { data, .. } => data.to_string(),
        _ => String::new(),
    };
    match frame {
        Some(F::Map { data, .. }) => data.iter().map(|(k, v)| (text(k), text(v))).collect(),
        Some(F::Array { data, .. }) => data
            .chunks(2)
            .filter(|p| p.len() == 2)
            .map(|p| (text(&p[0]), text(&p[1])))
            .collect(),
        _ => Vec::new(),
    }
}

async fn cluster(s: &mut Session, clustered: bool, steps: &mut Vec<Step>) {
    if !clustered {
        steps.push(Step::ok(
            "cluster",
            "not clustered (one endpoint serves every key)",
        ));
        return;
    }
    match s.call(&[b"CLUSTER", b"SLOTS"]).await {
        Ok(r) => {
            if let Some(e) = resp::error_text(&r) {
                steps.push(Step::fail(
                    "cluster",
                    format!("CLUSTER SLOTS: {e}"),
                    "the proxy reads the topology with CLUSTER SLOTS: the access policy must allow it",
                ));
                return;
            }
            let mut primaries = Vec::new();
            if let Some(F::Array { data, .. }) = resp::decode_reply(&r) {
                for range in &data {
                    if let F::Array { data: parts, .. } = range {
                        if let Some(F::Array { data: node, .. }) = parts.get(2) {
                            let host = node.first().map(frame_text).unwrap_or_default();
                            let port = node.get(1).map(frame_text).unwrap_or_default();
                            primaries.push(format!("{host}:{port}"));
                        }
                    }
                }
            }
            steps.push(Step::ok("cluster", verdict::shard_summary(&primaries)));
        }
        Err(e) => steps.push(Step::fail("cluster", e, "the connection failed")),
    }
}

fn frame_text(f: &F) -> String {
    match f {
        F::BlobString { data, .. } | F::SimpleString { data, .. } => {
            String::from_utf8_lossy(data).into_owned()
        }
        F::Number { data, .. } => data.to_string(),
        _ => String::new(),
    }
}

/// May `user` run what the proxy needs? ACL DRYRUN where the identity may run it;
/// otherwise the harmless commands themselves.
async fn acl(s: &mut Session, user: &str, clustered: bool, steps: &mut Vec<Step>) {
    let mut needed: Vec<&[&str]> = NEEDED.to_vec();
    if clustered {
        needed.extend_from_slice(NEEDED_CLUSTER);
    }
    let mut denied = Vec::new();
    let mut how = "ACL DRYRUN";
    for cmd in &needed {
        let mut args: Vec<&[u8]> = vec![b"ACL", b"DRYRUN", user.as_bytes()];
        args.extend(cmd.iter().map(|a| a.as_bytes()));
        let reply = match s.call(&args).await {
            Ok(r) => r,
            Err(e) => {
                steps.push(Step::fail("acl", e, "the connection failed"));
                return;
            }
        };
        let verdict = match resp::error_text(&reply) {
            // ACL DRYRUN itself not allowed (an identity without @admin):
            // run the command instead (each is harmless).
            Some(e) if e.starts_with("NOPERM") || e.contains("unknown") => {
                how = "running them (ACL DRYRUN is not allowed to this identity)";
                let direct: Vec<&[u8]> = cmd.iter().map(|a| a.as_bytes()).collect();
                match s.call(&direct).await {
                    Ok(r) => resp::error_text(&r).filter(|e| e.starts_with("NOPERM")),
                    Err(e) => {
                        steps.push(Step::fail("acl", e, "the connection failed"));
                        return;
                    }
                }
            }
            Some(e) => Some(e),
            // DRYRUN answers +OK, or a bulk string saying why not.
            None if reply.starts_with(b"+OK") => None,
            None => Some(frame_text(&resp::decode_reply(&reply).unwrap_or(F::Null))),
        };
        if let Some(why) = verdict {
            denied.push(format!("{} ({why})", cmd.join(" ")));
        }
    }
    let names: Vec<String> = needed.iter().map(|c| c.join(" ")).collect();
    if denied.is_empty() {
        steps.push(Step::ok(
            "acl",
            format!("allowed, checked by {how}: {}", names.join(", ")),
        ));
    } else {
        steps.push(Step::fail(
            "acl",
            format!("denied, checked by {how}: {}", denied.join("; ")),
            format!(
                "NOPERM: the access policy of `{user}` is too narrow for the proxy: allow {}",
                names.join(", ")
            ),
        ));
    }
}

async fn latency(s: &mut Session, steps: &mut Vec<Step>) {
    let started = Instant::now();
    match s.call(&[b"PING"]).await {
        Ok(r) if resp::error_text(&r).is_none() => steps.push(Step::ok(
            "latency",
            format!("PING round trip {}", millis(started.elapsed())),
        )),
        Ok(r) => steps.push(Step::skip(
            "latency",
            format!("PING refused: {}", resp::error_text(&r).unwrap_or_default()),
        )),
        Err(e) => steps.push(Step::fail("latency", e, "the connection failed")),
    }
}

fn millis(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// The report's header line.
pub fn header(cfg: &Config) -> String {
    format!(
        "redis-entra-proxy check: {}:{} (TLS name {}), auth {}",
        cfg.upstream.host,
        cfg.upstream.port,
        cfg.tls_server_name(),
        match cfg.auth.source {
            AuthSource::Entra => format!(
                "entra ({})",
                auth::entra::kind_name(cfg.auth.entra.credential)
            ),
            AuthSource::Static => "static".into(),
        }
    )
}

/// Whether every step passed (skips are not failures).
pub fn passed(steps: &[Step]) -> bool {
    !steps
        .iter()
        .any(|s| matches!(s.outcome, Outcome::Fail { .. }))
}
