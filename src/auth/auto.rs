//! `auth.entra.credential = "auto"` (the default): which credential kind the
//! environment points at, decided once at start from the [`EntraEnv`] snapshot, the
//! `[auth.entra]` keys and a few local facts ([`Facts`]), never from a network
//! probe. [`super::entra`] logs the choice and its reason.
//!
//! The order follows `DefaultAzureCredential`: what the operator configured for
//! this proxy, then the `AZURE_*` environment credential (secret, certificate),
//! workload identity, the managed-identity platforms, then developer tools. Where
//! that credential probes IMDS with a short timeout, this looks at the machine's
//! DMI asset tag instead (every Azure VM carries Azure's), so a laptop with `az`
//! gets the developer tools at once and an Azure VM gets IMDS even with `az`
//! installed.

use super::env::EntraEnv;
use crate::config::{EntraConfig, EntraCredentialKind};
use std::path::Path;

/// The chassis asset tag of every Azure virtual machine (and AKS node).
pub const AZURE_ASSET_TAG: &str = "7783-7084-3265-9085";
const DMI_ASSET_TAG: &str = "/sys/class/dmi/id/chassis_asset_tag";

/// What the machine says about itself, read without any network request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Facts {
    /// `az` is on the snapshot's `PATH`.
    pub az: bool,
    /// `azd` is on the snapshot's `PATH`.
    pub azd: bool,
    /// The DMI chassis asset tag is Azure's.
    pub azure_vm: bool,
}

impl Facts {
    /// Look at `PATH` in `env` and at this machine's DMI data.
    pub fn gather(env: &EntraEnv) -> Facts {
        let tag = std::fs::read_to_string(DMI_ASSET_TAG).unwrap_or_default();
        Facts {
            az: super::env::find_on_path("az", env.get("PATH")).is_some(),
            azd: super::env::find_on_path("azd", env.get("PATH")).is_some(),
            azure_vm: tag.trim() == AZURE_ASSET_TAG,
        }
    }
}

/// The kind chosen and why, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    pub kind: EntraCredentialKind,
    pub reason: String,
}

fn set(p: &Option<std::path::PathBuf>) -> bool {
    p.as_deref().is_some_and(|p| p != Path::new(""))
}

/// The credential kind for `cfg` (whose `credential` is `auto`) in `env`.
pub fn choose(cfg: &EntraConfig, env: &EntraEnv, facts: &Facts) -> Choice {
    use EntraCredentialKind as K;
    let pick = |kind, reason: &str| Choice {
        kind,
        reason: reason.to_string(),
    };
    // What the operator set for this proxy says what they meant.
    if cfg.client_secret.as_ref().is_some_and(|s| !s.is_empty()) || set(&cfg.client_secret_file) {
        return pick(K::ClientSecret, "auth.entra.client_secret(_file) is set");
    }
    if set(&cfg.client_certificate_file) {
        return pick(
            K::ClientCertificate,
            "auth.entra.client_certificate_file is set",
        );
    }
    if set(&cfg.federated_token_file) {
        return pick(
            K::WorkloadIdentity,
            "auth.entra.federated_token_file is set",
        );
    }
    // The environment credential of the Azure SDKs.
    let tenant = cfg.tenant_id.is_some() || env.get("AZURE_TENANT_ID").is_some();
    let client = cfg.client_id.is_some() || env.get("AZURE_CLIENT_ID").is_some();
    if tenant && client && env.get("AZURE_CLIENT_SECRET").is_some() {
        return pick(
            K::ClientSecret,
            "AZURE_TENANT_ID, AZURE_CLIENT_ID and AZURE_CLIENT_SECRET are set",
        );
    }
    if tenant && client && env.get("AZURE_CLIENT_CERTIFICATE_PATH").is_some() {
        return pick(
            K::ClientCertificate,
            "AZURE_TENANT_ID, AZURE_CLIENT_ID and AZURE_CLIENT_CERTIFICATE_PATH are set",
        );
    }
    if env.get("AZURE_FEDERATED_TOKEN_FILE").is_some() {
        return pick(
            K::WorkloadIdentity,
            "AZURE_FEDERATED_TOKEN_FILE is set (AKS workload identity)",
        );
    }
    // Managed-identity platforms announce themselves.
    if env.get("IDENTITY_ENDPOINT").is_some() {
        return pick(
            K::ManagedIdentity,
            "IDENTITY_ENDPOINT is set (App Service, Functions, Container Apps, Azure Arc or Service Fabric)",
        );
    }
    if env.get("MSI_ENDPOINT").is_some() {
        return pick(
            K::ManagedIdentity,
            "MSI_ENDPOINT is set (Cloud Shell or Azure ML)",
        );
    }
    if cfg
        .imds_endpoint
        .as_deref()
        .is_some_and(|e| !e.trim().is_empty())
    {
        return pick(K::ManagedIdentity, "auth.entra.imds_endpoint is set");
    }
    if facts.azure_vm {
        return pick(
            K::ManagedIdentity,
            "this machine's DMI asset tag is Azure's (an Azure VM): IMDS",
        );
    }
    match (facts.az, facts.azd) {
        (true, true) => pick(
            K::DeveloperTools,
            "not an Azure VM, no identity variables; az and azd are on PATH (az first)",
        ),
        (true, false) => pick(
            K::AzureCli,
            "not an Azure VM, no identity variables; az is on PATH",
        ),
        (false, true) => pick(
            K::AzureDeveloperCli,
            "not an Azure VM, no identity variables; azd is on PATH",
        ),
        (false, false) => pick(
            K::ManagedIdentity,
            "nothing else found (no identity variables, no az or azd on PATH): IMDS, as on a VM whose DMI data is not readable",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;
    use EntraCredentialKind as K;

    fn env(pairs: &[(&str, &str)]) -> EntraEnv {
        pairs.iter().copied().collect()
    }

    fn kind(cfg: &EntraConfig, pairs: &[(&str, &str)], facts: &Facts) -> K {
        choose(cfg, &env(pairs), facts).kind
    }

    #[test]
    fn each_environment_shape_gets_its_credential() {
        let cfg = EntraConfig::default();
        assert_eq!(cfg.credential, K::Auto, "auto is the default");
        let none = Facts::default();
        let tc = [("AZURE_TENANT_ID", "t"), ("AZURE_CLIENT_ID", "c")];
        let with = |extra: &[(&'static str, &'static str)]| {
            let mut v = tc.to_vec();
            v.extend_from_slice(extra);
            v
        };
        assert_eq!(
            kind(&cfg, &with(&[("AZURE_CLIENT_SECRET", "s")]), &none),
            K::ClientSecret
        );
        assert_eq!(
            kind(
                &cfg,
                &with(&[("AZURE_CLIENT_CERTIFICATE_PATH", "/c.pem")]),
                &none
            ),
            K::ClientCertificate
        );
        // AKS workload identity: the webhook sets all four.
        assert_eq!(
            kind(
                &cfg,
                &with(&[
                    ("AZURE_FEDERATED_TOKEN_FILE", "/var/run/t"),
                    ("AZURE_AUTHORITY_HOST", "https://login.microsoftonline.com/")
                ]),
                &none
            ),
            K::WorkloadIdentity
        );
        // A secret alone (no tenant) is not the environment credential.
        assert_eq!(
            kind(&cfg, &[("AZURE_CLIENT_SECRET", "s")], &none),
            K::ManagedIdentity
        );
        for platform in [
            vec![("IDENTITY_ENDPOINT", "http://x"), ("IDENTITY_HEADER", "h")],
            vec![
                ("IDENTITY_ENDPOINT", "http://x"),
                ("IMDS_ENDPOINT", "http://y"),
            ],
            vec![("MSI_ENDPOINT", "http://x")],
        ] {
            let all = Facts {
                az: true,
                azd: true,
                azure_vm: false,
            };
            let c = choose(&cfg, &env(&platform), &all);
            assert_eq!(c.kind, K::ManagedIdentity, "{platform:?}");
            assert!(c.reason.contains("_ENDPOINT is set"), "{}", c.reason);
        }
        // An Azure VM with az installed is still IMDS; a laptop with az is az.
        let vm = Facts {
            az: true,
            azd: false,
            azure_vm: true,
        };
        assert_eq!(kind(&cfg, &[], &vm), K::ManagedIdentity);
        let laptop = Facts {
            azure_vm: false,
            ..vm.clone()
        };
        assert_eq!(kind(&cfg, &[], &laptop), K::AzureCli);
        let azd_only = Facts {
            azd: true,
            ..Facts::default()
        };
        assert_eq!(kind(&cfg, &[], &azd_only), K::AzureDeveloperCli);
        let both = Facts {
            az: true,
            azd: true,
            azure_vm: false,
        };
        assert_eq!(kind(&cfg, &[], &both), K::DeveloperTools);
        let c = choose(&cfg, &env(&[]), &none);
        assert_eq!(c.kind, K::ManagedIdentity);
        assert!(c.reason.contains("nothing else"), "{}", c.reason);
        // Configured endpoints and secrets win over tools on PATH.
        let imds = EntraConfig {
            imds_endpoint: Some("http://127.0.0.1:1/x".into()),
            ..cfg.clone()
        };
        assert_eq!(kind(&imds, &[], &both), K::ManagedIdentity);
        let secret = EntraConfig {
            client_secret: Some(Secret::new("s")),
            ..cfg.clone()
        };
        assert_eq!(
            kind(&secret, &[("MSI_ENDPOINT", "x")], &both),
            K::ClientSecret
        );
        let cert = EntraConfig {
            client_certificate_file: Some("/c.pem".into()),
            ..cfg
        };
        assert_eq!(kind(&cert, &[], &none), K::ClientCertificate);
    }
}
