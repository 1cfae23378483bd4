//! HTTP for the Entra token sources ([`super::sources`], [`super::azure`]): one
//! reqwest client per source over rustls (ring provider, system roots plus
//! `auth.entra.ca_file`), and the transport handed to `azure_identity`'s
//! credentials ([`CrateTransport`]) so that every request the crate makes goes
//! through that client, at most once.
//!
//! The crate's pipeline retries some statuses and transport errors (IMDS up to 72 s)
//! and hides `Retry-After`. The rotator owns retries, so [`CrateTransport`] answers
//! every non-success status and every transport failure with an error kind the
//! crate's retry policy never retries, and records what the endpoint said
//! ([`Exchange`]): the source maps that to a [`FetchError`] with the status and
//! `Retry-After`, as the hand-written sources do.

use super::rotator::FetchError;
use super::AuthError;
use crate::config::describe_key;
use azure_core::http::headers::{HeaderName, HeaderValue, Headers};
use azure_core::http::{AsyncRawResponse, Body, HttpClient, Method, RawResponse, Request};
use reqwest::header::RETRY_AFTER;
use reqwest::{Client, Url};
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The largest token response body read; a token response is a few KB.
pub const MAX_BODY: usize = 1 << 20;
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
pub fn proxy_from_env(
    env: &super::EntraEnv,
    target: &Url,
) -> Result<Option<reqwest::Proxy>, AuthError> {
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

/// One answer from a token endpoint, body read (bounded).
pub struct Answer {
    pub status: u16,
    /// Response headers, names lower-cased (for `WWW-Authenticate`).
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
}

impl Answer {
    /// `Retry-After` in seconds, if the server sent one as a number.
    pub fn retry_after(&self) -> Option<Duration> {
        self.headers
            .get(RETRY_AFTER.as_str())
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map(Duration::from_secs)
    }

    /// The error this (non-success) answer maps to.
    pub fn error(&self) -> FetchError {
        tracing::debug!(
            status = self.status,
            body_bytes = self.body.len(),
            excerpt = %debug_excerpt(&self.body),
            "token endpoint error body (excerpt)"
        );
        classify(self.status, self.retry_after(), error_detail(&self.body))
    }
}

/// Send a request and read its answer whatever the status.
pub async fn exchange(req: reqwest::RequestBuilder) -> Result<Answer, FetchError> {
    let mut resp = req
        .send()
        .await
        .map_err(|e| FetchError::Network(chain(&e)))?;
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
        .collect();
    let mut body = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| FetchError::Network(chain(&e)))?
    {
        if body.len() + chunk.len() > MAX_BODY {
            return Err(FetchError::Malformed(format!(
                "the token endpoint answered HTTP {status} with a body over {MAX_BODY} bytes"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Answer {
        status,
        headers,
        body,
    })
}

/// Send a request; the body of a success answer, or the error it maps to.
pub async fn send(req: reqwest::RequestBuilder) -> Result<Vec<u8>, FetchError> {
    let answer = exchange(req).await?;
    if (200..300).contains(&answer.status) {
        Ok(answer.body)
    } else {
        Err(answer.error())
    }
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

/// The useful part of an error body, safe to show anywhere (client replies, logs,
/// probe bodies): Entra's `error` code and `error_description`, or App Service's
/// `message`, cleaned; never the raw body. A body that is not JSON is described
/// by its size only: an endpoint (or something in front of it) that echoes the
/// request would otherwise hand out its headers (App Service's
/// `X-IDENTITY-HEADER`). A description that seems to quote a secret is withheld.
/// The body itself goes to debug logs only, as [`debug_excerpt`].
pub fn error_detail(body: &[u8]) -> String {
    if let Ok(v) = serde_json::from_slice::<Value>(body) {
        let field = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        let code = field("error").map(|c| {
            let is_code = !c.is_empty()
                && c.len() <= 64
                && c.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
            if is_code {
                c
            } else {
                "(error code withheld: not a code)".into()
            }
        });
        let text = field("error_description")
            .or_else(|| field("message"))
            .or_else(|| field("Message"))
            .map(|t| {
                if quotes_a_secret(&t) {
                    "(description withheld: it quotes the request or a credential)".into()
                } else {
                    t
                }
            });
        let parts: Vec<String> = [code, text].into_iter().flatten().collect();
        if !parts.is_empty() {
            return shorten(&parts.join(": "));
        }
        return format!("a {}-byte JSON body without an error field", body.len());
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        "(empty body)".into()
    } else {
        format!(
            "a {}-byte body that is not JSON (not shown; see the debug log)",
            body.len()
        )
    }
}

/// Words that mark a text quoting a request or a credential.
const SECRET_MARKS: &[&str] = &[
    "x-identity-header",
    "authorization",
    "bearer ",
    "client_secret",
    "client_assertion",
    "secret=",
    "password",
    "eyj", // the start of a base64url JSON object: a JWT
    "metadata: true",
    "http/1.",
];

fn quotes_a_secret(text: &str) -> bool {
    let lower = text.to_ascii_lowercase();
    SECRET_MARKS.iter().any(|m| lower.contains(m))
}

/// The most of an error body a debug log line shows.
pub const MAX_EXCERPT: usize = 200;

/// A bounded, header-free excerpt of an error body for debug logs: lines shaped
/// like HTTP headers (`Name: value`) are dropped, and so is any line quoting a
/// secret; at most [`MAX_EXCERPT`] characters.
pub fn debug_excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let kept: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .filter(|l| !looks_like_a_header(l))
        .filter(|l| {
            let lower = l.to_ascii_lowercase();
            !SECRET_MARKS
                .iter()
                .filter(|m| **m != "http/1.")
                .any(|m| lower.contains(m))
        })
        .collect();
    let flat: String = kept
        .join(" | ")
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if flat.chars().count() <= MAX_EXCERPT {
        flat
    } else {
        let cut: String = flat.chars().take(MAX_EXCERPT).collect();
        format!("{cut}...")
    }
}

fn looks_like_a_header(line: &str) -> bool {
    match line.split_once(':') {
        Some((name, _)) => {
            !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        }
        None => false,
    }
}

/// One line, control characters blanked, at most a few hundred characters.
pub fn shorten(s: &str) -> String {
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

/// An error and its causes, one line (reqwest puts the useful part in sources).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// What the endpoint did with the last request a [`CrateTransport`] sent.
#[derive(Debug, Clone)]
pub enum Exchange {
    /// It answered this non-success status (the rotator's error, ready made).
    Refused(FetchError),
    /// The request never got an answer (refused, reset, DNS, TLS).
    Unreachable(String),
}

/// Requests to `from` (scheme, host, port and path) go to `to` instead, query
/// kept: how the crate's fixed IMDS address reaches `auth.entra.imds_endpoint`.
#[derive(Debug, Clone)]
pub struct Rewrite {
    pub from: Url,
    pub to: Url,
}

impl Rewrite {
    fn apply(&self, url: &Url) -> Option<Url> {
        let same = url.scheme() == self.from.scheme()
            && url.host_str() == self.from.host_str()
            && url.port_or_known_default() == self.from.port_or_known_default()
            && url.path() == self.from.path();
        if !same {
            return None;
        }
        let mut out = self.to.clone();
        out.set_query(url.query());
        Some(out)
    }
}

/// The transport given to the crate's credentials: sends through the source's
/// reqwest client, never lets the crate retry, and keeps the last failure in
/// [`Self::last`]. One per fetch (a fresh credential per fetch).
#[derive(Debug, Clone)]
pub struct CrateTransport {
    client: Client,
    rewrite: Option<Rewrite>,
    last: Arc<Mutex<Option<Exchange>>>,
}

impl CrateTransport {
    pub fn new(client: Client, rewrite: Option<Rewrite>) -> Self {
        CrateTransport {
            client,
            rewrite,
            last: Arc::new(Mutex::new(None)),
        }
    }

    /// The last failure seen, if any.
    pub fn last(&self) -> Option<Exchange> {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn record(&self, e: Exchange) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
    }
}

/// An error kind the crate's retry policy does not retry (it retries `Io` and
/// `Connection`).
fn final_error(message: String) -> azure_core::Error {
    azure_core::Error::with_message(azure_core::error::ErrorKind::Other, message)
}

#[async_trait::async_trait]
impl HttpClient for CrateTransport {
    async fn execute_request(&self, request: &Request) -> azure_core::Result<AsyncRawResponse> {
        let url = self
            .rewrite
            .as_ref()
            .and_then(|r| r.apply(request.url()))
            .unwrap_or_else(|| request.url().clone());
        let method = match request.method() {
            Method::Get => reqwest::Method::GET,
            Method::Post => reqwest::Method::POST,
            other => return Err(final_error(format!("unexpected method {other:?}"))),
        };
        let mut req = self.client.request(method, url);
        for (name, value) in request.headers().iter() {
            req = req.header(name.as_str(), value.as_str());
        }
        match request.body() {
            Body::Bytes(bytes) => {
                if !bytes.is_empty() {
                    req = req.body(bytes.to_vec());
                }
            }
            #[allow(unreachable_patterns)]
            _ => return Err(final_error("unexpected streamed request body".into())),
        }
        let answer = match exchange(req).await {
            Ok(a) => a,
            Err(e) => {
                let message = e.to_string();
                self.record(match e {
                    FetchError::Network(m) => Exchange::Unreachable(m),
                    other => Exchange::Refused(other),
                });
                return Err(final_error(message));
            }
        };
        if !(200..300).contains(&answer.status) {
            let err = answer.error();
            let message = err.to_string();
            self.record(Exchange::Refused(err));
            let headers = to_headers(&answer.headers);
            return Err(azure_core::Error::new(
                azure_core::error::ErrorKind::HttpResponse {
                    status: answer.status.into(),
                    error_code: None,
                    raw_response: Some(Box::new(RawResponse::from_bytes(
                        answer.status.into(),
                        headers,
                        answer.body,
                    ))),
                },
                message,
            ));
        }
        Ok(AsyncRawResponse::from_bytes(
            answer.status.into(),
            to_headers(&answer.headers),
            answer.body,
        ))
    }
}

fn to_headers(h: &HashMap<String, String>) -> Headers {
    h.iter()
        .map(|(k, v)| (HeaderName::from(k.clone()), HeaderValue::from(v.clone())))
        .collect::<HashMap<_, _>>()
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(error_detail(b"a\r\nb").contains("4-byte body that is not JSON"));
        let d = error_detail(br#"{"error":"a\r\nb"}"#);
        assert!(d.contains("withheld"), "{d}");
        let d = error_detail(br#"{"message":"line one\r\nline two"}"#);
        assert_eq!(d, "line one  line two");
    }

    /// An endpoint (or something in front of it) that echoes the request put the
    /// App Service identity header into the error, and from there into client
    /// replies, logs and probe bodies. Only a known JSON error field, cleaned, ever
    /// gets out; never the raw body.
    #[test]
    fn error_details_never_quote_the_raw_body() {
        let echo = b"POST /msi/token?resource=x HTTP/1.1\r\nHost: 127.0.0.1\r\nX-IDENTITY-HEADER: s3cr3t-identity\r\n\r\n";
        let d = error_detail(echo);
        assert!(!d.contains("s3cr3t") && !d.contains("X-IDENTITY"), "{d}");
        assert!(d.contains("not JSON"), "{d}");
        let html = b"<html><body>Bad gateway: upstream said Authorization: Bearer eyJabc.def.ghi</body></html>";
        let d = error_detail(html);
        assert!(!d.contains("eyJ") && !d.contains("Bearer"), "{d}");
        // A JSON message that quotes the request is withheld too.
        let d = error_detail(
            br#"{"message":"bad request: headers were X-IDENTITY-HEADER: s3cr3t-identity"}"#,
        );
        assert!(!d.contains("s3cr3t"), "{d}");
        let d = error_detail(
            br#"{"error":"invalid_request","error_description":"client_secret=abc is wrong"}"#,
        );
        assert!(!d.contains("abc"), "{d}");
        assert!(d.starts_with("invalid_request"), "{d}");
        // An error code that is not a code is not repeated either.
        let d = error_detail(br#"{"error":"Authorization: Bearer eyJx.y.z"}"#);
        assert!(!d.contains("eyJ"), "{d}");
        // The debug excerpt: bounded, header lines and secrets dropped.
        let x = debug_excerpt(echo);
        assert!(!x.contains("s3cr3t") && !x.contains("Host:"), "{x}");
        assert!(x.contains("POST /msi/token"), "{x}");
        assert!(debug_excerpt("y".repeat(10_000).as_bytes()).len() <= MAX_EXCERPT + 3);
    }

    #[test]
    fn rewrite_moves_only_the_fixed_address() {
        let r = Rewrite {
            from: Url::parse("http://169.254.169.254/metadata/identity/oauth2/token").unwrap(),
            to: Url::parse("http://127.0.0.1:9/metadata/identity/oauth2/token").unwrap(),
        };
        let u = Url::parse(
            "http://169.254.169.254/metadata/identity/oauth2/token?api-version=2019-08-01&resource=x",
        )
        .unwrap();
        assert_eq!(
            r.apply(&u).unwrap().as_str(),
            "http://127.0.0.1:9/metadata/identity/oauth2/token?api-version=2019-08-01&resource=x"
        );
        let other = Url::parse("https://login.microsoftonline.com/t/oauth2/v2.0/token").unwrap();
        assert!(r.apply(&other).is_none());
    }
}
