//! The credential kinds added with azure_identity, against the token emulator
//! (`common::token_emulator`) and fake `az`/`azd` on an injected PATH: client
//! certificate (assertion signature checked), Azure Arc (401 challenge and key
//! file), Cloud Shell, App Service through the crate (in a child process, since
//! the crate reads the process environment), azd, developer tools, the `auto`
//! choice, and a caching endpoint whose repeated token is not a new generation.
//! Loopback only; every wait is bounded.

mod common;

use common::rotator::{env, secs, start};

use common::token_emulator::{
    az_output, azd_output, fake_cli, EmulatorConfig, Endpoint, TokenEmulator,
};
use redis_entra_proxy::auth::{self, EntraEnv};
use redis_entra_proxy::config::{AuthConfig, EntraConfig, EntraCredentialKind};
use redis_entra_proxy::metrics::Metrics;
use std::process::Command;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;

fn auth_config(kind: EntraCredentialKind, f: impl FnOnce(&mut EntraConfig)) -> AuthConfig {
    common::rotator::auth_config_with(kind, secs(3), f)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn jwt_with(payload: &str) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    format!(
        "{}.{}.c2ln",
        URL_SAFE_NO_PAD.encode(r#"{"typ":"JWT","alg":"RS256"}"#),
        URL_SAFE_NO_PAD.encode(payload)
    )
}

/// An RSA key and self-signed certificate made by the openssl command (ring cannot
/// generate RSA keys): the PEM for the proxy and the public key (PKCS#1 DER) for
/// the emulator.
fn rsa_certificate(dir: &std::path::Path) -> (std::path::PathBuf, Vec<u8>) {
    let key = dir.join("key.pem");
    let cert = dir.join("cert.pem");
    let ok = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=redis-entra-proxy-test"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl (scripts/install-deps.sh installs it)");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let public = Command::new("openssl")
        .args(["rsa", "-RSAPublicKey_out", "-outform", "DER", "-in"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(public.status.success());
    let both = dir.join("both.pem");
    let pem = format!(
        "{}{}",
        std::fs::read_to_string(&cert).unwrap(),
        std::fs::read_to_string(&key).unwrap()
    );
    std::fs::write(&both, pem).unwrap();
    (both, public.stdout)
}

#[tokio::test]
async fn client_certificate_assertion_is_signed_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let (pem, public) = rsa_certificate(dir.path());
    let emu = TokenEmulator::start(EmulatorConfig {
        client_public_key: Some(public),
        ..Default::default()
    })
    .await;
    let e = emu.config();
    let cfg = auth_config(EntraCredentialKind::ClientCertificate, |c| {
        c.ca_file = Some(emu.ca_file().to_path_buf());
    });
    // From the AZURE_* variables, as the other Azure SDKs take them.
    let vars = env(&[
        ("AZURE_TENANT_ID", &e.tenant),
        ("AZURE_CLIENT_ID", &e.client_id),
        ("AZURE_CLIENT_CERTIFICATE_PATH", pem.to_str().unwrap()),
        ("AZURE_AUTHORITY_HOST", &emu.authority_host()),
    ]);
    let mut r = start(&cfg, vars.clone());
    let s = r.until(secs(10), "the state", |s| s.generation == 1).await;
    assert_eq!(s.current.unwrap().username, "emu-oid-1");
    let req = &emu.requests()[0];
    assert_eq!(req.endpoint, Endpoint::Entra);
    assert!(!req.form.contains_key("client_secret"));
    drop(r);

    // A certificate the app registration does not know: its signature fails the
    // emulator's check (401), a configuration error.
    let other = tempfile::tempdir().unwrap();
    let (wrong, _) = rsa_certificate(other.path());
    let mut r = start(
        &cfg,
        vars.with("AZURE_CLIENT_CERTIFICATE_PATH", wrong.to_str().unwrap()),
    );
    let s = r
        .until(secs(10), "the state", |s| s.last_error.is_some())
        .await;
    let err = s.last_error.unwrap();
    assert!(
        err.contains("401") && err.contains("AADSTS7000215"),
        "{err}"
    );
    assert!(!err.contains("PRIVATE KEY"), "{err}");
    assert_eq!(emu.issued().len(), 1);

    // A file that holds no key is refused at start, naming the key.
    std::fs::write(dir.path().join("cert-only.pem"), "not pem").unwrap();
    let bad = auth_config(EntraCredentialKind::ClientCertificate, |c| {
        c.tenant_id = Some(e.tenant.clone());
        c.client_id = Some(e.client_id.clone());
        c.client_certificate_file = Some(dir.path().join("cert-only.pem"));
    });
    let Err(err) = auth::start_with_env(
        &bad,
        Arc::new(Metrics::new()),
        EntraEnv::default(),
        CancellationToken::new(),
    ) else {
        panic!("an unusable certificate file was accepted")
    };
    assert!(
        err.to_string()
            .contains("auth.entra.client_certificate_file"),
        "{err}"
    );
}

#[tokio::test]
async fn azure_arc_answers_its_challenge_from_the_key_file() {
    let emu = TokenEmulator::start(EmulatorConfig::default()).await;
    let cfg = auth_config(EntraCredentialKind::ManagedIdentity, |c| {
        c.arc_key_directory = emu.arc_key_dir().to_path_buf();
    });
    let arc = env(&[
        ("IDENTITY_ENDPOINT", &emu.arc_endpoint()),
        ("IMDS_ENDPOINT", "http://127.0.0.1:9"),
    ]);
    let mut r = start(&cfg, arc.clone());
    let s = r.until(secs(10), "the state", |s| s.generation == 1).await;
    assert_eq!(s.current.unwrap().username, "emu-oid-1");
    let reqs = emu.requests();
    assert_eq!(reqs[0].status, 401, "the challenge");
    assert_eq!(reqs[1].status, 200);
    assert!(reqs[1].headers["authorization"].starts_with("Basic "));
    assert_eq!(reqs[1].query["api-version"], "2020-06-01");
    drop(r);

    // A key directory that is not the agent's: the challenge is refused, the
    // file never read or sent.
    let elsewhere = tempfile::tempdir().unwrap();
    let cfg = auth_config(EntraCredentialKind::ManagedIdentity, |c| {
        c.arc_key_directory = elsewhere.path().to_path_buf();
    });
    let before = emu.request_count();
    let mut r = start(&cfg, arc);
    let s = r
        .until(secs(10), "the state", |s| s.last_error.is_some())
        .await;
    let err = s.last_error.unwrap();
    assert!(err.contains("Azure Arc challenge refused"), "{err}");
    let after: Vec<_> = emu.requests()[before..].to_vec();
    assert!(after
        .iter()
        .all(|q| !q.headers.contains_key("authorization")));
}

#[tokio::test]
async fn cloud_shell_posts_the_resource() {
    let emu = TokenEmulator::start(EmulatorConfig::default()).await;
    let cfg = auth_config(EntraCredentialKind::Auto, |_| {});
    let mut r = start(&cfg, env(&[("MSI_ENDPOINT", &emu.cloud_shell_endpoint())]));
    let s = r.until(secs(10), "the state", |s| s.generation == 1).await;
    assert_eq!(s.current.unwrap().username, "emu-oid-1");
    let req = &emu.requests()[0];
    assert_eq!(req.endpoint, Endpoint::CloudShell);
    assert_eq!(req.method, "POST");
    assert_eq!(req.form["resource"], "https://redis.azure.com");
}

/// Run `test` of this binary in a child process with `vars` in its real
/// environment: the crate's managed identity reads the process environment.
async fn in_child(test: &str, vars: &[(&str, &str)]) {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = tokio::process::Command::new(exe);
    cmd.args([test, "--exact", "--ignored", "--nocapture"])
        .envs(vars.iter().copied())
        .kill_on_drop(true);
    let out = tokio::time::timeout(secs(30), cmd.output())
        .await
        .expect("child test finished in time")
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("1 passed"),
        "child failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn app_service_through_the_crate() {
    let emu = TokenEmulator::start(EmulatorConfig::default()).await;
    let header = emu.identity_header();
    in_child(
        "app_service_child",
        &[
            ("IDENTITY_ENDPOINT", &emu.identity_endpoint()),
            ("IDENTITY_HEADER", &header),
        ],
    )
    .await;
    let reqs = emu.requests();
    assert_eq!(reqs.len(), 1, "{reqs:?}");
    assert_eq!(reqs[0].endpoint, Endpoint::AppService);
    assert_eq!(reqs[0].status, 200);
    assert_eq!(reqs[0].headers["x-identity-header"], header);
    assert_eq!(reqs[0].query["api-version"], "2019-08-01");
    assert_eq!(reqs[0].query["client_id"], "app-client");
}

/// The child half of [`app_service_through_the_crate`]; run only by it.
#[tokio::test]
#[ignore = "run by app_service_through_the_crate in a child process with App Service variables"]
async fn app_service_child() {
    let cfg = auth_config(EntraCredentialKind::Auto, |c| {
        c.client_id = Some("app-client".into());
    });
    let mut r = start(&cfg, EntraEnv::from_process());
    let s = r.until(secs(10), "the state", |s| s.generation == 1).await;
    assert_eq!(s.current.unwrap().username, "emu-oid-1");
}

#[tokio::test]
async fn azd_and_the_developer_tools_chain() {
    let dir = tempfile::tempdir().unwrap();
    let exp = unix_now() + 3600;
    let token = jwt_with(r#"{"oid":"azd-oid"}"#);
    fake_cli(dir.path(), "azd", &azd_output(&token, exp), "", 0);
    let path = format!("{}:/usr/bin:/bin", dir.path().display());
    // azd alone on PATH: auto picks it.
    let cfg = auth_config(EntraCredentialKind::Auto, |_| {});
    let mut r = start(&cfg, env(&[("PATH", &path), ("HOME", "/home/dev")]));
    let s = r.until(secs(10), "the state", |s| s.generation == 1).await;
    let cred = s.current.unwrap();
    assert_eq!(cred.username, "azd-oid");
    assert_eq!(cred.password.expose(), token);
    assert_eq!(cred.expires_at, Some(UNIX_EPOCH + secs(exp)));
    let log = std::fs::read_to_string(dir.path().join("azd-args.log")).unwrap();
    assert!(
        log.contains("auth token -o json --no-prompt --scope https://redis.azure.com/.default"),
        "{log}"
    );
    drop(r);

    // The chain: a logged-out az first, then azd.
    fake_cli(
        dir.path(),
        "az",
        "",
        "ERROR: Please run 'az login' to setup account.",
        1,
    );
    let cfg = auth_config(EntraCredentialKind::DeveloperTools, |_| {});
    let mut r = start(&cfg, env(&[("PATH", &path)]));
    let s = r.until(secs(10), "the state", |s| s.generation == 1).await;
    assert_eq!(s.current.unwrap().username, "azd-oid");
    let az_log = std::fs::read_to_string(dir.path().join("az-args.log")).unwrap();
    assert!(az_log.contains("account get-access-token"), "{az_log}");
    drop(r);

    // az logged in: the chain takes az's token.
    let az_token = jwt_with(r#"{"oid":"az-oid"}"#);
    fake_cli(dir.path(), "az", &az_output(&az_token, exp), "", 0);
    let mut r = start(&cfg, env(&[("PATH", &path)]));
    let s = r.until(secs(10), "the state", |s| s.generation == 1).await;
    assert_eq!(s.current.unwrap().username, "az-oid");
}

#[tokio::test]
async fn auto_follows_the_environment() {
    let emu = TokenEmulator::start(EmulatorConfig::default()).await;
    let e = emu.config();
    let cfg = auth_config(EntraCredentialKind::Auto, |c| {
        c.ca_file = Some(emu.ca_file().to_path_buf());
    });
    // The AZURE_* environment credential with a secret.
    let mut r = start(
        &cfg,
        env(&[
            ("AZURE_TENANT_ID", &e.tenant),
            ("AZURE_CLIENT_ID", &e.client_id),
            ("AZURE_CLIENT_SECRET", &e.client_secret),
            ("AZURE_AUTHORITY_HOST", &emu.authority_host()),
        ]),
    );
    r.until(secs(10), "the state", |s| s.generation == 1).await;
    let req = emu.requests().last().unwrap().clone();
    assert_eq!(req.endpoint, Endpoint::Entra);
    assert_eq!(req.form["client_secret"], e.client_secret);
    drop(r);

    // Workload identity's variables.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, "federated").unwrap();
    let mut r = start(
        &cfg,
        env(&[
            ("AZURE_TENANT_ID", &e.tenant),
            ("AZURE_CLIENT_ID", &e.client_id),
            ("AZURE_FEDERATED_TOKEN_FILE", file.to_str().unwrap()),
            ("AZURE_AUTHORITY_HOST", &emu.authority_host()),
        ]),
    );
    r.until(secs(10), "the state", |s| s.generation == 1).await;
    let req = emu.requests().last().unwrap().clone();
    assert_eq!(req.form["client_assertion"], "federated");
    drop(r);

    // Only an IMDS endpoint configured: managed identity.
    let cfg = auth_config(EntraCredentialKind::Auto, |c| {
        c.imds_endpoint = Some(emu.imds_endpoint());
    });
    let mut r = start(&cfg, EntraEnv::default());
    r.until(secs(10), "the state", |s| s.generation == 1).await;
    assert_eq!(emu.requests().last().unwrap().endpoint, Endpoint::Imds);
}

#[tokio::test]
async fn a_caching_endpoint_is_asked_again_without_a_new_generation() {
    // 20 s tokens, handed back for 16 s: the refresh at 13-15 s gets the same token.
    let emu = TokenEmulator::start(EmulatorConfig {
        lifetime: secs(20),
        cache_for: Some(secs(16)),
        ..Default::default()
    })
    .await;
    let cfg = auth_config(EntraCredentialKind::ManagedIdentity, |c| {
        c.imds_endpoint = Some(emu.imds_endpoint());
    });
    let mut r = start(&cfg, EntraEnv::default());
    r.until(secs(10), "the state", |s| s.generation == 1).await;
    let mut changes = 0;
    let deadline = tokio::time::Instant::now() + secs(25);
    while r.rx.borrow().generation < 2 {
        assert!(tokio::time::Instant::now() < deadline, "no generation 2");
        if tokio::time::timeout(secs(1), r.rx.changed()).await.is_ok() {
            changes += 1;
        }
    }
    let s = r.rx.borrow().clone();
    assert_eq!(s.generation, 2);
    assert_eq!(changes, 1, "the repeated token was not published");
    assert_eq!(emu.issued().len(), 2);
    assert!(emu.request_count() >= 3, "asked again after the repeat");
    let m = r.metrics.render();
    assert!(
        m.contains(r#"token_refreshes_total{outcome="ok",reason="unchanged"}"#),
        "{m}"
    );
    assert!(
        m.contains("redis_entra_proxy_token_expiry_timestamp_seconds "),
        "{m}"
    );
    assert!(
        m.contains("redis_entra_proxy_token_last_refresh_success_timestamp_seconds "),
        "{m}"
    );
}
