//! A token-endpoint emulator for the tests: the HTTP shapes Azure hands out Entra
//! tokens through (IMDS, App Service, Arc, Cloud Shell, Entra v2), on loopback
//! only, minting unsigned JWT-shaped tokens.
//!
//! - IMDS: `GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=R`
//!   with `Metadata: true` ([`TokenEmulator::imds_endpoint`]).
//! - App Service / Functions / Container Apps: `GET /msi/token?api-version=2019-08-01&resource=R`
//!   with `X-IDENTITY-HEADER` ([`TokenEmulator::identity_endpoint`]), `expires_on`
//!   a string of Unix seconds.
//! - Azure Arc: `GET /arc/token?api-version=2020-06-01&resource=R` with
//!   `Metadata: true`, answered 401 with `WWW-Authenticate: Basic realm=<file>` (a
//!   key written to [`TokenEmulator::arc_key_dir`]), then a token for the request
//!   that carries `Authorization: Basic <key>` ([`TokenEmulator::arc_endpoint`]).
//! - Cloud Shell: `POST /cloudshell/token` with `Metadata: true` and the form
//!   `resource=R` ([`TokenEmulator::cloud_shell_endpoint`]).
//! - Entra v2: `POST /{tenant}/oauth2/v2.0/token`, form body with `client_id`,
//!   `scope`, `grant_type=client_credentials` and either `client_secret` or
//!   `client_assertion` (+ `client_assertion_type`), checked against the
//!   [`EmulatorConfig`] ([`TokenEmulator::authority_host`]).
//!
//! Every endpoint is served over plain http and over https with a CA generated at
//! start ([`TokenEmulator::ca_file`], for `auth.entra.ca_file`).
//!
//! [`EmulatorConfig::cache_for`] makes the managed-identity endpoints hand back the
//! token they issued last while it is younger than that, as IMDS and App Service
//! do. [`EmulatorConfig::client_public_key`] makes the Entra endpoint check that a
//! client assertion is an RS256 JWT signed by that key, for this tenant's token
//! URL and client. `az` and `azd` stand-ins for `PATH`: [`fake_cli`].
//!
//! Tokens: `header.payload.sig`, base64url, payload with `oid`, `tid`, `aud`, `iat`,
//! `nbf`, `exp`. Each token is a new generation 1, 2, 3, ... with its own
//! `oid = {oid_prefix}{generation}`, so a Redis test can make one ACL user per
//! generation. [`TokenEmulator::on_issue`] runs an async hook for each token before
//! the answer is sent; [`TokenEmulator::push_faults`] scripts failures.
//!
//! ```ignore
//! let emu = TokenEmulator::start(EmulatorConfig {
//!     lifetime: Duration::from_secs(5),
//!     ..Default::default()
//! })
//! .await;
//! emu.on_issue(|t: Issued| async move {
//!     // e.g. ACL SETUSER {t.oid} on >{t.token} ~* +@all
//! });
//! emu.push_faults([Fault::throttled(2), Fault::server_error()]);
//! // point auth.entra.imds_endpoint at emu.imds_endpoint() ...
//! let first = emu.wait_issued(1, Duration::from_secs(10)).await;
//! ```

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::tls::TestCa;

/// Path of the IMDS token endpoint.
pub const IMDS_PATH: &str = "/metadata/identity/oauth2/token";
/// Path of the App Service identity endpoint.
pub const APP_SERVICE_PATH: &str = "/msi/token";
/// Path of the Azure Arc identity endpoint.
pub const ARC_PATH: &str = "/arc/token";
/// Path of the Cloud Shell identity endpoint.
pub const CLOUD_SHELL_PATH: &str = "/cloudshell/token";
/// `client_assertion_type` of a federated (workload identity) assertion.
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// What the emulator accepts and issues.
#[derive(Clone, Debug)]
pub struct EmulatorConfig {
    /// Lifetime of each token (whole seconds are used).
    pub lifetime: Duration,
    /// Each token's `oid` is this prefix followed by its generation.
    pub oid_prefix: String,
    /// The tenant the Entra endpoint answers for (`/{tenant}/oauth2/v2.0/token`).
    pub tenant: String,
    /// The only `client_id` the Entra endpoint accepts.
    pub client_id: String,
    /// The client secret the Entra endpoint accepts.
    pub client_secret: String,
    /// The `X-IDENTITY-HEADER` value the App Service endpoint accepts.
    pub identity_header: String,
    /// If set, the only `client_assertion` accepted; otherwise any non-empty one.
    pub expected_assertion: Option<String>,
    /// If set, a `client_assertion` must be an RS256 JWT signed by this RSA public
    /// key (PKCS#1 DER), with `aud` this token URL and `iss` = `sub` = the client.
    pub client_public_key: Option<Vec<u8>>,
    /// If set, the managed-identity endpoints hand back their last token while it
    /// is younger than this.
    pub cache_for: Option<Duration>,
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        EmulatorConfig {
            lifetime: Duration::from_secs(3600),
            oid_prefix: "emu-oid-".into(),
            tenant: "emu-tenant".into(),
            client_id: "emu-client".into(),
            client_secret: "emu-client-secret".into(),
            identity_header: "emu-identity-header".into(),
            expected_assertion: None,
            client_public_key: None,
            cache_for: None,
        }
    }
}

/// Which endpoint a request reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Imds,
    AppService,
    Arc,
    CloudShell,
    Entra,
    /// Anything else (answered 404).
    Unknown,
}

/// A scripted answer for the next token request (any endpoint), taken in order
/// from the queue before normal answers resume.
#[derive(Clone, Debug)]
pub enum Fault {
    /// Answer this status with this body and optional `Retry-After` (seconds).
    Status {
        status: u16,
        retry_after: Option<u64>,
        body: String,
    },
    /// Wait this long, then answer normally, unless the client hung up meanwhile
    /// (then nothing is issued).
    Slow(Duration),
    /// `200 OK` with a body that is not JSON.
    MalformedJson,
    /// Read the request, then close the connection without answering.
    DropConnection,
    /// Issue a token whose payload has no `oid` claim.
    NoOid,
}

impl Fault {
    /// 429 with `Retry-After: secs`.
    pub fn throttled(secs: u64) -> Fault {
        Fault::Status {
            status: 429,
            retry_after: Some(secs),
            body: r#"{"error":"too_many_requests","error_description":"emulated throttling"}"#
                .into(),
        }
    }

    /// 500.
    pub fn server_error() -> Fault {
        Fault::Status {
            status: 500,
            retry_after: None,
            body: r#"{"error":"server_error","error_description":"emulated failure"}"#.into(),
        }
    }

    /// 410, as IMDS answers while it is being upgraded.
    pub fn gone() -> Fault {
        Fault::Status {
            status: 410,
            retry_after: None,
            body: "IMDS is being upgraded (emulated)".into(),
        }
    }

    /// 401 `invalid_client`, as Entra answers a wrong secret.
    pub fn unauthorized() -> Fault {
        Fault::Status {
            status: 401,
            retry_after: None,
            body: r#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided (emulated)."}"#.into(),
        }
    }

    /// 400 `invalid_request`.
    pub fn bad_request() -> Fault {
        Fault::Status {
            status: 400,
            retry_after: None,
            body: r#"{"error":"invalid_request","error_description":"emulated bad request"}"#
                .into(),
        }
    }
}

/// A token the emulator issued. `Debug` does not print the token.
#[derive(Clone)]
pub struct Issued {
    /// 1 for the first token, then 2, 3, ...
    pub generation: u64,
    /// The token's `oid` claim (`{oid_prefix}{generation}`), or empty for [`Fault::NoOid`].
    pub oid: String,
    /// The token itself (what the proxy must send as the AUTH password).
    pub token: String,
    /// When it was minted (its `iat` claim is this, in whole seconds).
    pub issued_at: SystemTime,
    /// `exp`.
    pub expires_at: SystemTime,
    /// Which endpoint issued it.
    pub endpoint: Endpoint,
}

impl fmt::Debug for Issued {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issued")
            .field("generation", &self.generation)
            .field("oid", &self.oid)
            .field("expires_at", &self.expires_at)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

/// One request as the emulator received it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub endpoint: Endpoint,
    pub method: String,
    pub path: String,
    /// Query parameters.
    pub query: HashMap<String, String>,
    /// Headers, names lower-cased.
    pub headers: HashMap<String, String>,
    /// Form fields of a POST body.
    pub form: HashMap<String, String>,
    /// Whether it came over https.
    pub tls: bool,
    /// The status answered (0: connection dropped or client gone).
    pub status: u16,
}

type Hook = Arc<dyn Fn(Issued) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

struct State {
    cfg: Mutex<EmulatorConfig>,
    faults: Mutex<VecDeque<Fault>>,
    issued: Mutex<Vec<Issued>>,
    requests: Mutex<Vec<RecordedRequest>>,
    hook: Mutex<Option<Hook>>,
    /// Number of tokens issued, for waiters.
    issued_tx: watch::Sender<u64>,
    /// Number of requests answered (or dropped), for waiters.
    requests_tx: watch::Sender<usize>,
    /// Where Arc challenge keys are written, and the last one.
    arc_keys: PathBuf,
    arc_key: Mutex<Option<String>>,
    /// The https port (the Entra token URL an assertion must name).
    https_port: Mutex<u16>,
}

/// The running emulator. Stops serving when dropped.
pub struct TokenEmulator {
    http: SocketAddr,
    https: SocketAddr,
    ca: PathBuf,
    state: Arc<State>,
    tasks: Vec<JoinHandle<()>>,
    arc_keys: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for TokenEmulator {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl TokenEmulator {
    /// Start on two ephemeral loopback ports (http and https).
    pub async fn start(cfg: EmulatorConfig) -> TokenEmulator {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = TestCa::new(dir.path(), "token-emulator", &["localhost", "127.0.0.1"]);
        let acceptor = tokio_rustls::TlsAcceptor::from(ca.server_config());
        let http_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind http");
        let https_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind https");
        let arc_keys = dir.path().join("arc-tokens");
        std::fs::create_dir(&arc_keys).expect("arc key dir");
        let state = Arc::new(State {
            cfg: Mutex::new(cfg),
            faults: Mutex::new(VecDeque::new()),
            issued: Mutex::new(Vec::new()),
            requests: Mutex::new(Vec::new()),
            hook: Mutex::new(None),
            issued_tx: watch::channel(0).0,
            requests_tx: watch::channel(0).0,
            arc_keys: arc_keys.clone(),
            arc_key: Mutex::new(None),
            https_port: Mutex::new(0),
        });
        let http = http_listener.local_addr().unwrap();
        let https = https_listener.local_addr().unwrap();
        *state.https_port.lock().unwrap() = https.port();
        let s1 = state.clone();
        let t1 = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = http_listener.accept().await else {
                    continue;
                };
                let s = s1.clone();
                tokio::spawn(async move { serve(stream, false, s).await });
            }
        });
        let s2 = state.clone();
        let t2 = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = https_listener.accept().await else {
                    continue;
                };
                let s = s2.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(stream).await {
                        serve(tls, true, s).await;
                    }
                });
            }
        });
        TokenEmulator {
            http,
            https,
            ca: ca.ca_pem,
            state,
            tasks: vec![t1, t2],
            arc_keys,
            _dir: dir,
        }
    }

    /// The IMDS endpoint over plain http (for `auth.entra.imds_endpoint`).
    pub fn imds_endpoint(&self) -> String {
        format!("http://{}{IMDS_PATH}", self.http)
    }

    /// The IMDS endpoint over https (trust [`Self::ca_file`]).
    pub fn imds_endpoint_https(&self) -> String {
        format!("https://{}{IMDS_PATH}", self.https)
    }

    /// The App Service endpoint over plain http (for `IDENTITY_ENDPOINT`).
    pub fn identity_endpoint(&self) -> String {
        format!("http://{}{APP_SERVICE_PATH}", self.http)
    }

    /// The Azure Arc endpoint over plain http (for `IDENTITY_ENDPOINT`, with
    /// `IMDS_ENDPOINT` set).
    pub fn arc_endpoint(&self) -> String {
        format!("http://{}{ARC_PATH}", self.http)
    }

    /// The directory the Arc challenge keys are written to (for
    /// `auth.entra.arc_key_directory`).
    pub fn arc_key_dir(&self) -> &Path {
        &self.arc_keys
    }

    /// The Cloud Shell endpoint over plain http (for `MSI_ENDPOINT`).
    pub fn cloud_shell_endpoint(&self) -> String {
        format!("http://{}{CLOUD_SHELL_PATH}", self.http)
    }

    /// Make the managed-identity endpoints cache (see [`EmulatorConfig::cache_for`]).
    pub fn set_cache_for(&self, d: Option<Duration>) {
        self.state.cfg.lock().unwrap().cache_for = d;
    }

    /// The `IDENTITY_HEADER` value the App Service endpoint accepts.
    pub fn identity_header(&self) -> String {
        self.state.cfg.lock().unwrap().identity_header.clone()
    }

    /// The Entra authority over https (for `auth.entra.authority_host` /
    /// `AZURE_AUTHORITY_HOST`; trust [`Self::ca_file`]).
    pub fn authority_host(&self) -> String {
        format!("https://{}", self.https)
    }

    /// The Entra authority over plain http.
    pub fn authority_host_http(&self) -> String {
        format!("http://{}", self.http)
    }

    /// PEM file of the CA that signed the https certificate (for `auth.entra.ca_file`).
    pub fn ca_file(&self) -> &Path {
        &self.ca
    }

    /// The configuration in force (tenant, client id, secret, ...).
    pub fn config(&self) -> EmulatorConfig {
        self.state.cfg.lock().unwrap().clone()
    }

    /// Change the lifetime of the tokens issued from now on.
    pub fn set_lifetime(&self, lifetime: Duration) {
        self.state.cfg.lock().unwrap().lifetime = lifetime;
    }

    /// Accept only this `client_assertion` from now on (`None`: any non-empty one).
    pub fn expect_assertion(&self, assertion: Option<&str>) {
        self.state.cfg.lock().unwrap().expected_assertion = assertion.map(str::to_string);
    }

    /// Queue faults: the next token requests get them, in order, before normal
    /// answers resume.
    pub fn push_faults(&self, faults: impl IntoIterator<Item = Fault>) {
        self.state.faults.lock().unwrap().extend(faults);
    }

    /// Faults still queued.
    pub fn pending_faults(&self) -> usize {
        self.state.faults.lock().unwrap().len()
    }

    /// Run `hook` for every token issued, before its answer is sent (the client
    /// receives the token only after the hook's future completes).
    pub fn on_issue<F, Fut>(&self, hook: F)
    where
        F: Fn(Issued) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let hook: Hook = Arc::new(move |t| Box::pin(hook(t)));
        *self.state.hook.lock().unwrap() = Some(hook);
    }

    /// Every token issued so far, in order.
    pub fn issued(&self) -> Vec<Issued> {
        self.state.issued.lock().unwrap().clone()
    }

    /// Every request received so far, in order of completion.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state.requests.lock().unwrap().clone()
    }

    /// How many requests have been handled (answered or dropped).
    pub fn request_count(&self) -> usize {
        *self.state.requests_tx.borrow()
    }

    /// Wait until generation `generation` has been issued; panics after `limit`.
    pub async fn wait_issued(&self, generation: u64, limit: Duration) -> Issued {
        let mut rx = self.state.issued_tx.subscribe();
        tokio::time::timeout(limit, rx.wait_for(|n| *n >= generation))
            .await
            .unwrap_or_else(|_| panic!("token generation {generation} not issued within {limit:?}"))
            .expect("emulator state alive");
        self.issued()[generation as usize - 1].clone()
    }

    /// Wait until `n` requests have been handled; panics after `limit`.
    pub async fn wait_requests(&self, n: usize, limit: Duration) {
        let mut rx = self.state.requests_tx.subscribe();
        tokio::time::timeout(limit, rx.wait_for(|c| *c >= n))
            .await
            .unwrap_or_else(|_| panic!("{n} token requests not seen within {limit:?}"))
            .expect("emulator state alive");
    }
}

// ---- the server side ----

struct Request {
    method: String,
    path: String,
    query: HashMap<String, String>,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

const MAX_HEAD: usize = 64 * 1024;

async fn read_request<S: AsyncRead + Unpin>(stream: &mut S) -> Option<Request> {
    let mut buf = Vec::with_capacity(4096);
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > MAX_HEAD {
            return None;
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = std::str::from_utf8(&buf[..head_end]).ok()?;
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_string();
    let target = first.next()?.to_string();
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if len > MAX_HEAD {
        return None;
    }
    let mut body = buf[head_end..].to_vec();
    while body.len() < len {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(len);
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), parse_pairs(q.as_bytes())),
        None => (target, HashMap::new()),
    };
    Some(Request {
        method,
        path,
        query,
        headers,
        body,
    })
}

fn parse_pairs(s: &[u8]) -> HashMap<String, String> {
    form_urlencoded::parse(s).into_owned().collect()
}

struct Answer {
    status: u16,
    retry_after: Option<u64>,
    body: String,
    headers: Vec<(String, String)>,
}

fn answer(status: u16, body: impl Into<String>) -> Answer {
    Answer {
        status,
        retry_after: None,
        body: body.into(),
        headers: Vec::new(),
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        410 => "Gone",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

async fn write_answer<S: AsyncWrite + Unpin>(stream: &mut S, a: &Answer) {
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        a.status,
        reason(a.status),
        a.body.len()
    );
    if let Some(s) = a.retry_after {
        head.push_str(&format!("Retry-After: {s}\r\n"));
    }
    for (k, v) in &a.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(a.body.as_bytes()).await;
    let _ = stream.flush().await;
    let _ = stream.shutdown().await;
}

fn endpoint_of(req: &Request) -> Endpoint {
    if req.path == IMDS_PATH {
        Endpoint::Imds
    } else if req.path == APP_SERVICE_PATH {
        Endpoint::AppService
    } else if req.path == ARC_PATH {
        Endpoint::Arc
    } else if req.path == CLOUD_SHELL_PATH {
        Endpoint::CloudShell
    } else if req.path.ends_with("/oauth2/v2.0/token") {
        // Any tenant reaches the Entra handler, which refuses a wrong one.
        Endpoint::Entra
    } else {
        Endpoint::Unknown
    }
}

/// Check a request against the endpoint's contract: `Err` is the refusal a real
/// endpoint would give; `Ok` the resource/scope to put in the token's `aud`.
fn validate(
    ep: Endpoint,
    req: &Request,
    cfg: &EmulatorConfig,
    state: &State,
) -> Result<String, Answer> {
    let q = |k: &str| req.query.get(k).map(String::as_str);
    match ep {
        Endpoint::Arc => {
            if req.headers.get("metadata").map(String::as_str) != Some("true")
                || q("api-version") != Some("2020-06-01")
            {
                return Err(answer(
                    400,
                    r#"{"error":"invalid_request","error_description":"metadata header and api-version 2020-06-01 required"}"#,
                ));
            }
            let expected = state.arc_key.lock().unwrap().clone();
            let given = req
                .headers
                .get("authorization")
                .and_then(|v| v.strip_prefix("Basic "));
            match (expected, given) {
                (Some(k), Some(g)) if k == g => {}
                _ => {
                    // A new challenge: a fresh key in the agent's directory.
                    let key = format!("{:032x}", fastrand::u128(..));
                    let path = state.arc_keys.join(format!("{}.key", fastrand::u64(..)));
                    std::fs::write(&path, &key).expect("write arc key");
                    *state.arc_key.lock().unwrap() = Some(key);
                    let mut a = answer(401, r#"{"error":"unauthorized"}"#);
                    a.headers.push((
                        "WWW-Authenticate".into(),
                        format!("Basic realm={}", path.display()),
                    ));
                    return Err(a);
                }
            }
            q("resource")
                .map(str::to_string)
                .ok_or_else(|| answer(400, r#"{"error":"invalid_request"}"#))
        }
        Endpoint::CloudShell => {
            if req.method != "POST"
                || req.headers.get("metadata").map(String::as_str) != Some("true")
            {
                return Err(answer(
                    400,
                    r#"{"error":"invalid_request","error_description":"POST with metadata header required"}"#,
                ));
            }
            let form = parse_pairs(&req.body);
            form.get("resource").cloned().ok_or_else(|| {
                answer(
                    400,
                    r#"{"error":"invalid_request","error_description":"resource is required"}"#,
                )
            })
        }
        Endpoint::Imds => {
            if req.method != "GET" {
                return Err(answer(405, r#"{"error":"method_not_allowed"}"#));
            }
            if req.headers.get("metadata").map(String::as_str) != Some("true") {
                return Err(answer(
                    400,
                    r#"{"error":"invalid_request","error_description":"Required metadata header not specified"}"#,
                ));
            }
            // 2018-02-01 by hand, 2019-08-01 from azure_identity.
            if !matches!(q("api-version"), Some("2018-02-01" | "2019-08-01")) {
                return Err(answer(
                    400,
                    r#"{"error":"invalid_request","error_description":"Missing or unsupported api-version"}"#,
                ));
            }
            q("resource").map(str::to_string).ok_or_else(|| {
                answer(
                    400,
                    r#"{"error":"invalid_request","error_description":"Required audience parameter not specified"}"#,
                )
            })
        }
        Endpoint::AppService => {
            if req.headers.get("x-identity-header") != Some(&cfg.identity_header) {
                return Err(answer(
                    401,
                    r#"{"statusCode":401,"message":"Unauthorized: missing or wrong X-IDENTITY-HEADER"}"#,
                ));
            }
            if q("api-version") != Some("2019-08-01") {
                return Err(answer(
                    400,
                    r#"{"statusCode":400,"message":"Unsupported api-version"}"#,
                ));
            }
            q("resource").map(str::to_string).ok_or_else(|| {
                answer(
                    400,
                    r#"{"statusCode":400,"message":"resource is required"}"#,
                )
            })
        }
        Endpoint::Entra => {
            if req.method != "POST" {
                return Err(answer(405, r#"{"error":"method_not_allowed"}"#));
            }
            if req.path != format!("/{}/oauth2/v2.0/token", cfg.tenant) {
                return Err(answer(
                    400,
                    r#"{"error":"invalid_request","error_description":"AADSTS90002: Tenant not found (emulated)."}"#,
                ));
            }
            let ct = req
                .headers
                .get("content-type")
                .map(String::as_str)
                .unwrap_or("");
            if !ct.starts_with("application/x-www-form-urlencoded") {
                return Err(answer(
                    400,
                    r#"{"error":"invalid_request","error_description":"AADSTS900144: form body expected (emulated)."}"#,
                ));
            }
            let form = parse_pairs(&req.body);
            let f = |k: &str| form.get(k).map(String::as_str);
            if f("grant_type") != Some("client_credentials") {
                return Err(answer(
                    400,
                    r#"{"error":"unsupported_grant_type","error_description":"AADSTS70003 (emulated)"}"#,
                ));
            }
            if f("client_id") != Some(cfg.client_id.as_str()) {
                return Err(answer(
                    400,
                    r#"{"error":"unauthorized_client","error_description":"AADSTS700016: Application not found in the directory (emulated)."}"#,
                ));
            }
            let Some(scope) = f("scope") else {
                return Err(answer(
                    400,
                    r#"{"error":"invalid_request","error_description":"AADSTS900144: scope is required (emulated)."}"#,
                ));
            };
            let secret_ok = f("client_secret") == Some(cfg.client_secret.as_str());
            let token_url = format!(
                "https://127.0.0.1:{}/{}/oauth2/v2.0/token",
                state.https_port.lock().unwrap(),
                cfg.tenant
            );
            let assertion_ok = f("client_assertion_type") == Some(JWT_BEARER)
                && f("client_assertion").is_some_and(|a| {
                    !a.is_empty()
                        && cfg
                            .expected_assertion
                            .as_deref()
                            .is_none_or(|expected| a == expected)
                        && cfg.client_public_key.as_deref().is_none_or(|key| {
                            assertion_signed_by(a, key, &token_url, &cfg.client_id)
                        })
                });
            if !(secret_ok || assertion_ok) {
                return Err(answer(
                    401,
                    r#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret or assertion (emulated)."}"#,
                ));
            }
            Ok(scope.trim_end_matches("/.default").to_string())
        }
        Endpoint::Unknown => Err(answer(404, r#"{"error":"not_found"}"#)),
    }
}

fn b64(s: &str) -> String {
    URL_SAFE_NO_PAD.encode(s)
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn mint(state: &State, ep: Endpoint, aud: &str, with_oid: bool) -> Issued {
    let cfg = state.cfg.lock().unwrap().clone();
    let mut issued = state.issued.lock().unwrap();
    let generation = issued.len() as u64 + 1;
    let issued_at = SystemTime::now();
    let now = unix(issued_at);
    let exp = now + cfg.lifetime.as_secs().max(1);
    let oid = if with_oid {
        format!("{}{generation}", cfg.oid_prefix)
    } else {
        String::new()
    };
    let mut payload = serde_json::json!({
        "aud": aud,
        "iss": format!("https://sts.windows.net/{}/", cfg.tenant),
        "iat": now,
        "nbf": now,
        "exp": exp,
        "tid": cfg.tenant,
        "appid": cfg.client_id,
        "uti": format!("gen{generation}-{:016x}", fastrand::u64(..)),
    });
    if with_oid {
        payload["oid"] = oid.clone().into();
        payload["sub"] = oid.clone().into();
    }
    let sig: Vec<u8> = (0..32).map(|_| fastrand::u8(..)).collect();
    let token = format!(
        "{}.{}.{}",
        b64(r#"{"typ":"JWT","alg":"RS256","kid":"token-emulator"}"#),
        b64(&payload.to_string()),
        URL_SAFE_NO_PAD.encode(sig)
    );
    let t = Issued {
        generation,
        oid,
        token,
        issued_at,
        expires_at: UNIX_EPOCH + Duration::from_secs(exp),
        endpoint: ep,
    };
    issued.push(t.clone());
    t
}

fn token_body(ep: Endpoint, t: &Issued, aud: &str, client_id: &str) -> String {
    let exp = unix(t.expires_at);
    let iat = unix(t.issued_at);
    // Whole seconds left now (after the hook): never more than the token really has.
    let lifetime = t
        .expires_at
        .duration_since(SystemTime::now())
        .unwrap_or_default()
        .as_secs();
    let v = match ep {
        Endpoint::Imds => serde_json::json!({
            "access_token": t.token,
            "client_id": client_id,
            "expires_in": lifetime.to_string(),
            "expires_on": exp.to_string(),
            "ext_expires_in": lifetime.to_string(),
            "not_before": iat.to_string(),
            "resource": aud,
            "token_type": "Bearer",
        }),
        Endpoint::Arc | Endpoint::CloudShell => serde_json::json!({
            "access_token": t.token,
            "expires_in": lifetime.to_string(),
            "expires_on": exp.to_string(),
            "not_before": iat.to_string(),
            "resource": aud,
            "token_type": "Bearer",
        }),
        Endpoint::AppService => serde_json::json!({
            "access_token": t.token,
            "expires_on": exp.to_string(),
            "resource": aud,
            "token_type": "Bearer",
            "client_id": client_id,
        }),
        _ => serde_json::json!({
            "token_type": "Bearer",
            "expires_in": lifetime,
            "ext_expires_in": lifetime,
            "access_token": t.token,
        }),
    };
    v.to_string()
}

/// Wait `d`, or less if the client closes the connection. True if it is still there.
async fn client_stays<S: AsyncRead + Unpin>(stream: &mut S, d: Duration) -> bool {
    let mut buf = [0u8; 64];
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        r = stream.read(&mut buf) => !matches!(r, Ok(0) | Err(_)),
    }
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, tls: bool, state: Arc<State>) {
    let Some(req) = read_request(&mut stream).await else {
        return;
    };
    let cfg = state.cfg.lock().unwrap().clone();
    let ep = endpoint_of(&req);
    let mut record = RecordedRequest {
        endpoint: ep,
        method: req.method.clone(),
        path: req.path.clone(),
        query: req.query.clone(),
        headers: req.headers.clone(),
        form: if req.method == "POST" {
            parse_pairs(&req.body)
        } else {
            HashMap::new()
        },
        tls,
        status: 0,
    };
    let status = handle(&mut stream, ep, &req, &cfg, &state).await;
    record.status = status;
    state.requests.lock().unwrap().push(record);
    state.requests_tx.send_modify(|n| *n += 1);
}

/// Answer one request; returns the status sent (0 if none).
async fn handle<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    ep: Endpoint,
    req: &Request,
    cfg: &EmulatorConfig,
    state: &Arc<State>,
) -> u16 {
    let fault = if ep == Endpoint::Unknown {
        None
    } else {
        state.faults.lock().unwrap().pop_front()
    };
    let mut with_oid = true;
    match fault {
        Some(Fault::Status {
            status,
            retry_after,
            body,
        }) => {
            write_answer(
                stream,
                &Answer {
                    status,
                    retry_after,
                    body,
                    headers: Vec::new(),
                },
            )
            .await;
            return status;
        }
        Some(Fault::DropConnection) => return 0,
        Some(Fault::MalformedJson) => {
            write_answer(stream, &answer(200, r#"{"access_token": "trunc"#)).await;
            return 200;
        }
        Some(Fault::Slow(d)) if !client_stays(stream, d).await => return 0,
        Some(Fault::NoOid) => with_oid = false,
        // Slow, and the client stayed: answer normally.
        Some(Fault::Slow(_)) | None => {}
    }
    let aud = match validate(ep, req, cfg, state) {
        Ok(aud) => aud,
        Err(a) => {
            write_answer(stream, &a).await;
            return a.status;
        }
    };
    if let Some(cached) = cached(state, ep, cfg) {
        let body = token_body(ep, &cached, &aud, &cfg.client_id);
        write_answer(stream, &answer(200, body)).await;
        return 200;
    }
    let issued = mint(state, ep, &aud, with_oid);
    let hook = state.hook.lock().unwrap().clone();
    if let Some(hook) = hook {
        hook(issued.clone()).await;
    }
    state.issued_tx.send_modify(|n| *n = issued.generation);
    let body = token_body(ep, &issued, &aud, &cfg.client_id);
    write_answer(stream, &answer(200, body)).await;
    200
}

/// The token a caching managed-identity endpoint hands back, if any.
fn cached(state: &State, ep: Endpoint, cfg: &EmulatorConfig) -> Option<Issued> {
    let keep = cfg.cache_for?;
    if !matches!(
        ep,
        Endpoint::Imds | Endpoint::AppService | Endpoint::Arc | Endpoint::CloudShell
    ) {
        return None;
    }
    let issued = state.issued.lock().unwrap();
    let last = issued.iter().rev().find(|t| t.endpoint == ep)?;
    (SystemTime::now() < last.issued_at + keep).then(|| last.clone())
}

/// Whether `assertion` is an RS256 JWT signed by `key` (PKCS#1 RSA public key DER)
/// for `aud` from `client`, and not expired.
fn assertion_signed_by(assertion: &str, key: &[u8], aud: &str, client: &str) -> bool {
    let mut parts = assertion.split('.');
    let (Some(h), Some(p), Some(sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let Ok(sig) = URL_SAFE_NO_PAD.decode(sig) else {
        return false;
    };
    let key =
        ring::signature::UnparsedPublicKey::new(&ring::signature::RSA_PKCS1_2048_8192_SHA256, key);
    if key.verify(format!("{h}.{p}").as_bytes(), &sig).is_err() {
        return false;
    }
    let header: serde_json::Value = match URL_SAFE_NO_PAD
        .decode(h)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
    {
        Some(v) => v,
        None => return false,
    };
    let claims: serde_json::Value = match URL_SAFE_NO_PAD
        .decode(p)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
    {
        Some(v) => v,
        None => return false,
    };
    let now = unix(SystemTime::now());
    header["alg"] == "RS256"
        && header["x5t"].is_string()
        && claims["aud"] == aud
        && claims["iss"] == client
        && claims["sub"] == client
        && claims["exp"].as_u64().is_some_and(|e| e > now)
        && claims["jti"].as_str().is_some_and(|j| !j.is_empty())
}

/// Write an executable stand-in for `az` or `azd` (`name`) into `dir`: it appends its
/// arguments and `HOME` to `{name}-args.log` there and prints `stdout` (exit 0) or
/// `stderr` (exit `exit`).
pub fn fake_cli(dir: &Path, name: &str, stdout: &str, stderr: &str, exit: i32) {
    use std::os::unix::fs::PermissionsExt;
    let log = dir.join(format!("{name}-args.log"));
    let script = format!(
        "#!/bin/sh\necho \"$@\" >> '{}'\necho \"HOME=$HOME\" >> '{}'\ncat <<'EOF'\n{stdout}\nEOF\ncat >&2 <<'EOF'\n{stderr}\nEOF\nexit {exit}\n",
        log.display(),
        log.display()
    );
    let path = dir.join(name);
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// `az account get-access-token -o json` output for `token` expiring at `exp`.
pub fn az_output(token: &str, exp: u64) -> String {
    format!(
        r#"{{"accessToken":"{token}","expiresOn":"2000-01-01 00:00:00.000000","expires_on":{exp},"subscription":"s","tenant":"t","tokenType":"Bearer"}}"#
    )
}

/// `azd auth token -o json` output for `token` expiring at `exp`.
pub fn azd_output(token: &str, exp: u64) -> String {
    let at = humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(exp));
    format!(r#"{{"token":"{token}","expiresOn":"{at}"}}"#)
}
