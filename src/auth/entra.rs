//! Microsoft Entra ID as the upstream credential (`auth.source = "entra"`): turns
//! `[auth.entra]` plus the environment into one token source and starts the
//! rotator ([`super::rotator`]) that publishes its tokens to every upstream
//! connection.
//!
//! | `auth.entra.credential` | how | through |
//! |---|---|---|
//! | `auto` (default) | one of the below, chosen from the environment ([`super::auto`]) | |
//! | `managed-identity` | IMDS (`auth.entra.imds_endpoint`), App Service / Functions / Container Apps (`IDENTITY_ENDPOINT` + `IDENTITY_HEADER`), Azure Arc (`IDENTITY_ENDPOINT` + `IMDS_ENDPOINT`), Cloud Shell (`MSI_ENDPOINT`) | the crate for IMDS and App Service; hand-written for Arc, Cloud Shell and an App Service resource id ([`super::sources`]) |
//! | `workload-identity` | the federated token file as client assertion | the crate |
//! | `client-secret` | a client secret | the crate |
//! | `client-certificate` | an RS256 assertion signed with the certificate's key | the crate's assertion credential, signed by [`super::cert`] |
//! | `azure-cli`, `azure-developer-cli` (`azd`), `developer-tools` | `az` / `azd` / `az` then `azd` | the crate, run with the snapshot's `PATH` |
//!
//! Service Fabric (`IDENTITY_SERVER_THUMBPRINT`) and Azure ML (`MSI_SECRET`) are
//! refused with an error naming the platform: the crate has no credential for
//! them, and Service Fabric's endpoint needs certificate pinning.
//!
//! # Environment
//!
//! The variables Azure defines (`IDENTITY_ENDPOINT`, `AZURE_*`, `PATH` for the
//! CLIs, `HTTPS_PROXY`/`NO_PROXY` for the Entra endpoint) are read from an
//! [`EntraEnv`] snapshot passed in, so tests hand in a map. The crate's managed
//! identity reads its platform variables from the process itself; [`spawn`]
//! refuses to start when the two disagree, rather than ask a different endpoint
//! than the one it logged.

use super::auto::{self, Facts};
use super::azure::{CrateKind, CrateSource, ManagedIdentityId, SecretSource};
use super::cert::{Certificate, CertificateFile};
pub use super::env::{find_on_path, EntraEnv};
use super::http::{self, Rewrite};
use super::rotator::{self, RefreshNow, RotatorConfig, TokenSource};
use super::sources::{AppServiceSource, ArcSource, CloudShellSource};
use super::{AuthError, TokenState};
use crate::config::{describe_key, AuthConfig, EntraConfig, EntraCredentialKind};
use crate::metrics::Metrics;
use crate::secret::Secret;
use reqwest::Url;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// IMDS, where the crate sends its requests; `auth.entra.imds_endpoint` replaces it.
pub const DEFAULT_IMDS_ENDPOINT: &str = "http://169.254.169.254/metadata/identity/oauth2/token";
/// The public-cloud Entra authority, when neither the key nor `AZURE_AUTHORITY_HOST` is set.
pub const DEFAULT_AUTHORITY_HOST: &str = "https://login.microsoftonline.com";
/// Smallest `auth.entra.max_backoff` the rotator uses: a smaller value would make
/// configuration-error retries a hot loop.
pub const MIN_MAX_BACKOFF: Duration = Duration::from_secs(1);
/// The managed-identity platform variables the crate reads from the process.
pub const PLATFORM_VARS: &[&str] = &[
    "IDENTITY_ENDPOINT",
    "IDENTITY_HEADER",
    "IDENTITY_SERVER_THUMBPRINT",
    "IMDS_ENDPOINT",
    "MSI_ENDPOINT",
    "MSI_SECRET",
];

/// Validate the Entra settings and start the rotator in the background. Returns at
/// once; until the first token arrives `tx` carries no credential, and
/// `last_error` says why once an attempt has failed. `refresh` lets the caller
/// ask for a fetch now (SIGHUP).
///
/// Errors: any setting that cannot work (a missing tenant for workload identity, a
/// bad URL, an unreadable `ca_file` or certificate, no `az` on `PATH`, an
/// unsupported platform), naming the key and its environment variable.
///
/// # Panics
/// Outside a tokio runtime.
pub fn spawn(
    cfg: &AuthConfig,
    metrics: Arc<Metrics>,
    env: EntraEnv,
    tx: watch::Sender<TokenState>,
    refresh: RefreshNow,
    shutdown: CancellationToken,
) -> Result<(), AuthError> {
    let mut entra = cfg.entra.clone();
    if entra.credential == EntraCredentialKind::Auto {
        let choice = auto::choose(&entra, &env, &Facts::gather(&env));
        tracing::info!(
            chosen = kind_name(choice.kind),
            "auth.entra.credential = \"auto\" chose {}: {}",
            kind_name(choice.kind),
            choice.reason
        );
        entra.credential = choice.kind;
    }
    let source = build_source(&entra, &env)?;
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
        clock: rotator::Clock::system(),
        refresh,
    };
    tokio::spawn(rotator::run(source, rcfg, metrics, tx, shutdown));
    Ok(())
}

/// The TOML value of a kind, for logs.
pub fn kind_name(kind: EntraCredentialKind) -> &'static str {
    use EntraCredentialKind as K;
    match kind {
        K::Auto => "auto",
        K::ManagedIdentity => "managed-identity",
        K::WorkloadIdentity => "workload-identity",
        K::ClientSecret => "client-secret",
        K::ClientCertificate => "client-certificate",
        K::AzureCli => "azure-cli",
        K::AzureDeveloperCli => "azure-developer-cli",
        K::DeveloperTools => "developer-tools",
    }
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

/// Tenant and client id of the app-registration kinds.
fn tenant_and_client<'a>(
    cfg: &'a EntraConfig,
    env: &'a EntraEnv,
    what: &str,
) -> Result<(&'a str, &'a str), AuthError> {
    let tenant = key_or_env(cfg.tenant_id.as_deref(), env, "AZURE_TENANT_ID")
        .ok_or_else(|| missing("auth.entra.tenant_id", "AZURE_TENANT_ID", what))?;
    check_tenant(tenant)?;
    let client_id = key_or_env(cfg.client_id.as_deref(), env, "AZURE_CLIENT_ID")
        .ok_or_else(|| missing("auth.entra.client_id", "AZURE_CLIENT_ID", what))?;
    Ok((tenant, client_id))
}

/// Turn the settings into a token source, checking everything that can be checked
/// without asking the endpoint. `cfg.credential` must not be `auto` ([`spawn`]
/// resolves it first; here it means managed identity).
pub fn build_source(cfg: &EntraConfig, env: &EntraEnv) -> Result<Arc<dyn TokenSource>, AuthError> {
    use EntraCredentialKind as K;
    let scope = cfg.scope.trim();
    if scope.is_empty() {
        return Err(config_err(format!(
            "{} is empty",
            describe_key("auth.entra.scope")
        )));
    }
    let resource = scope.strip_suffix("/.default").unwrap_or(scope).to_string();
    let what = |k| format!("auth.entra.credential = \"{}\"", kind_name(k));
    match cfg.credential {
        K::ManagedIdentity | K::Auto => managed_identity(cfg, env, scope, resource),
        K::WorkloadIdentity => {
            let what = what(K::WorkloadIdentity);
            let (tenant, client_id) = tenant_and_client(cfg, env, &what)?;
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
                        &what,
                    )
                })?;
            entra_source(
                cfg,
                env,
                scope,
                "workload identity",
                |_| CrateKind::WorkloadIdentity {
                    tenant: tenant.to_string(),
                    client_id: client_id.to_string(),
                    token_file: file,
                },
                tenant,
                client_id,
            )
        }
        K::ClientSecret => {
            let what = what(K::ClientSecret);
            let (tenant, client_id) = tenant_and_client(cfg, env, &what)?;
            let inline = cfg
                .client_secret
                .as_ref()
                .filter(|s| !s.is_empty())
                .cloned()
                .or_else(|| env.get("AZURE_CLIENT_SECRET").map(Secret::new));
            let file = cfg
                .client_secret_file
                .as_ref()
                .filter(|p| !p.as_os_str().is_empty());
            let secret = match (inline, file) {
                (Some(_), Some(_)) => {
                    return Err(config_err(format!(
                        "set only one of {} (or AZURE_CLIENT_SECRET) and {}",
                        describe_key("auth.entra.client_secret"),
                        describe_key("auth.entra.client_secret_file")
                    )))
                }
                (Some(s), None) => SecretSource::Inline(s),
                (None, Some(f)) => SecretSource::File(f.clone()),
                (None, None) => {
                    return Err(config_err(format!(
                        "{what} needs a secret: set {}, {} or AZURE_CLIENT_SECRET",
                        describe_key("auth.entra.client_secret"),
                        describe_key("auth.entra.client_secret_file")
                    )))
                }
            };
            entra_source(
                cfg,
                env,
                scope,
                "client secret",
                |_| CrateKind::ClientSecret {
                    tenant: tenant.to_string(),
                    client_id: client_id.to_string(),
                    secret,
                },
                tenant,
                client_id,
            )
        }
        K::ClientCertificate => {
            let what = what(K::ClientCertificate);
            let (tenant, client_id) = tenant_and_client(cfg, env, &what)?;
            let path = cfg
                .client_certificate_file
                .as_ref()
                .filter(|p| !p.as_os_str().is_empty())
                .cloned()
                .or_else(|| env.get("AZURE_CLIENT_CERTIFICATE_PATH").map(PathBuf::from))
                .ok_or_else(|| {
                    missing(
                        "auth.entra.client_certificate_file",
                        "AZURE_CLIENT_CERTIFICATE_PATH",
                        &what,
                    )
                })?;
            if env.get("AZURE_CLIENT_CERTIFICATE_PASSWORD").is_some() {
                return Err(config_err(
                    "AZURE_CLIENT_CERTIFICATE_PASSWORD is set, but encrypted (PKCS#12) certificates are not supported: give a PEM file with the certificate and an unencrypted RSA key",
                ));
            }
            // Fail at start, not at the first refresh, on an unusable file.
            Certificate::load(&path)?;
            let send_chain = cfg.client_certificate_send_chain
                || matches!(
                    env.get("AZURE_CLIENT_SEND_CERTIFICATE_CHAIN"),
                    Some("1" | "true" | "True" | "TRUE")
                );
            entra_source(
                cfg,
                env,
                scope,
                "client certificate",
                |audience| CrateKind::ClientCertificate {
                    tenant: tenant.to_string(),
                    client_id: client_id.to_string(),
                    cert: CertificateFile { path, send_chain },
                    audience: audience.to_string(),
                },
                tenant,
                client_id,
            )
        }
        K::AzureCli | K::AzureDeveloperCli | K::DeveloperTools => {
            cli_source(cfg, env, scope, cfg.credential)
        }
    }
}

fn cli_source(
    cfg: &EntraConfig,
    env: &EntraEnv,
    scope: &str,
    kind: EntraCredentialKind,
) -> Result<Arc<dyn TokenSource>, AuthError> {
    use EntraCredentialKind as K;
    let path = env.get("PATH");
    let az = find_on_path("az", path);
    let azd = find_on_path("azd", path);
    let tenant = key_or_env(cfg.tenant_id.as_deref(), env, "AZURE_TENANT_ID").map(str::to_string);
    if let Some(t) = &tenant {
        check_tenant(t)?;
    }
    let (crate_kind, describe) = match kind {
        K::AzureCli => {
            let az = az.ok_or_else(|| {
                config_err("auth.entra.credential = \"azure-cli\" needs the Azure CLI: `az` was not found on PATH")
            })?;
            (
                CrateKind::AzureCli {
                    tenant: tenant.clone(),
                },
                format!("azure-cli ({} account get-access-token)", az.display()),
            )
        }
        K::AzureDeveloperCli => {
            let azd = azd.ok_or_else(|| {
                config_err("auth.entra.credential = \"azure-developer-cli\" needs the Azure Developer CLI: `azd` was not found on PATH")
            })?;
            (
                CrateKind::AzureDeveloperCli {
                    tenant: tenant.clone(),
                },
                format!("azure-developer-cli ({} auth token)", azd.display()),
            )
        }
        _ => {
            if az.is_none() && azd.is_none() {
                return Err(config_err(
                    "auth.entra.credential = \"developer-tools\" needs `az` or `azd` on PATH; neither was found",
                ));
            }
            if tenant.is_some() {
                tracing::warn!("developer-tools does not pass a tenant to az/azd; set auth.entra.credential to azure-cli or azure-developer-cli to use auth.entra.tenant_id");
            }
            let found: Vec<String> = [az, azd]
                .into_iter()
                .flatten()
                .map(|p| p.display().to_string())
                .collect();
            (
                CrateKind::DeveloperTools,
                format!("developer-tools (az, then azd; found {})", found.join(", ")),
            )
        }
    };
    let describe = match &tenant {
        Some(t) if !matches!(kind, K::DeveloperTools) => format!("{describe}, tenant {t}"),
        _ => describe,
    };
    Ok(Arc::new(CrateSource::new(
        crate_kind,
        scope.to_string(),
        None,
        None,
        env.clone(),
        describe,
    )?))
}

/// An app-registration source against `{authority}/{tenant}/oauth2/v2.0/token`;
/// `kind` gets that URL (the assertion audience).
fn entra_source(
    cfg: &EntraConfig,
    env: &EntraEnv,
    scope: &str,
    label: &str,
    kind: impl FnOnce(&str) -> CrateKind,
    tenant: &str,
    client_id: &str,
) -> Result<Arc<dyn TokenSource>, AuthError> {
    let authority = key_or_env(cfg.authority_host.as_deref(), env, "AZURE_AUTHORITY_HOST")
        .unwrap_or(DEFAULT_AUTHORITY_HOST);
    let token_url = token_url(authority, tenant)?;
    let proxy = http::proxy_from_env(env, &token_url)?;
    let client = http::http_client(cfg.ca_file.as_deref(), proxy, cfg.attempt_timeout)?;
    let base = authority.trim_end_matches('/').to_string();
    let describe =
        format!("{label} (tenant {tenant}, client {client_id}, {token_url}, azure_identity)");
    Ok(Arc::new(CrateSource::new(
        kind(token_url.as_str()),
        scope.to_string(),
        Some(client),
        Some(base),
        env.clone(),
        describe,
    )?))
}

/// `{authority}/{tenant}/oauth2/v2.0/token`, as the crate builds it. The authority
/// must be https (the crate refuses anything else: the request carries a secret or
/// an assertion) and have no path.
fn token_url(authority: &str, tenant: &str) -> Result<Url, AuthError> {
    let key = "auth.entra.authority_host";
    let base = Url::parse(authority.trim_end_matches('/')).map_err(|e| {
        config_err(format!(
            "{} (or AZURE_AUTHORITY_HOST) is not a URL: {e}",
            describe_key(key)
        ))
    })?;
    if base.scheme() != "https" {
        return Err(config_err(format!(
            "{} (or AZURE_AUTHORITY_HOST) must be an https URL, not {}:",
            describe_key(key),
            base.scheme()
        )));
    }
    if !matches!(base.path(), "" | "/") {
        return Err(config_err(format!(
            "{} (or AZURE_AUTHORITY_HOST) must not have a path",
            describe_key(key)
        )));
    }
    base.join(&format!("/{tenant}/oauth2/v2.0/token"))
        .map_err(|e| config_err(format!("{}: {e}", describe_key(key))))
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

mod managed;

use managed::*;

#[cfg(test)]
mod tests;
