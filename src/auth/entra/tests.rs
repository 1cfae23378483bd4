//! Unit tests of [`super`].

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
fn authority_must_be_https_without_a_path() {
    assert!(token_url("http://login.example", "t").is_err());
    assert!(token_url("http://127.0.0.1:8080", "t").is_err());
    assert!(token_url("ftp://x", "t").is_err());
    assert!(token_url("https://login.example/some/path", "t").is_err());
    assert_eq!(
        token_url("https://127.0.0.1:8443/", "t").unwrap().as_str(),
        "https://127.0.0.1:8443/t/oauth2/v2.0/token"
    );
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
fn managed_identity_picks_the_platform_from_the_environment() {
    let cfg = entra(EntraCredentialKind::ManagedIdentity);
    let s = build_source(&cfg, &EntraEnv::default()).unwrap();
    assert!(s.describe().contains("169.254.169.254"), "{}", s.describe());
    assert!(s.describe().contains("azure_identity"), "{}", s.describe());
    let app = env(&[
        ("IDENTITY_ENDPOINT", "http://127.0.0.1:41234/msi/token"),
        ("IDENTITY_HEADER", "hdr-secret"),
    ]);
    assert_eq!(platform(&app), Platform::AppService);
    // Through the crate, which reads the process environment: this test process
    // has no IDENTITY_ENDPOINT, so the map is refused rather than silently ignored.
    let e = err(&cfg, &app);
    assert!(e.contains("process environment"), "{e}");
    assert!(!e.contains("hdr-secret"), "{e}");
    // A resource id is served by hand, from the map.
    let by_res = EntraConfig {
        resource_id: Some("/subscriptions/s/rg/x".into()),
        ..cfg.clone()
    };
    let s = build_source(&by_res, &app).unwrap();
    assert!(s.describe().contains("App Service"), "{}", s.describe());
    assert!(!s.describe().contains("hdr-secret"));
    assert!(!format!("{app:?}").contains("hdr-secret"));
    let arc = env(&[
        (
            "IDENTITY_ENDPOINT",
            "http://127.0.0.1:40342/metadata/identity/oauth2/token",
        ),
        ("IMDS_ENDPOINT", "http://127.0.0.1:40342"),
    ]);
    let s = build_source(&cfg, &arc).unwrap();
    assert!(s.describe().contains("Azure Arc"), "{}", s.describe());
    assert!(err(&by_res, &arc).contains("system-assigned only"));
    let shell = env(&[("MSI_ENDPOINT", "http://localhost:50342/oauth2/token")]);
    let s = build_source(&cfg, &shell).unwrap();
    assert!(s.describe().contains("Cloud Shell"), "{}", s.describe());
    let fabric = app.clone().with("IDENTITY_SERVER_THUMBPRINT", "ab12");
    assert!(err(&cfg, &fabric).contains("Service Fabric"));
    let ml = shell.with("MSI_SECRET", "x");
    assert!(err(&cfg, &ml).contains("Azure Machine Learning"));
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
fn the_process_environment_must_agree_with_the_snapshot() {
    let snap = env(&[("IDENTITY_ENDPOINT", "http://a"), ("IDENTITY_HEADER", "h")]);
    let same = |v: &str| snap.get(v).map(str::to_string);
    assert!(check_process_env(&snap, &same).is_ok());
    let other = |v: &str| (v == "IDENTITY_ENDPOINT").then(|| "http://b".to_string());
    let e = check_process_env(&snap, &other).unwrap_err().to_string();
    assert!(e.contains("IDENTITY_ENDPOINT"), "{e}");
    assert!(check_process_env(&EntraEnv::default(), &|_| None).is_ok());
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
