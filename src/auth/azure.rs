//! Token sources built on Microsoft's `azure_identity` crate: managed identity
//! (IMDS, App Service), workload identity, client secret, client certificate
//! (the crate's assertion credential, signed by [`super::cert`]), Azure CLI, Azure
//! Developer CLI and the developer-tools chain. [`super::entra`] picks one.
//!
//! The rotator ([`super::rotator`]) owns when and how often a token is asked for,
//! so each [`CrateSource::fetch`]:
//! - builds a fresh credential, whose per-instance token cache is therefore empty
//!   (and a fresh workload-identity credential re-reads the federated token file);
//! - hands it a [`CrateTransport`] over the source's own rustls client, which never
//!   lets the crate retry and keeps the endpoint's status and `Retry-After`;
//! - runs `az`/`azd` through an [`EnvExecutor`] with the [`EntraEnv`] snapshot as the
//!   whole environment, killed if the attempt times out.
//!
//! The crate reads a few variables from the process environment itself: the
//! managed-identity platform variables and, for the CLIs, nothing else (the
//! authority host is always passed in). [`super::entra`] checks that the snapshot
//! it decided from agrees with the process for those.

use super::cert::{Certificate, CertificateFile};
use super::env::EntraEnv;
use super::http::{CrateTransport, Exchange, Rewrite};
use super::rotator::{FetchError, FetchFuture, FetchedToken, TokenSource};
use crate::secret::Secret;
use azure_core::cloud::{CloudConfiguration, CustomConfiguration};
use azure_core::credentials::TokenCredential;
use azure_core::error::ErrorKind;
use azure_core::http::{ClientMethodOptions, ClientOptions, RetryOptions, Transport};
use azure_identity::{
    AzureCliCredential, AzureCliCredentialOptions, AzureDeveloperCliCredential,
    AzureDeveloperCliCredentialOptions, ClientAssertion, ClientAssertionCredential,
    ClientAssertionCredentialOptions, ClientSecretCredential, ClientSecretCredentialOptions,
    DeveloperToolsCredential, DeveloperToolsCredentialOptions, Executor, ManagedIdentityCredential,
    ManagedIdentityCredentialOptions, UserAssignedId, WorkloadIdentityCredential,
    WorkloadIdentityCredentialOptions,
};
use reqwest::Client;
use std::ffi::OsStr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

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

    /// The IMDS query parameter naming it.
    pub fn imds_param(&self) -> &'static str {
        match self {
            ManagedIdentityId::ClientId(_) => "client_id",
            ManagedIdentityId::ObjectId(_) => "object_id",
            ManagedIdentityId::ResourceId(_) => "msi_res_id",
        }
    }

    fn to_crate(&self) -> UserAssignedId {
        match self.clone() {
            ManagedIdentityId::ClientId(v) => UserAssignedId::ClientId(v),
            ManagedIdentityId::ObjectId(v) => UserAssignedId::ObjectId(v),
            ManagedIdentityId::ResourceId(v) => UserAssignedId::ResourceId(v),
        }
    }
}

/// `system-assigned` or `user-assigned client_id=...`, for logs.
pub fn describe_id(id: &Option<ManagedIdentityId>) -> String {
    match id {
        None => "system-assigned".into(),
        Some(id) => format!("user-assigned {}={}", id.imds_param(), id.value()),
    }
}

/// Where a client secret comes from.
#[derive(Debug, Clone)]
pub enum SecretSource {
    /// From the environment (`REDIS_ENTRA_PROXY_AUTH__ENTRA__CLIENT_SECRET` or
    /// `AZURE_CLIENT_SECRET`).
    Inline(Secret),
    /// A file re-read for every exchange (a rotated mounted secret is picked up).
    File(PathBuf),
}

/// The crate credential a [`CrateSource`] builds for each fetch.
#[derive(Debug, Clone)]
pub enum CrateKind {
    /// `ManagedIdentityCredential` (IMDS or App Service, as the environment says).
    ManagedIdentity {
        id: Option<ManagedIdentityId>,
        /// The crate's fixed IMDS address to `auth.entra.imds_endpoint`.
        rewrite: Option<Rewrite>,
    },
    /// `WorkloadIdentityCredential`.
    WorkloadIdentity {
        tenant: String,
        client_id: String,
        token_file: PathBuf,
    },
    /// `ClientSecretCredential`.
    ClientSecret {
        tenant: String,
        client_id: String,
        secret: SecretSource,
    },
    /// `ClientAssertionCredential` with an assertion signed by [`super::cert`].
    ClientCertificate {
        tenant: String,
        client_id: String,
        cert: CertificateFile,
        /// The token URL (the assertion's `aud`).
        audience: String,
    },
    /// `AzureCliCredential`.
    AzureCli { tenant: Option<String> },
    /// `AzureDeveloperCliCredential`.
    AzureDeveloperCli { tenant: Option<String> },
    /// `DeveloperToolsCredential` (`az`, then `azd`).
    DeveloperTools,
}

impl CrateKind {
    fn is_cli(&self) -> bool {
        matches!(
            self,
            CrateKind::AzureCli { .. }
                | CrateKind::AzureDeveloperCli { .. }
                | CrateKind::DeveloperTools
        )
    }
}

/// A token source backed by an `azure_identity` credential.
pub struct CrateSource {
    kind: CrateKind,
    scope: String,
    /// The HTTP client (none for the CLIs).
    client: Option<Client>,
    /// `auth.entra.authority_host` (or `AZURE_AUTHORITY_HOST`) for the Entra kinds.
    authority: Option<String>,
    executor: Arc<EnvExecutor>,
    /// Kept across fetches: the chain remembers which tool worked, and holds no
    /// token cache.
    developer_tools: Option<Arc<DeveloperToolsCredential>>,
    describe: String,
}

impl CrateSource {
    /// A source for `scope` (`.../.default`). `client` is required for every kind
    /// but the CLIs; `authority` for the Entra kinds.
    pub fn new(
        kind: CrateKind,
        scope: String,
        client: Option<Client>,
        authority: Option<String>,
        env: EntraEnv,
        describe: String,
    ) -> Result<Self, super::AuthError> {
        let executor = Arc::new(EnvExecutor { env });
        let developer_tools = match kind {
            CrateKind::DeveloperTools => Some(
                DeveloperToolsCredential::new(Some(DeveloperToolsCredentialOptions {
                    executor: Some(executor.clone()),
                }))
                .map_err(|e| super::AuthError::Config(format!("developer tools: {e}")))?,
            ),
            _ => None,
        };
        Ok(CrateSource {
            kind,
            scope,
            client,
            authority,
            executor,
            developer_tools,
            describe,
        })
    }

    fn options(&self, transport: &Option<CrateTransport>) -> ClientOptions {
        let mut options = ClientOptions {
            retry: RetryOptions::none(),
            ..Default::default()
        };
        if let Some(t) = transport {
            options.transport = Some(Transport::new(Arc::new(t.clone())));
        }
        if let Some(authority) = &self.authority {
            let mut custom = CustomConfiguration::default();
            custom.authority_host = authority.clone();
            options.cloud = Some(Arc::new(CloudConfiguration::Custom(custom)));
        }
        options
    }

    /// A fresh credential for one fetch.
    async fn credential(
        &self,
        options: ClientOptions,
    ) -> Result<Arc<dyn TokenCredential>, FetchError> {
        let built: azure_core::Result<Arc<dyn TokenCredential>> = match &self.kind {
            CrateKind::ManagedIdentity { id, .. } => {
                ManagedIdentityCredential::new(Some(ManagedIdentityCredentialOptions {
                    user_assigned_id: id.as_ref().map(ManagedIdentityId::to_crate),
                    client_options: options,
                }))
                .map(|c| c as Arc<dyn TokenCredential>)
            }
            CrateKind::WorkloadIdentity {
                tenant,
                client_id,
                token_file,
            } => WorkloadIdentityCredential::new(Some(WorkloadIdentityCredentialOptions {
                credential_options: ClientAssertionCredentialOptions {
                    client_options: options,
                },
                client_id: Some(client_id.clone()),
                tenant_id: Some(tenant.clone()),
                token_file_path: Some(token_file.clone()),
            }))
            .map(|c| c as Arc<dyn TokenCredential>),
            CrateKind::ClientSecret {
                tenant,
                client_id,
                secret,
            } => {
                let secret = match secret {
                    SecretSource::Inline(s) => s.clone(),
                    SecretSource::File(path) => read_secret_file(path).await?,
                };
                ClientSecretCredential::new(
                    tenant,
                    client_id.clone(),
                    azure_core::credentials::Secret::new(secret.expose().to_string()),
                    Some(ClientSecretCredentialOptions {
                        client_options: options,
                    }),
                )
                .map(|c| c as Arc<dyn TokenCredential>)
            }
            CrateKind::ClientCertificate {
                tenant,
                client_id,
                cert,
                audience,
            } => {
                let assertion = SignedAssertion::load(cert, client_id, audience).await?;
                ClientAssertionCredential::new(
                    tenant.clone(),
                    client_id.clone(),
                    assertion,
                    Some(ClientAssertionCredentialOptions {
                        client_options: options,
                    }),
                )
                .map(|c| c as Arc<dyn TokenCredential>)
            }
            CrateKind::AzureCli { tenant } => {
                AzureCliCredential::new(Some(AzureCliCredentialOptions {
                    tenant_id: tenant.clone(),
                    executor: Some(self.executor.clone()),
                    ..Default::default()
                }))
                .map(|c| c as Arc<dyn TokenCredential>)
            }
            CrateKind::AzureDeveloperCli { tenant } => {
                AzureDeveloperCliCredential::new(Some(AzureDeveloperCliCredentialOptions {
                    tenant_id: tenant.clone(),
                    executor: Some(self.executor.clone()),
                }))
                .map(|c| c as Arc<dyn TokenCredential>)
            }
            CrateKind::DeveloperTools => Ok(self
                .developer_tools
                .clone()
                .map(|c| c as Arc<dyn TokenCredential>)
                .expect("built in new")),
        };
        built.map_err(|e| FetchError::Config(format!("{}: {}", self.describe, one_line(&e))))
    }
}

impl TokenSource for CrateSource {
    fn describe(&self) -> &str {
        &self.describe
    }

    fn fetch(&self) -> FetchFuture<'_> {
        Box::pin(async move {
            let rewrite = match &self.kind {
                CrateKind::ManagedIdentity { rewrite, .. } => rewrite.clone(),
                _ => None,
            };
            let transport = self
                .client
                .as_ref()
                .map(|c| CrateTransport::new(c.clone(), rewrite));
            let credential = self.credential(self.options(&transport)).await?;
            let result = credential.get_token(&[self.scope.as_str()], None).await;
            match result {
                Ok(t) => {
                    let token = t.token.secret();
                    if token.is_empty() {
                        return Err(FetchError::Malformed(
                            "the token endpoint's answer has an empty access token".into(),
                        ));
                    }
                    Ok(FetchedToken {
                        access_token: Secret::new(token),
                        expires_at: SystemTime::from(t.expires_on),
                    })
                }
                Err(e) => Err(map_error(
                    &e,
                    transport.and_then(|t| t.last()),
                    self.kind.is_cli(),
                )),
            }
        })
    }
}

/// What an error from the crate means for the rotator. The endpoint's own answer,
/// when the transport saw one, decides; otherwise the error kind. Messages from a
/// success body's parse error are replaced by a fixed text (that body holds a token).
fn map_error(e: &azure_core::Error, seen: Option<Exchange>, cli: bool) -> FetchError {
    match seen {
        Some(Exchange::Refused(err)) => return err,
        Some(Exchange::Unreachable(m)) => return FetchError::Network(m),
        None => {}
    }
    let message = one_line(e);
    // The crate wraps the cause (a parse error, an I/O error) in a Credential error.
    let mut kinds = vec![e.kind().clone()];
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        if let Some(inner) = c.downcast_ref::<azure_core::Error>() {
            kinds.push(inner.kind().clone());
        }
        cause = c.source();
    }
    let data = kinds.contains(&ErrorKind::DataConversion);
    let io = kinds
        .iter()
        .any(|k| matches!(k, ErrorKind::Io | ErrorKind::Connection));
    match e.kind() {
        _ if data && cli => FetchError::Malformed(
            "the tool's output is not JSON or not a token response (is it up to date?)".into(),
        ),
        _ if data => FetchError::Malformed(
            "the token endpoint answered with success but the body is not JSON or not a token response"
                .into(),
        ),
        _ if cli => {
            // Not logged in, wrong tenant, consent missing, tool missing: a person must act.
            let needs_person = [
                "az login",
                "azd auth login",
                "AADSTS",
                "Please run",
                "not found on PATH",
                "wasn't found on PATH",
                "not logged in",
            ]
            .iter()
            .any(|m| message.contains(m));
            if needs_person {
                FetchError::Config(message)
            } else {
                FetchError::Network(message)
            }
        }
        _ if io && !cli => FetchError::Network(message),
        _ => FetchError::Config(message),
    }
}

/// The crate's message without its troubleshooting link, on one line.
fn one_line(e: &azure_core::Error) -> String {
    let text = e.to_string();
    let text = text
        .split("\nTo troubleshoot, visit")
        .next()
        .unwrap_or_default();
    super::http::shorten(text)
}

async fn read_secret_file(path: &std::path::Path) -> Result<Secret, FetchError> {
    let text = tokio::fs::read_to_string(path).await.map_err(|e| {
        FetchError::Config(format!(
            "cannot read auth.entra.client_secret_file {}: {e}",
            path.display()
        ))
    })?;
    let value = text.trim();
    if value.is_empty() {
        return Err(FetchError::Config(format!(
            "auth.entra.client_secret_file {} is empty",
            path.display()
        )));
    }
    Ok(Secret::new(value))
}

/// The certificate's assertion, signed when the crate asks for it.
struct SignedAssertion {
    cert: Certificate,
    client_id: String,
    audience: String,
    send_chain: bool,
}

impl std::fmt::Debug for SignedAssertion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignedAssertion")
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

impl SignedAssertion {
    async fn load(
        file: &CertificateFile,
        client_id: &str,
        audience: &str,
    ) -> Result<SignedAssertion, FetchError> {
        let path = file.path.clone();
        let cert = tokio::task::spawn_blocking(move || Certificate::load(&path))
            .await
            .map_err(|_| FetchError::Internal("loading the certificate panicked".into()))?
            .map_err(|e| FetchError::Config(e.to_string()))?;
        Ok(SignedAssertion {
            cert,
            client_id: client_id.to_string(),
            audience: audience.to_string(),
            send_chain: file.send_chain,
        })
    }
}

#[async_trait::async_trait]
impl ClientAssertion for SignedAssertion {
    async fn secret(&self, _: Option<ClientMethodOptions<'_>>) -> azure_core::Result<String> {
        self.cert
            .assertion(
                &self.client_id,
                &self.audience,
                self.send_chain,
                SystemTime::now(),
            )
            .map_err(|m| azure_core::Error::with_message(ErrorKind::Credential, m))
    }
}

/// Runs the crate's `az`/`azd` commands with the [`EntraEnv`] snapshot as the whole
/// environment (so `PATH` is the one the proxy was given), stdin closed, killed
/// when the attempt is dropped.
#[derive(Debug)]
pub struct EnvExecutor {
    env: EntraEnv,
}

#[async_trait::async_trait]
impl Executor for EnvExecutor {
    async fn run(&self, program: &OsStr, args: &[&OsStr]) -> std::io::Result<std::process::Output> {
        tokio::process::Command::new(program)
            .args(args)
            .env_clear()
            .envs(self.env.iter())
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_answers_decide_over_the_crate_message() {
        let e = azure_core::Error::with_message(ErrorKind::Other, "whatever");
        let seen = Exchange::Refused(super::super::http::classify(
            429,
            Some(std::time::Duration::from_secs(4)),
            "slow".into(),
        ));
        let m = map_error(&e, Some(seen), false);
        assert_eq!(m.reason(), "throttled");
        assert_eq!(m.retry_after(), Some(std::time::Duration::from_secs(4)));
        let m = map_error(&e, Some(Exchange::Unreachable("refused".into())), false);
        assert_eq!(m.reason(), "network");
        let parse = azure_core::Error::with_error(
            ErrorKind::Credential,
            azure_core::Error::with_message(
                ErrorKind::DataConversion,
                "invalid type: string \"SECRETTOKEN\"",
            ),
            "ManagedIdentityCredential authentication failed. invalid type: string \"SECRETTOKEN\"",
        );
        let m = map_error(&parse, None, false);
        assert_eq!(m.reason(), "malformed");
        assert!(!m.to_string().contains("SECRET"), "{m}");
        let cli = azure_core::Error::with_message(
            ErrorKind::Credential,
            "ERROR: Please run 'az login' to setup account.\nTo troubleshoot, visit https://aka.ms/x",
        );
        let m = map_error(&cli, None, true);
        assert!(m.is_config(), "{m}");
        assert!(!m.to_string().contains("troubleshoot"), "{m}");
        let flaky = azure_core::Error::with_message(ErrorKind::Credential, "network hiccup");
        assert_eq!(map_error(&flaky, None, true).reason(), "network");
    }
}
