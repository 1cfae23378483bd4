//! The Entra token sources the rotator ([`super::rotator`]) calls: one request (or
//! one `az` run) per [`TokenSource::fetch`], no cache, no retry, so that each
//! refresh gets a genuinely new token and the rotator alone decides timing.
//! [`super::entra`] picks and configures one of them from `[auth.entra]`.
//!
//! Each source maps the endpoint's answer to a [`FetchError`] the rotator can act
//! on: 429 -> throttled (with `Retry-After`), 404/410/5xx -> transient server
//! error, 400/401/403 -> configuration error. Bodies of error answers are quoted,
//! shortened, in `last_error`; bodies of success answers never are (they hold the
//! token).

use super::entra::EntraEnv;
use super::jwt;
use super::rotator::{FetchError, FetchFuture, FetchedToken, TokenSource};
use super::AuthError;
use crate::config::describe_key;
use crate::secret::Secret;
use reqwest::header::{HeaderValue, ACCEPT, CONTENT_TYPE, RETRY_AFTER};
use reqwest::{Client, Url};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// IMDS API version (the one that takes `client_id`, `object_id`, `msi_res_id`).
pub const IMDS_API_VERSION: &str = "2018-02-01";
/// App Service / Functions / Container Apps identity API version.
pub const APP_SERVICE_API_VERSION: &str = "2019-08-01";
/// The largest token response body read; a token response is a few KB.
const MAX_BODY: usize = 1 << 20;
/// How much of an error body goes into `last_error`.
const MAX_DETAIL: usize = 300;

/// An HTTP client for token endpoints: rustls with the ring provider, the system
/// roots plus `ca_file`, no redirects (a redirected POST could carry a secret
/// elsewhere), and `proxy` (or none: the process proxy variables are not read
/// behind our back).
pub fn http_client(
    ca_file: Option<&Path>,
    proxy: Option<reqwest::Proxy>,
    connect_timeout: Duration,
) -> Result<Client, AuthError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if let Some(path) = ca_file {
        let key = describe_key("auth.entra.ca_file");
        let pem = std::fs::read(path)
            .map_err(|e| AuthError::Config(format!("cannot read {key} {}: {e}", path.display())))?;
        let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
            .collect::<Result<_, _>>()
            .map_err(|e| AuthError::Config(format!("{key} {} is not PEM: {e}", path.display())))?;
        if certs.is_empty() {
            return Err(AuthError::Config(format!(
                "{key} {} holds no certificate",
                path.display()
            )));
        }
        let (added, _) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err(AuthError::Config(format!(
                "{key} {}: no usable certificate",
                path.display()
            )));
        }
    }
    if roots.is_empty() {
        tracing::warn!(
            "no trusted root certificates found for the token endpoint (set auth.entra.ca_file)"
        );
    }
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| AuthError::Config(format!("TLS setup for the token endpoint: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut builder = Client::builder()
        .use_preconfigured_tls(tls)
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(connect_timeout)
        .user_agent(concat!("redis-entra-proxy/", env!("CARGO_PKG_VERSION")));
    if let Some(p) = proxy {
        builder = builder.proxy(p);
    }
    builder.build().map_err(|e| {
        AuthError::Config(format!("HTTP client for the token endpoint: {}", chain(&e)))
    })
}

/// The proxy for the Entra endpoint from `HTTPS_PROXY` / `NO_PROXY` (either case)
/// in `env`; none for a loopback endpoint.
pub fn proxy_from_env(env: &EntraEnv, target: &Url) -> Result<Option<reqwest::Proxy>, AuthError> {
    let loopback = matches!(target.host_str(), Some("localhost" | "127.0.0.1" | "[::1]"));
    let Some(url) = env.get("HTTPS_PROXY").or_else(|| env.get("https_proxy")) else {
        return Ok(None);
    };
    if loopback {
        return Ok(None);
    }
    let proxy = reqwest::Proxy::https(url)
        .map_err(|e| AuthError::Config(format!("HTTPS_PROXY is not a proxy URL: {e}")))?;
    let no_proxy = env
        .get("NO_PROXY")
        .or_else(|| env.get("no_proxy"))
        .and_then(reqwest::NoProxy::from_string);
    Ok(Some(proxy.no_proxy(no_proxy)))
}

/// Which user-assigned managed identity to ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManagedIdentityId {
    /// `auth.entra.client_id`.
    ClientId(String),
    /// `auth.entra.object_id`.
    ObjectId(String),
    /// `auth.entra.resource_id` (ARM resource id of the identity).
    ResourceId(String),
}

impl ManagedIdentityId {
    /// The id itself.
    pub fn value(&self) -> &str {
        match self {
            ManagedIdentityId::ClientId(v)
            | ManagedIdentityId::ObjectId(v)
            | ManagedIdentityId::ResourceId(v) => v,
        }
    }

    fn imds_param(&self) -> &'static str {
        match self {
            ManagedIdentityId::ClientId(_) => "client_id",
            ManagedIdentityId::ObjectId(_) => "object_id",
            ManagedIdentityId::ResourceId(_) => "msi_res_id",
        }
    }

    fn app_service_param(&self) -> &'static str {
        match self {
            ManagedIdentityId::ClientId(_) => "client_id",
            ManagedIdentityId::ObjectId(_) => "principal_id",
            ManagedIdentityId::ResourceId(_) => "mi_res_id",
        }
    }
}

fn describe_id(id: &Option<ManagedIdentityId>) -> String {
    match id {
        None => "system-assigned".into(),
        Some(id) => format!("user-assigned {}={}", id.imds_param(), id.value()),
    }
}

/// Managed identity through the Azure Instance Metadata Service (VMs, VM scale
/// sets, AKS node identity): `GET {endpoint}?api-version=2018-02-01&resource=...`
/// with `Metadata: true`.
pub struct ImdsSource {
    client: Client,
    url: Url,
    describe: String,
}

impl ImdsSource {
    /// A source asking `endpoint` for a token for `resource`.
    pub fn new(
        client: Client,
        endpoint: Url,
        resource: String,
        id: Option<ManagedIdentityId>,
    ) -> Self {
        let describe = format!("managed identity ({}, IMDS {endpoint})", describe_id(&id));
        let mut url = endpoint;
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("api-version", IMDS_API_VERSION);
            q.append_pair("resource", &resource);
            if let Some(id) = &id {
                q.append_pair(id.imds_param(), id.value());
            }
        }
        ImdsSource {
            client,
            url,
            describe,
        }
    }
}

impl TokenSource for ImdsSource {
    fn describe(&self) -> &str {
        &self.describe
    }

    fn fetch(&self) -> FetchFuture<'_> {
        Box::pin(async move {
            let started = SystemTime::now();
            let req = self
                .client
                .get(self.url.clone())
                .header("Metadata", "true")
                .header(ACCEPT, "application/json");
            let body = send(req).await?;
            parse_token(&body, started)
        })
    }
}

/// Managed identity on App Service, Functions and Container Apps:
/// `GET $IDENTITY_ENDPOINT?api-version=2019-08-01&resource=...` with
/// `X-IDENTITY-HEADER: $IDENTITY_HEADER`; `expires_on` is a string of Unix seconds.
pub struct AppServiceSource {
    client: Client,
    url: Url,
    header: Secret,
    describe: String,
}

impl AppServiceSource {
    /// A source asking `endpoint` (from `IDENTITY_ENDPOINT`) with `header`.
    pub fn new(
        client: Client,
        endpoint: Url,
        header: Secret,
        resource: String,
        id: Option<ManagedIdentityId>,
    ) -> Self {
        let describe = format!(
            "managed identity ({}, App Service IDENTITY_ENDPOINT {endpoint})",
            describe_id(&id)
        );
        let mut url = endpoint;
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("api-version", APP_SERVICE_API_VERSION);
            q.append_pair("resource", &resource);
            if let Some(id) = &id {
                q.append_pair(id.app_service_param(), id.value());
            }
        }
        AppServiceSource {
            client,
            url,
            header,
            describe,
        }
    }
}

impl TokenSource for AppServiceSource {
    fn describe(&self) -> &str {
        &self.describe
    }

    fn fetch(&self) -> FetchFuture<'_> {
        Box::pin(async move {
            let started = SystemTime::now();
            let mut header = HeaderValue::from_str(self.header.expose()).map_err(|_| {
                FetchError::Config("IDENTITY_HEADER is not a valid HTTP header value".into())
            })?;
            header.set_sensitive(true);
            let req = self
                .client
                .get(self.url.clone())
                .header("X-IDENTITY-HEADER", header)
                .header(ACCEPT, "application/json");
            let body = send(req).await?;
            parse_token(&body, started)
        })
    }
}

/// How an app proves itself to the Entra token endpoint.
#[derive(Debug, Clone)]
pub enum ClientCredential {
    /// Workload identity: the Kubernetes-issued token in this file, re-read for
    /// every exchange (kubelet rotates it), sent as `client_assertion`.
    FederatedTokenFile(PathBuf),
    /// A client secret (from the environment).
    Secret(Secret),
    /// A client secret in this file, re-read for every exchange (a rotated mounted
    /// secret is picked up).
    SecretFile(PathBuf),
}

/// The Entra v2 client-credentials grant: `POST {authority}/{tenant}/oauth2/v2.0/token`
/// with a client secret or a federated assertion. Used by `workload-identity` and
/// `client-secret`.
pub struct EntraTokenSource {
    client: Client,
    url: Url,
    client_id: String,
    scope: String,
    credential: ClientCredential,
    describe: String,
}

impl EntraTokenSource {
    /// A source for `client_id` in `tenant` asking `url` (the full token URL).
    pub fn new(
        kind: &'static str,
        client: Client,
        url: Url,
        tenant: String,
        client_id: String,
        scope: String,
        credential: ClientCredential,
    ) -> Self {
        let describe = format!("{kind} (tenant {tenant}, client {client_id}, {url})");
        EntraTokenSource {
            client,
            url,
            client_id,
            scope,
            credential,
            describe,
        }
    }
}

async fn read_file_secret(path: &Path, what: &str) -> Result<Secret, FetchError> {
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(|e| FetchError::Config(format!("cannot read {what} {}: {e}", path.display())))?;
    let value = text.trim();
    if value.is_empty() {
        return Err(FetchError::Config(format!(
            "{what} {} is empty",
            path.display()
        )));
    }
    Ok(Secret::new(value))
}

impl TokenSource for EntraTokenSource {
    fn describe(&self) -> &str {
        &self.describe
    }

    fn fetch(&self) -> FetchFuture<'_> {
        Box::pin(async move {
            let started = SystemTime::now();
            // Read files first: the form serializer cannot be held across an await.
            let (secret_field, secret) = match &self.credential {
                ClientCredential::FederatedTokenFile(path) => (
                    "client_assertion",
                    read_file_secret(
                        path,
                        "the federated token file (auth.entra.federated_token_file / AZURE_FEDERATED_TOKEN_FILE)",
                    )
                    .await?,
                ),
                ClientCredential::Secret(secret) => ("client_secret", secret.clone()),
                ClientCredential::SecretFile(path) => (
                    "client_secret",
                    read_file_secret(path, "auth.entra.client_secret_file").await?,
                ),
            };
            let body = zeroize::Zeroizing::new({
                let mut form = form_urlencoded::Serializer::new(String::new());
                form.append_pair("grant_type", "client_credentials")
                    .append_pair("client_id", &self.client_id)
                    .append_pair("scope", &self.scope);
                if secret_field == "client_assertion" {
                    form.append_pair(
                        "client_assertion_type",
                        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                    );
                }
                form.append_pair(secret_field, secret.expose());
                form.finish()
            });
            let req = self
                .client
                .post(self.url.clone())
                .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
                .header(ACCEPT, "application/json")
                .body(body.as_bytes().to_vec());
            let body = send(req).await?;
            parse_token(&body, started)
        })
    }
}

/// The Azure CLI (developer machines): `az account get-access-token --resource R
/// --output json`, run with the [`EntraEnv`] as its whole environment. Killed if the
/// attempt times out.
pub struct AzureCliSource {
    program: PathBuf,
    resource: String,
    tenant: Option<String>,
    env: EntraEnv,
    describe: String,
}

impl AzureCliSource {
    /// A source running `program` (the resolved `az`).
    pub fn new(program: PathBuf, resource: String, tenant: Option<String>, env: EntraEnv) -> Self {
        let describe = format!(
            "azure-cli ({} account get-access-token{})",
            program.display(),
            tenant
                .as_deref()
                .map(|t| format!(" --tenant {t}"))
                .unwrap_or_default()
        );
        AzureCliSource {
            program,
            resource,
            tenant,
            env,
            describe,
        }
    }
}

impl TokenSource for AzureCliSource {
    fn describe(&self) -> &str {
        &self.describe
    }

    fn fetch(&self) -> FetchFuture<'_> {
        Box::pin(async move {
            let mut cmd = tokio::process::Command::new(&self.program);
            cmd.args([
                "account",
                "get-access-token",
                "--resource",
                &self.resource,
                "--output",
                "json",
            ]);
            if let Some(t) = &self.tenant {
                cmd.args(["--tenant", t]);
            }
            cmd.env_clear()
                .envs(self.env.iter())
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true);
            let out = cmd.output().await.map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => {
                    FetchError::Config(format!("cannot run {}: not found", self.program.display()))
                }
                _ => FetchError::Network(format!("cannot run {}: {e}", self.program.display())),
            })?;
            if !out.status.success() {
                let stderr = shorten(&String::from_utf8_lossy(&out.stderr));
                let msg = format!("az exited with {}: {stderr}", out.status);
                // Not logged in, wrong tenant, consent missing: a person must act.
                let needs_login = ["az login", "AADSTS", "Please run"]
                    .iter()
                    .any(|m| stderr.contains(m));
                return Err(if needs_login {
                    FetchError::Config(msg)
                } else {
                    FetchError::Network(msg)
                });
            }
            // `expiresOn` is local time without a zone: use `expires_on`, else `exp`.
            parse_token(&out.stdout, SystemTime::now())
        })
    }
}

/// Send a request; the body of a success answer, or the error it maps to.
async fn send(req: reqwest::RequestBuilder) -> Result<Vec<u8>, FetchError> {
    let mut resp = req
        .send()
        .await
        .map_err(|e| FetchError::Network(chain(&e)))?;
    let status = resp.status();
    let retry_after = resp
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let mut body = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| FetchError::Network(chain(&e)))?
    {
        if body.len() + chunk.len() > MAX_BODY {
            return Err(FetchError::Malformed(format!(
                "the token endpoint answered HTTP {} with a body over {MAX_BODY} bytes",
                status.as_u16()
            )));
        }
        body.extend_from_slice(&chunk);
    }
    if status.is_success() {
        return Ok(body);
    }
    Err(classify(status.as_u16(), retry_after, error_detail(&body)))
}

/// Map an error status to what the rotator does about it.
pub fn classify(status: u16, retry_after: Option<Duration>, detail: String) -> FetchError {
    match status {
        429 => FetchError::Throttled {
            retry_after,
            detail,
        },
        // 404: IMDS before the identity is assigned; 410: IMDS during an upgrade
        // (documented as lasting up to 70 s); 408 and 5xx: the server's trouble.
        404 | 408 | 410 => FetchError::Server {
            status,
            retry_after,
            detail,
        },
        400..=499 => FetchError::Rejected { status, detail },
        _ => FetchError::Server {
            status,
            retry_after,
            detail,
        },
    }
}

/// The useful part of an error body: Entra's `error`/`error_description`, App
/// Service's `message`, or the text itself, shortened.
fn error_detail(body: &[u8]) -> String {
    if let Ok(v) = serde_json::from_slice::<Value>(body) {
        let field = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        let parts: Vec<String> = [
            field("error"),
            field("error_description"),
            field("message").or_else(|| field("Message")),
        ]
        .into_iter()
        .flatten()
        .collect();
        if !parts.is_empty() {
            return shorten(&parts.join(": "));
        }
    }
    let text = String::from_utf8_lossy(body);
    if text.trim().is_empty() {
        "(empty body)".into()
    } else {
        shorten(&text)
    }
}

fn shorten(s: &str) -> String {
    let flat: String = s
        .trim()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if flat.chars().count() <= MAX_DETAIL {
        flat
    } else {
        let cut: String = flat.chars().take(MAX_DETAIL).collect();
        format!("{cut}...")
    }
}

/// A number, or a string holding one (IMDS and App Service send strings).
fn seconds(v: Option<&Value>) -> Option<u64> {
    match v? {
        Value::Number(n) => n.as_u64().or_else(|| n.as_f64().map(|f| f.max(0.0) as u64)),
        Value::String(s) => s.trim().parse::<u64>().ok(),
        _ => None,
    }
}

/// Read a token response (the IMDS, App Service, Entra v2 and `az` shapes). Expiry
/// from `expires_in` (relative to `started`, immune to clock skew), else
/// `expires_on` (Unix seconds), else the token's `exp` claim. Errors never quote
/// the body.
pub fn parse_token(body: &[u8], started: SystemTime) -> Result<FetchedToken, FetchError> {
    let v: Value = serde_json::from_slice(body).map_err(|_| {
        FetchError::Malformed(
            "the token endpoint answered with success but the body is not JSON".into(),
        )
    })?;
    let token = ["access_token", "accessToken"]
        .iter()
        .find_map(|k| v.get(*k).and_then(Value::as_str))
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            FetchError::Malformed("the token endpoint's answer has no access_token".into())
        })?;
    let expires_at = if let Some(s) = seconds(v.get("expires_in")) {
        started + Duration::from_secs(s)
    } else if let Some(s) = seconds(v.get("expires_on")) {
        UNIX_EPOCH + Duration::from_secs(s)
    } else if let Some(exp) = jwt::claims(token).ok().and_then(|c| c.exp) {
        UNIX_EPOCH + Duration::from_secs(exp)
    } else {
        return Err(FetchError::Malformed(
            "the token endpoint's answer says nothing about when the token expires".into(),
        ));
    };
    Ok(FetchedToken {
        access_token: Secret::new(token),
        expires_at,
    })
}

/// An error and its causes, one line (reqwest puts the useful part in sources).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_response_shape() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        // IMDS: strings.
        let t = parse_token(
            br#"{"access_token":"tok","expires_in":"86399","expires_on":"1","resource":"https://redis.azure.com","token_type":"Bearer"}"#,
            t0,
        )
        .unwrap();
        assert_eq!(t.expires_at, t0 + Duration::from_secs(86_399));
        assert_eq!(t.access_token.expose(), "tok");
        // App Service 2019-08-01: expires_on only, a string of Unix seconds.
        let t = parse_token(br#"{"access_token":"tok","expires_on":"1700003600"}"#, t0).unwrap();
        assert_eq!(t.expires_at, t0 + Duration::from_secs(3600));
        // Entra v2: numbers.
        let t = parse_token(
            br#"{"access_token":"tok","expires_in":3599,"token_type":"Bearer"}"#,
            t0,
        )
        .unwrap();
        assert_eq!(t.expires_at, t0 + Duration::from_secs(3599));
        // az: accessToken + expires_on number, expiresOn ignored.
        let t = parse_token(
            br#"{"accessToken":"tok","expiresOn":"2023-11-14 23:13:20.000000","expires_on":1700003600,"tokenType":"Bearer"}"#,
            t0,
        )
        .unwrap();
        assert_eq!(t.expires_at, t0 + Duration::from_secs(3600));
        // Only the token's exp claim.
        use base64::Engine;
        let payload =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"exp":1700000042}"#);
        let body = format!(r#"{{"accessToken":"h.{payload}.s","expiresOn":"local"}}"#);
        let t = parse_token(body.as_bytes(), t0).unwrap();
        assert_eq!(t.expires_at, t0 + Duration::from_secs(42));
    }

    #[test]
    fn malformed_answers_never_quote_the_body() {
        for body in [
            &br#"{"access_token":"SECRETTOKEN""#[..],
            br#"{"access_token":"SECRETTOKEN"}"#,
            br#"{"token":"SECRETTOKEN","expires_in":5}"#,
            br#"<html>SECRETTOKEN</html>"#,
            br#"{"access_token":"","expires_in":5}"#,
        ] {
            let e = parse_token(body, SystemTime::now()).unwrap_err();
            assert_eq!(e.reason(), "malformed");
            assert!(!e.to_string().contains("SECRETTOKEN"), "{e}");
        }
    }

    #[test]
    fn statuses_map_to_actions() {
        let d = || String::from("x");
        assert_eq!(
            classify(429, Some(Duration::from_secs(3)), d()).reason(),
            "throttled"
        );
        assert_eq!(
            classify(429, Some(Duration::from_secs(3)), d()).retry_after(),
            Some(Duration::from_secs(3))
        );
        for s in [404, 408, 410, 500, 502, 503, 504] {
            let e = classify(s, None, d());
            assert_eq!(e.reason(), "server_error", "{s}");
            assert!(!e.is_config());
        }
        for s in [400, 401, 403, 405] {
            let e = classify(s, None, d());
            assert!(e.is_config(), "{s}");
            assert_eq!(e.reason(), "config");
        }
    }

    #[test]
    fn error_details_are_short_and_useful() {
        let d = error_detail(
            br#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided.","error_codes":[7000215]}"#,
        );
        assert_eq!(
            d,
            "invalid_client: AADSTS7000215: Invalid client secret provided."
        );
        let d = error_detail(br#"{"statusCode":400,"message":"No managed identity found"}"#);
        assert_eq!(d, "No managed identity found");
        let long = "x".repeat(5000);
        assert!(error_detail(long.as_bytes()).len() < MAX_DETAIL + 10);
        assert_eq!(error_detail(b""), "(empty body)");
        assert_eq!(error_detail(b"a\r\nb"), "a  b");
    }
}
