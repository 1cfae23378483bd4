//! Managed identity: which platform the environment describes (IMDS, App Service,
//! Arc, Cloud Shell, ...), as `azure_identity` decides it, and the source for it
//! (the crate's, or a hand-written one where the crate cannot serve). Part of
//! [`super`], which picks the credential kind.

use super::*;

/// The managed-identity platform the environment describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Platform {
    Imds,
    AppService,
    Arc,
    CloudShell,
    ServiceFabric,
    AzureMl,
}

/// The platform, decided as `azure_identity` does from the same variables.
pub fn platform(env: &EntraEnv) -> Platform {
    if env.get("IDENTITY_ENDPOINT").is_some() {
        if env.get("IDENTITY_HEADER").is_some() {
            if env.get("IDENTITY_SERVER_THUMBPRINT").is_some() {
                return Platform::ServiceFabric;
            }
            return Platform::AppService;
        }
        if env.get("IMDS_ENDPOINT").is_some() {
            return Platform::Arc;
        }
    } else if env.get("MSI_ENDPOINT").is_some() {
        if env.get("MSI_SECRET").is_some() {
            return Platform::AzureMl;
        }
        return Platform::CloudShell;
    }
    Platform::Imds
}

/// The crate reads the platform variables from the process: refuse to go on if
/// they differ from the snapshot the proxy decided from.
pub(super) fn check_process_env(
    env: &EntraEnv,
    process: &dyn Fn(&str) -> Option<String>,
) -> Result<(), AuthError> {
    for var in PLATFORM_VARS {
        if process(var).as_deref() != env.get(var) {
            return Err(config_err(format!(
                "managed identity through azure_identity reads {var} from the process environment, and there it differs from the environment the proxy was given"
            )));
        }
    }
    Ok(())
}

pub(super) fn process_var(var: &str) -> Option<String> {
    std::env::var(var).ok()
}

pub(super) fn endpoint_url(var: &str, env: &EntraEnv) -> Result<Url, AuthError> {
    Url::parse(env.get(var).unwrap_or_default())
        .map_err(|e| config_err(format!("the environment variable {var} is not a URL ({e})")))
}

pub(super) fn managed_identity(
    cfg: &EntraConfig,
    env: &EntraEnv,
    scope: &str,
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
    let client = http::http_client(cfg.ca_file.as_deref(), None, cfg.attempt_timeout)?;
    let user_assigned_unsupported = |platform: &str| {
        config_err(format!(
            "{platform} managed identity is system-assigned only: unset {}, {} and {}",
            describe_key("auth.entra.client_id"),
            describe_key("auth.entra.object_id"),
            describe_key("auth.entra.resource_id")
        ))
    };
    let describe = |where_: String| {
        format!(
            "managed identity ({}, {where_}, azure_identity)",
            crate::auth::azure::describe_id(&id)
        )
    };
    match platform(env) {
        Platform::ServiceFabric => Err(config_err(
            "Service Fabric managed identity (IDENTITY_SERVER_THUMBPRINT is set) is not supported: azure_identity has no credential for it and its endpoint's certificate must be pinned by thumbprint; use a client certificate or secret instead",
        )),
        Platform::AzureMl => Err(config_err(
            "Azure Machine Learning managed identity (MSI_ENDPOINT with MSI_SECRET) is not supported: azure_identity has no credential for it; use a client certificate or secret instead",
        )),
        Platform::Arc => {
            if id.is_some() {
                return Err(user_assigned_unsupported("Azure Arc"));
            }
            Ok(Arc::new(ArcSource::new(
                client,
                endpoint_url("IDENTITY_ENDPOINT", env)?,
                resource,
                cfg.arc_key_directory.clone(),
            )))
        }
        Platform::CloudShell => {
            if id.is_some() {
                return Err(user_assigned_unsupported("Cloud Shell"));
            }
            Ok(Arc::new(CloudShellSource::new(
                client,
                endpoint_url("MSI_ENDPOINT", env)?,
                resource,
            )))
        }
        Platform::AppService if matches!(id, Some(ManagedIdentityId::ResourceId(_))) => {
            Ok(Arc::new(AppServiceSource::new(
                client,
                endpoint_url("IDENTITY_ENDPOINT", env)?,
                Secret::new(env.get("IDENTITY_HEADER").unwrap_or_default()),
                resource,
                id,
            )))
        }
        Platform::AppService => {
            check_process_env(env, &process_var)?;
            let url = endpoint_url("IDENTITY_ENDPOINT", env)?;
            Ok(Arc::new(CrateSource::new(
                CrateKind::ManagedIdentity { id: id.clone(), rewrite: None },
                scope.to_string(),
                Some(client),
                None,
                env.clone(),
                describe(format!("App Service IDENTITY_ENDPOINT {url}")),
            )?))
        }
        Platform::Imds => {
            check_process_env(env, &process_var)?;
            let configured = cfg
                .imds_endpoint
                .as_deref()
                .filter(|e| !e.trim().is_empty());
            let target = Url::parse(configured.unwrap_or(DEFAULT_IMDS_ENDPOINT)).map_err(|e| {
                config_err(format!(
                    "{} is not a URL ({e})",
                    describe_key("auth.entra.imds_endpoint")
                ))
            })?;
            let from = Url::parse(DEFAULT_IMDS_ENDPOINT).expect("constant URL");
            let rewrite = (target != from).then(|| Rewrite {
                from,
                to: target.clone(),
            });
            Ok(Arc::new(CrateSource::new(
                CrateKind::ManagedIdentity { id: id.clone(), rewrite },
                scope.to_string(),
                Some(client),
                None,
                env.clone(),
                describe(format!("IMDS {target}")),
            )?))
        }
    }
}
