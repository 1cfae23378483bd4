//! The hand-written Entra token sources: the managed-identity platforms that
//! `azure_identity` 1.0 cannot serve ([`super::azure`] has the rest). One request
//! per [`TokenSource::fetch`], no cache, no retry; the rotator decides timing.
//! [`super::entra`] picks one from `[auth.entra]` and the environment.
//!
//! - [`AppServiceSource`]: App Service / Functions / Container Apps with a
//!   user-assigned identity named by resource id (the crate refuses it: it sends
//!   the id in the wrong query parameter, azure-sdk-for-rust issue 2407).
//! - [`ArcSource`]: Azure Arc-enabled servers (`IDENTITY_ENDPOINT` + `IMDS_ENDPOINT`;
//!   the crate's 1.0 has no Arc credential): a 401 challenge names a key file the
//!   agent wrote, whose content authenticates the second request.
//! - [`CloudShellSource`]: Azure Cloud Shell (`MSI_ENDPOINT` without `MSI_SECRET`;
//!   not in the crate).
//!
//! Each maps the endpoint's answer to a [`FetchError`] the rotator acts on (see
//! [`super::http::classify`]). Bodies of error answers are quoted, shortened, in
//! `last_error`; bodies of success answers never are (they hold the token).

use super::azure::{describe_id, ManagedIdentityId};
use super::http::{exchange, send};
use super::jwt;
use super::rotator::{FetchError, FetchFuture, FetchedToken, TokenSource};
use crate::secret::Secret;
use reqwest::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use reqwest::{Client, Url};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// App Service / Functions / Container Apps identity API version.
pub const APP_SERVICE_API_VERSION: &str = "2019-08-01";
/// Azure Arc's identity API version.
pub const ARC_API_VERSION: &str = "2020-06-01";
/// Where the Arc agent writes its challenge keys on Linux.
pub const ARC_KEY_DIR: &str = "/var/opt/azcmagent/tokens";
/// The largest Arc key file read (the agent's are a few dozen bytes).
const ARC_MAX_KEY: u64 = 4096;

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
            "managed identity ({}, App Service IDENTITY_ENDPOINT {endpoint}, hand-written: the crate refuses resource ids here)",
            describe_id(&id)
        );
        let mut url = endpoint;
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("api-version", APP_SERVICE_API_VERSION);
            q.append_pair("resource", &resource);
            if let Some(id) = &id {
                let param = match id {
                    ManagedIdentityId::ClientId(_) => "client_id",
                    ManagedIdentityId::ObjectId(_) => "principal_id",
                    ManagedIdentityId::ResourceId(_) => "mi_res_id",
                };
                q.append_pair(param, id.value());
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

/// Managed identity on an Azure Arc-enabled server: `GET $IDENTITY_ENDPOINT?
/// api-version=2020-06-01&resource=...` with `Metadata: true` is answered 401 with
/// `WWW-Authenticate: Basic realm=<key file>`; the same request again with
/// `Authorization: Basic <key file content>` gets the token. The key file must be
/// a `.key` file directly in the agent's key directory, at most 4 KB: the path
/// comes from the network, and the proxy must not send other files' content.
pub struct ArcSource {
    client: Client,
    url: Url,
    key_dir: PathBuf,
    describe: String,
}

impl ArcSource {
    /// A source asking `endpoint` (from `IDENTITY_ENDPOINT`), trusting key files in
    /// `key_dir` only.
    pub fn new(client: Client, endpoint: Url, resource: String, key_dir: PathBuf) -> Self {
        let describe = format!(
            "managed identity (system-assigned, Azure Arc IDENTITY_ENDPOINT {endpoint}, hand-written: not in azure_identity 1.0)"
        );
        let mut url = endpoint;
        url.query_pairs_mut()
            .append_pair("api-version", ARC_API_VERSION)
            .append_pair("resource", &resource);
        ArcSource {
            client,
            url,
            key_dir,
            describe,
        }
    }

    fn request(&self) -> reqwest::RequestBuilder {
        self.client
            .get(self.url.clone())
            .header("Metadata", "true")
            .header(ACCEPT, "application/json")
    }
}

/// The key file a challenge names, checked: inside `dir`, ending `.key`, small.
pub async fn arc_key(dir: &Path, challenge: &str) -> Result<Secret, FetchError> {
    let bad = |why: &str| {
        FetchError::Config(format!(
            "Azure Arc challenge refused: {why} (expected a .key file in {})",
            dir.display()
        ))
    };
    let (scheme, rest) = challenge.trim().split_once(' ').unwrap_or(("", ""));
    let path = rest.trim().strip_prefix("realm=").map(str::trim);
    let Some(path) = path.filter(|_| scheme.eq_ignore_ascii_case("basic")) else {
        return Err(bad(
            "the WWW-Authenticate header is not `Basic realm=<file>`",
        ));
    };
    let path = Path::new(path.trim_matches('"'));
    let real = tokio::fs::canonicalize(path)
        .await
        .map_err(|e| bad(&format!("cannot resolve {}: {e}", path.display())))?;
    let dir_real = tokio::fs::canonicalize(dir)
        .await
        .map_err(|e| bad(&format!("cannot resolve the key directory: {e}")))?;
    if real.parent() != Some(dir_real.as_path())
        || real.extension().and_then(|e| e.to_str()) != Some("key")
    {
        return Err(bad(&format!("{} is not one", real.display())));
    }
    let meta = tokio::fs::metadata(&real)
        .await
        .map_err(|e| bad(&format!("{}: {e}", real.display())))?;
    if !meta.is_file() || meta.len() > ARC_MAX_KEY {
        return Err(bad(&format!(
            "{} is not a file of at most {ARC_MAX_KEY} bytes",
            real.display()
        )));
    }
    let key = tokio::fs::read_to_string(&real).await.map_err(|e| {
        FetchError::Config(format!(
            "cannot read the Azure Arc key {} (the proxy must run as a member of the himds group): {e}",
            real.display()
        ))
    })?;
    Ok(Secret::new(key.trim()))
}

impl TokenSource for ArcSource {
    fn describe(&self) -> &str {
        &self.describe
    }

    fn fetch(&self) -> FetchFuture<'_> {
        Box::pin(async move {
            let started = SystemTime::now();
            let first = exchange(self.request()).await?;
            let answer = if first.status == 401 {
                let challenge =
                    first
                        .headers
                        .get("www-authenticate")
                        .ok_or_else(|| FetchError::Rejected {
                            status: 401,
                            detail: "Azure Arc answered 401 without a WWW-Authenticate challenge"
                                .into(),
                        })?;
                let key = arc_key(&self.key_dir, challenge).await?;
                let mut value =
                    HeaderValue::from_str(&format!("Basic {}", key.expose())).map_err(|_| {
                        FetchError::Config("the Azure Arc key is not a valid header value".into())
                    })?;
                value.set_sensitive(true);
                exchange(self.request().header(AUTHORIZATION, value)).await?
            } else {
                first
            };
            if !(200..300).contains(&answer.status) {
                return Err(answer.error());
            }
            parse_token(&answer.body, started)
        })
    }
}

/// Managed identity in Azure Cloud Shell: `POST $MSI_ENDPOINT` with `Metadata:
/// true` and the form `resource=...`. System identity of the signed-in user only.
pub struct CloudShellSource {
    client: Client,
    url: Url,
    resource: String,
    describe: String,
}

impl CloudShellSource {
    /// A source asking `endpoint` (from `MSI_ENDPOINT`).
    pub fn new(client: Client, endpoint: Url, resource: String) -> Self {
        let describe = format!(
            "managed identity (Cloud Shell MSI_ENDPOINT {endpoint}, hand-written: not in azure_identity 1.0)"
        );
        CloudShellSource {
            client,
            url: endpoint,
            resource,
            describe,
        }
    }
}

impl TokenSource for CloudShellSource {
    fn describe(&self) -> &str {
        &self.describe
    }

    fn fetch(&self) -> FetchFuture<'_> {
        Box::pin(async move {
            let started = SystemTime::now();
            let body = form_urlencoded::Serializer::new(String::new())
                .append_pair("resource", &self.resource)
                .finish();
            let req = self
                .client
                .post(self.url.clone())
                .header("Metadata", "true")
                .header(ACCEPT, "application/json")
                .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(body);
            let body = send(req).await?;
            parse_token(&body, started)
        })
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

    #[tokio::test]
    async fn arc_key_files_outside_the_agent_directory_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("tokens");
        std::fs::create_dir(&keys).unwrap();
        std::fs::write(keys.join("a.key"), "k3y\n").unwrap();
        std::fs::write(keys.join("a.txt"), "x").unwrap();
        std::fs::write(dir.path().join("b.key"), "x").unwrap();
        std::fs::write(keys.join("big.key"), "x".repeat(5000)).unwrap();
        let realm = |p: &Path| format!("Basic realm={}", p.display());
        let k = arc_key(&keys, &realm(&keys.join("a.key"))).await.unwrap();
        assert_eq!(k.expose(), "k3y");
        for bad in [
            realm(&keys.join("a.txt")),
            realm(&dir.path().join("b.key")),
            realm(&keys.join("../b.key")),
            realm(&keys.join("big.key")),
            realm(&keys.join("missing.key")),
            format!("Bearer realm={}", keys.join("a.key").display()),
            "Basic".to_string(),
        ] {
            let e = arc_key(&keys, &bad).await.unwrap_err();
            assert!(e.is_config(), "{bad}: {e}");
            assert!(!e.to_string().contains("k3y"), "{e}");
        }
    }
}
