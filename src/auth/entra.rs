//! Microsoft Entra ID as the upstream credential (`auth.source = "entra"`): turns
//! `[auth.entra]` plus the process environment into one token source
//! ([`super::sources`]) and starts the rotator ([`super::rotator`]) that publishes
//! its tokens to every upstream connection.
//!
//! | `auth.entra.credential` | endpoint | identity settings |
//! |---|---|---|
//! | `managed-identity` | App Service / Functions / Container Apps when `IDENTITY_ENDPOINT` and `IDENTITY_HEADER` are set, else IMDS (`auth.entra.imds_endpoint`) | system-assigned, or one of `client_id`, `object_id`, `resource_id` |
//! | `workload-identity` | `{authority_host}/{tenant_id}/oauth2/v2.0/token` with the federated token as client assertion | `tenant_id`, `client_id`, `federated_token_file`, `authority_host` (config keys win over `AZURE_TENANT_ID`, `AZURE_CLIENT_ID`, `AZURE_FEDERATED_TOKEN_FILE`, `AZURE_AUTHORITY_HOST`) |
//! | `client-secret` | the same Entra v2 endpoint with a client secret | `tenant_id`, `client_id`, and the secret from env `REDIS_ENTRA_PROXY_AUTH__ENTRA__CLIENT_SECRET` or `client_secret_file` |
//! | `azure-cli` | `az account get-access-token` (found on `PATH`) | the developer's `az login` |
//!
//! # Why the endpoints are called directly, not through azure_identity
//!
//! azure_identity 1.0 serves most deployments, but not this rotator: its token
//! cache hands back the same token until 5 minutes before expiry and its retry
//! policy can hold a request for over a minute; its errors do not carry the
//! `Retry-After` the rotator must honour; `WorkloadIdentityCredential` caches the
//! federated token file for 10 minutes instead of re-reading it for each exchange;
//! the IMDS endpoint cannot be pointed elsewhere; and it refuses plain-http
//! authority hosts. Each of these protocols is one small HTTP request (or one
//! command), so [`super::sources`] speaks them with reqwest over rustls (ring
//! provider, system roots plus `auth.entra.ca_file`), and the rotator owns every
//! timeout, retry and schedule.
//!
//! # Environment
//!
//! The variables Azure defines (`IDENTITY_ENDPOINT`, `AZURE_*`, `PATH` for `az`,
//! `HTTPS_PROXY`/`NO_PROXY` for the Entra endpoint) are read from an [`EntraEnv`]
//! snapshot passed in, never from the process directly, so tests hand in a map.

use super::rotator::{self, RotatorConfig, TokenSource};
use super::sources::{
    self, AppServiceSource, AzureCliSource, ClientCredential, EntraTokenSource, ImdsSource,
    ManagedIdentityId,
};
use super::{AuthError, TokenState};
use crate::config::{describe_key, AuthConfig, EntraConfig, EntraCredentialKind};
use crate::metrics::Metrics;
use crate::secret::Secret;
use reqwest::Url;
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// IMDS, when `auth.entra.imds_endpoint` is not set.
pub const DEFAULT_IMDS_ENDPOINT: &str = "http://169.254.169.254/metadata/identity/oauth2/token";
/// The public-cloud Entra authority, when neither the key nor `AZURE_AUTHORITY_HOST` is set.
pub const DEFAULT_AUTHORITY_HOST: &str = "https://login.microsoftonline.com";
/// Smallest `auth.entra.max_backoff` the rotator uses: a smaller value would make
/// configuration-error retries a hot loop.
pub const MIN_MAX_BACKOFF: Duration = Duration::from_secs(1);

/// A snapshot of the environment variables the Entra sources read. Built once at
/// start ([`EntraEnv::from_process`]) or from a map in tests. An empty value counts
/// as unset. `Debug` lists the names only (`IDENTITY_HEADER` is a secret).
#[derive(Clone, Default)]
pub struct EntraEnv {
    vars: HashMap<String, String>,
}

impl EntraEnv {
    /// The current process environment (variables that are not UTF-8 are skipped).
    pub fn from_process() -> Self {
        std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .collect()
    }

    /// The value of `key`, if set and not empty.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.vars
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    /// Every variable, as passed to child processes (`az`).
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.vars.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// A copy with `key` set to `value`.
    pub fn with(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.vars.insert(key.into(), value.into());
        self
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for EntraEnv {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        EntraEnv {
            vars: iter
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        }
    }
}

impl fmt::Debug for EntraEnv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<_> = self.vars.keys().collect();
        names.sort();
        f.debug_struct("EntraEnv").field("names", &names).finish()
    }
}

/// Validate the Entra settings and start the rotator in the background. Returns at
/// once; until the first token arrives `tx` carries no credential, and
/// `last_error` says why once an attempt has failed.
///
/// Errors: any setting that cannot work (a missing tenant for workload identity, a
/// bad URL, an unreadable `ca_file`, no `az` on `PATH`), naming the key and its
/// environment variable.
///
/// # Panics
/// Outside a tokio runtime.
pub fn spawn(
    cfg: &AuthConfig,
    metrics: Arc<Metrics>,
    env: EntraEnv,
    tx: watch::Sender<TokenState>,
    shutdown: CancellationToken,
) -> Result<(), AuthError> {
    let source = build_source(&cfg.entra, &env)?;
    let username = cfg.username.clone().filter(|u| !u.trim().is_empty());
    tracing::info!(
        username = username.as_deref().unwrap_or("oid claim of each token"),
        attempt_timeout = ?cfg.entra.attempt_timeout,
        "Entra credential: {}",
        source.describe()
    );
    let rcfg = RotatorConfig {
        attempt_timeout: cfg.entra.attempt_timeout,
        max_backoff: cfg.entra.max_backoff.max(MIN_MAX_BACKOFF),
        username,
    };
    tokio::spawn(rotator::run(source, rcfg, metrics, tx, shutdown));
    Ok(())
}

fn config_err(msg: impl Into<String>) -> AuthError {
    AuthError::Config(msg.into())
}

/// A key that may also come from an Azure environment variable: config wins.
fn key_or_env<'a>(value: Option<&'a str>, env: &'a EntraEnv, var: &str) -> Option<&'a str> {
    value
        .filter(|v| !v.trim().is_empty())
        .or_else(|| env.get(var))
}

fn missing(key: &str, var: &str, why: &str) -> AuthError {
    config_err(format!(
        "{why} needs {} or the environment variable {var}",
        describe_key(key)
    ))
}

/// Turn the settings into a token source, checking everything that can be checked
/// without asking the endpoint.
pub fn build_source(cfg: &EntraConfig, env: &EntraEnv) -> Result<Arc<dyn TokenSource>, AuthError> {
    let scope = cfg.scope.trim();
    if scope.is_empty() {
        return Err(config_err(format!(
            "{} is empty",
            describe_key("auth.entra.scope")
        )));
    }
    let resource = scope.strip_suffix("/.default").unwrap_or(scope).to_string();
    match cfg.credential {
        EntraCredentialKind::ManagedIdentity => managed_identity(cfg, env, resource),
        EntraCredentialKind::WorkloadIdentity => {
            let what = "auth.entra.credential = \"workload-identity\"";
            let tenant = key_or_env(cfg.tenant_id.as_deref(), env, "AZURE_TENANT_ID")
                .ok_or_else(|| missing("auth.entra.tenant_id", "AZURE_TENANT_ID", what))?;
            let client_id = key_or_env(cfg.client_id.as_deref(), env, "AZURE_CLIENT_ID")
                .ok_or_else(|| missing("auth.entra.client_id", "AZURE_CLIENT_ID", what))?;
            let file = cfg
                .federated_token_file
                .as_ref()
                .filter(|p| !p.as_os_str().is_empty())
                .cloned()
                .or_else(|| env.get("AZURE_FEDERATED_TOKEN_FILE").map(PathBuf::from))
                .ok_or_else(|| {
                    missing(
                        "auth.entra.federated_token_file",
                        "AZURE_FEDERATED_TOKEN_FILE",
                        what,
                    )
                })?;
            entra_source(
                cfg,
                env,
                tenant,
                client_id,
                scope,
                ClientCredential::FederatedTokenFile(file),
                "workload identity",
            )
        }
        EntraCredentialKind::ClientSecret => {
            let what = "auth.entra.credential = \"client-secret\"";
            let tenant = key_or_env(cfg.tenant_id.as_deref(), env, "AZURE_TENANT_ID")
                .ok_or_else(|| missing("auth.entra.tenant_id", "AZURE_TENANT_ID", what))?;
            let client_id = key_or_env(cfg.client_id.as_deref(), env, "AZURE_CLIENT_ID")
                .ok_or_else(|| missing("auth.entra.client_id", "AZURE_CLIENT_ID", what))?;
            let inline = cfg.client_secret.as_ref().filter(|s| !s.is_empty());
            let file = cfg
                .client_secret_file
                .as_ref()
                .filter(|p| !p.as_os_str().is_empty());
            let credential = match (inline, file) {
                (Some(_), Some(_)) => {
                    return Err(config_err(format!(
                        "set only one of {} and {}",
                        describe_key("auth.entra.client_secret"),
                        describe_key("auth.entra.client_secret_file")
                    )))
                }
                (Some(s), None) => ClientCredential::Secret(s.clone()),
                (None, Some(f)) => ClientCredential::SecretFile(f.clone()),
                (None, None) => {
                    return Err(config_err(format!(
                        "{what} needs a secret: set {} or {}",
                        describe_key("auth.entra.client_secret"),
                        describe_key("auth.entra.client_secret_file")
                    )))
                }
            };
            entra_source(
                cfg,
                env,
                tenant,
                client_id,
                scope,
                credential,
                "client secret",
            )
        }
        EntraCredentialKind::AzureCli => {
            let program = find_on_path("az", env.get("PATH")).ok_or_else(|| {
                config_err(
                    "auth.entra.credential = \"azure-cli\" needs the Azure CLI: `az` was not found on PATH",
                )
            })?;
            let tenant =
                key_or_env(cfg.tenant_id.as_deref(), env, "AZURE_TENANT_ID").map(str::to_string);
            if let Some(t) = &tenant {
                check_tenant(t)?;
            }
            Ok(Arc::new(AzureCliSource::new(
                program,
                resource,
                tenant,
                env.clone(),
            )))
        }
    }
}

fn managed_identity(
    cfg: &EntraConfig,
    env: &EntraEnv,
    resource: String,
) -> Result<Arc<dyn TokenSource>, AuthError> {
    let ids: Vec<ManagedIdentityId> = [
        cfg.client_id.clone().map(ManagedIdentityId::ClientId),
        cfg.object_id.clone().map(ManagedIdentityId::ObjectId),
        cfg.resource_id.clone().map(ManagedIdentityId::ResourceId),
    ]
    .into_iter()
    .flatten()
    .filter(|id| !id.value().trim().is_empty())
    .collect();
    if ids.len() > 1 {
        return Err(config_err(format!(
            "a user-assigned managed identity is named by one of {}, {} or {}, not several",
            describe_key("auth.entra.client_id"),
            describe_key("auth.entra.object_id"),
            describe_key("auth.entra.resource_id")
        )));
    }
    let id = ids.into_iter().next();
    let client = sources::http_client(cfg.ca_file.as_deref(), None, cfg.attempt_timeout)?;
    match (env.get("IDENTITY_ENDPOINT"), env.get("IDENTITY_HEADER")) {
        (Some(endpoint), Some(header)) => {
            let url = Url::parse(endpoint).map_err(|e| {
                config_err(format!(
                    "the environment variable IDENTITY_ENDPOINT is not a URL ({e})"
                ))
            })?;
            Ok(Arc::new(AppServiceSource::new(
                client,
                url,
                Secret::new(header),
                resource,
                id,
            )))
        }
        _ => {
            let endpoint = cfg
                .imds_endpoint
                .as_deref()
                .filter(|e| !e.trim().is_empty())
                .unwrap_or(DEFAULT_IMDS_ENDPOINT);
            let url = Url::parse(endpoint).map_err(|e| {
                config_err(format!(
                    "{} is not a URL ({e})",
                    describe_key("auth.entra.imds_endpoint")
                ))
            })?;
            Ok(Arc::new(ImdsSource::new(client, url, resource, id)))
        }
    }
}

fn entra_source(
    cfg: &EntraConfig,
    env: &EntraEnv,
    tenant: &str,
    client_id: &str,
    scope: &str,
    credential: ClientCredential,
    kind: &'static str,
) -> Result<Arc<dyn TokenSource>, AuthError> {
    check_tenant(tenant)?;
    let authority = key_or_env(cfg.authority_host.as_deref(), env, "AZURE_AUTHORITY_HOST")
        .unwrap_or(DEFAULT_AUTHORITY_HOST);
    let token_url = token_url(authority, tenant)?;
    let proxy = sources::proxy_from_env(env, &token_url)?;
    let client = sources::http_client(cfg.ca_file.as_deref(), proxy, cfg.attempt_timeout)?;
    Ok(Arc::new(EntraTokenSource::new(
        kind,
        client,
        token_url,
        tenant.to_string(),
        client_id.to_string(),
        scope.to_string(),
        credential,
    )))
}

/// `{authority}/{tenant}/oauth2/v2.0/token`. The authority must be https, except
/// on a loopback address (a local emulator or a test), because the request carries
/// a client secret or assertion.
fn token_url(authority: &str, tenant: &str) -> Result<Url, AuthError> {
    let key = "auth.entra.authority_host";
    let base = Url::parse(authority.trim_end_matches('/')).map_err(|e| {
        config_err(format!(
            "{} (or AZURE_AUTHORITY_HOST) is not a URL: {e}",
            describe_key(key)
        ))
    })?;
    let loopback = base.host_str().is_some_and(|h| {
        h.eq_ignore_ascii_case("localhost")
            || h.trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    });
    match base.scheme() {
        "https" => {}
        "http" if loopback => {}
        other => {
            return Err(config_err(format!(
                "{} (or AZURE_AUTHORITY_HOST) must be an https URL (plain http only on loopback), not {other}:",
                describe_key(key)
            )))
        }
    }
    let mut url = base;
    url.path_segments_mut()
        .map_err(|_| config_err(format!("{} cannot have a path", describe_key(key))))?
        .pop_if_empty()
        .extend([tenant, "oauth2", "v2.0", "token"]);
    Ok(url)
}

/// A tenant is a GUID or a domain name: anything else would change the URL path.
fn check_tenant(tenant: &str) -> Result<(), AuthError> {
    let ok = !tenant.is_empty()
        && tenant
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    if ok {
        Ok(())
    } else {
        Err(config_err(format!(
            "{} (or AZURE_TENANT_ID) must be a tenant id or domain, got {tenant:?}",
            describe_key("auth.entra.tenant_id")
        )))
    }
}

/// The first executable `name` in the directories of `path` (a `PATH` value).
fn find_on_path(name: &str, path: Option<&str>) -> Option<PathBuf> {
    std::env::split_paths(path?)
        .filter(|dir| !dir.as_os_str().is_empty())
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> EntraEnv {
        pairs.iter().copied().collect()
    }

    fn entra(kind: EntraCredentialKind) -> EntraConfig {
        EntraConfig {
            credential: kind,
            ..EntraConfig::default()
        }
    }

    fn err(cfg: &EntraConfig, env: &EntraEnv) -> String {
        match build_source(cfg, env) {
            Ok(s) => panic!("expected an error, got {}", s.describe()),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn workload_identity_names_missing_keys_and_env_vars() {
        let cfg = entra(EntraCredentialKind::WorkloadIdentity);
        let e = err(&cfg, &EntraEnv::default());
        assert!(
            e.contains("`auth.entra.tenant_id`")
                && e.contains("REDIS_ENTRA_PROXY_AUTH__ENTRA__TENANT_ID")
                && e.contains("AZURE_TENANT_ID"),
            "{e}"
        );
        let e = err(&cfg, &env(&[("AZURE_TENANT_ID", "t")]));
        assert!(
            e.contains("auth.entra.client_id") && e.contains("AZURE_CLIENT_ID"),
            "{e}"
        );
        let e = err(
            &cfg,
            &env(&[("AZURE_TENANT_ID", "t"), ("AZURE_CLIENT_ID", "c")]),
        );
        assert!(e.contains("AZURE_FEDERATED_TOKEN_FILE"), "{e}");
        let full = env(&[
            ("AZURE_TENANT_ID", "t"),
            ("AZURE_CLIENT_ID", "c"),
            ("AZURE_FEDERATED_TOKEN_FILE", "/var/run/secrets/token"),
        ]);
        let s = build_source(&cfg, &full).unwrap();
        assert!(s
            .describe()
            .contains("login.microsoftonline.com/t/oauth2/v2.0/token"));
        // Config keys win over the environment.
        let cfg = EntraConfig {
            tenant_id: Some("from-config".into()),
            authority_host: Some("https://login.microsoftonline.us/".into()),
            ..cfg
        };
        let s = build_source(&cfg, &full.with("AZURE_AUTHORITY_HOST", "https://ignored")).unwrap();
        assert!(
            s.describe()
                .contains("https://login.microsoftonline.us/from-config/oauth2/v2.0/token"),
            "{}",
            s.describe()
        );
    }

    #[test]
    fn authority_must_be_https_except_on_loopback() {
        assert!(token_url("http://login.example", "t").is_err());
        assert!(token_url("ftp://x", "t").is_err());
        assert_eq!(
            token_url("http://127.0.0.1:8080", "t").unwrap().as_str(),
            "http://127.0.0.1:8080/t/oauth2/v2.0/token"
        );
        assert!(token_url("http://localhost:1/", "t").is_ok());
        assert!(check_tenant("../evil").is_err());
        assert!(check_tenant("contoso.onmicrosoft.com").is_ok());
    }

    #[test]
    fn client_secret_needs_exactly_one_secret() {
        let base = EntraConfig {
            tenant_id: Some("t".into()),
            client_id: Some("c".into()),
            ..entra(EntraCredentialKind::ClientSecret)
        };
        let e = err(&base, &EntraEnv::default());
        assert!(
            e.contains("REDIS_ENTRA_PROXY_AUTH__ENTRA__CLIENT_SECRET")
                && e.contains("auth.entra.client_secret_file"),
            "{e}"
        );
        let both = EntraConfig {
            client_secret: Some(Secret::new("s3cr3t")),
            client_secret_file: Some("/run/secret".into()),
            ..base.clone()
        };
        let e = err(&both, &EntraEnv::default());
        assert!(e.contains("only one") && !e.contains("s3cr3t"), "{e}");
        let ok = EntraConfig {
            client_secret: Some(Secret::new("s3cr3t")),
            ..base
        };
        let s = build_source(&ok, &EntraEnv::default()).unwrap();
        assert!(!s.describe().contains("s3cr3t"));
    }

    #[test]
    fn managed_identity_picks_app_service_or_imds() {
        let cfg = entra(EntraCredentialKind::ManagedIdentity);
        let s = build_source(&cfg, &EntraEnv::default()).unwrap();
        assert!(s.describe().contains("169.254.169.254"), "{}", s.describe());
        let app = env(&[
            ("IDENTITY_ENDPOINT", "http://127.0.0.1:41234/msi/token"),
            ("IDENTITY_HEADER", "hdr-secret"),
        ]);
        let s = build_source(&cfg, &app).unwrap();
        assert!(s.describe().contains("App Service"), "{}", s.describe());
        assert!(!s.describe().contains("hdr-secret"));
        assert!(!format!("{app:?}").contains("hdr-secret"));
        let two = EntraConfig {
            client_id: Some("a".into()),
            object_id: Some("b".into()),
            ..cfg.clone()
        };
        assert!(err(&two, &EntraEnv::default()).contains("not several"));
        let bad = EntraConfig {
            imds_endpoint: Some("not a url".into()),
            ..cfg
        };
        assert!(err(&bad, &EntraEnv::default()).contains("auth.entra.imds_endpoint"));
    }

    #[test]
    fn azure_cli_must_be_on_the_given_path() {
        let cfg = entra(EntraCredentialKind::AzureCli);
        let e = err(&cfg, &env(&[("PATH", "/nonexistent-dir")]));
        assert!(e.contains("`az` was not found"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let az = dir.path().join("az");
        std::fs::write(&az, "#!/bin/sh\nexit 1\n").unwrap();
        // Not executable yet: not found.
        let path = dir.path().to_str().unwrap().to_string();
        assert!(build_source(&cfg, &env(&[("PATH", &path)])).is_err());
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&az, std::fs::Permissions::from_mode(0o755)).unwrap();
        let s = build_source(&cfg, &env(&[("PATH", &format!("/nonexistent:{path}"))])).unwrap();
        assert!(s.describe().contains("az"), "{}", s.describe());
    }

    #[test]
    fn bad_ca_file_is_a_config_error() {
        let cfg = EntraConfig {
            tenant_id: Some("t".into()),
            client_id: Some("c".into()),
            client_secret: Some(Secret::new("x")),
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..entra(EntraCredentialKind::ClientSecret)
        };
        let e = err(&cfg, &EntraEnv::default());
        assert!(e.contains("auth.entra.ca_file"), "{e}");
    }
}
