//! `redis-entra-proxy check` against the local stack: a real TLS redis-server with
//! ACL users and the token emulator (IMDS), the binary run as a user would. Each
//! case checks the exit status, the failing step and its hint; the reports are
//! printed (`--nocapture`) for the README.

mod common;

use common::redis::{free_port, PlainRedis, RedisServer};
use common::token_emulator::{EmulatorConfig, Issued, TokenEmulator};
use std::process::Command;

/// The identity the emulator's tokens name (generation 1).
const OID: &str = "check-oid-1";

async fn emulator() -> TokenEmulator {
    TokenEmulator::start(EmulatorConfig {
        oid_prefix: "check-oid-".into(),
        ..Default::default()
    })
    .await
}

fn env(port: u16, ca: &std::path::Path, emu: &TokenEmulator) -> Vec<(String, String)> {
    [
        ("REDIS_ENTRA_PROXY_UPSTREAM__HOST", "localhost".to_string()),
        ("REDIS_ENTRA_PROXY_UPSTREAM__PORT", port.to_string()),
        (
            "REDIS_ENTRA_PROXY_UPSTREAM__CA_FILE",
            ca.display().to_string(),
        ),
        ("REDIS_ENTRA_PROXY_UPSTREAM__CONNECT_TIMEOUT", "3s".into()),
        (
            "REDIS_ENTRA_PROXY_AUTH__ENTRA__CREDENTIAL",
            "managed-identity".into(),
        ),
        (
            "REDIS_ENTRA_PROXY_AUTH__ENTRA__IMDS_ENDPOINT",
            emu.imds_endpoint(),
        ),
        ("REDIS_ENTRA_PROXY_LOG__LEVEL", "error".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// Run `check`: (exit code, stdout).
async fn check(env: Vec<(String, String)>) -> (i32, String) {
    tokio::task::spawn_blocking(move || {
        let out = Command::new(env!("CARGO_BIN_EXE_redis-entra-proxy"))
            .arg("check")
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        println!("{stdout}");
        (out.status.code().unwrap_or(-1), stdout)
    })
    .await
    .unwrap()
}

/// Give each token's oid an ACL user with `rules` (its password the token).
fn acl_user_per_token(redis: &RedisServer, emu: &TokenEmulator, rules: &'static [&'static str]) {
    let (port, ca) = (redis.port, redis.pki.ca_pem.clone());
    emu.on_issue(move |t: Issued| {
        let ca = ca.clone();
        async move {
            let pass = format!(">{}", t.token);
            let mut args = vec![
                "ACL".to_string(),
                "SETUSER".into(),
                t.oid.clone(),
                "on".into(),
                pass,
            ];
            args.extend(rules.iter().map(|r| r.to_string()));
            let out = common::redis::admin_cli(port, &ca)
                .args(&args)
                .output()
                .unwrap();
            assert!(String::from_utf8_lossy(&out.stdout).contains("OK"));
        }
    });
}

fn line<'a>(report: &'a str, step: &str) -> &'a str {
    report
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(step))
        .unwrap_or_else(|| panic!("no `{step}` line in:\n{report}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_working_configuration_passes_every_step() {
    let redis = RedisServer::start("someone-else", "unused");
    let emu = emulator().await;
    acl_user_per_token(&redis, &emu, &["~*", "&*", "+@all"]);
    let (code, report) = check(env(redis.port, &redis.pki.ca_pem, &emu)).await;
    assert_eq!(code, 0, "{report}");
    assert!(report.ends_with("all checks passed\n"), "{report}");
    let token = line(&report, "token");
    assert!(
        token.starts_with("ok")
            && token.contains("aud https://redis.azure.com")
            && token.contains(&format!("oid {OID}"))
            && token.contains("tenant emu-tenant")
            && token.contains("expires in"),
        "{token}"
    );
    // Never the token itself.
    let issued = emu.issued();
    assert!(!report.contains(&issued[0].token));
    assert!(line(&report, "tls").contains("TLS 1.3"), "{report}");
    assert!(
        line(&report, "tls").contains("localhost, 127.0.0.1"),
        "{report}"
    );
    assert!(line(&report, "auth").contains(&format!("AUTH as `{OID}` accepted")));
    assert!(line(&report, "hello").contains("redis 7"), "{report}");
    assert!(
        line(&report, "cluster").contains("not clustered"),
        "{report}"
    );
    assert!(line(&report, "acl").contains("ACL DRYRUN"), "{report}");
    assert!(
        line(&report, "latency").contains("PING round trip"),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_without_access_policy_gets_the_wrongpass_hint() {
    let redis = RedisServer::start("someone-else", "unused");
    let emu = emulator().await;
    let (code, report) = check(env(redis.port, &redis.pki.ca_pem, &emu)).await;
    assert_eq!(code, 1, "{report}");
    assert!(line(&report, "auth").starts_with("FAIL"), "{report}");
    assert!(
        report.contains("WRONGPASS") && report.contains("has no access policy"),
        "{report}"
    );
    assert!(line(&report, "hello").starts_with("skip"), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_too_narrow_for_the_proxy_is_named() {
    let redis = RedisServer::start("someone-else", "unused");
    let emu = emulator().await;
    // Enough to log in, not to keep a connection alive or learn the commands.
    acl_user_per_token(
        &redis,
        &emu,
        &["~*", "resetchannels", "-@all", "+hello", "+auth", "+get"],
    );
    let (code, report) = check(env(redis.port, &redis.pki.ca_pem, &emu)).await;
    assert_eq!(code, 1, "{report}");
    let acl = line(&report, "acl");
    assert!(
        acl.starts_with("FAIL") && acl.contains("PING") && acl.contains("COMMAND COUNT"),
        "{report}"
    );
    assert!(report.contains("too narrow"), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_nothing_listens_on_is_named() {
    let emu = emulator().await;
    let dir = tempfile::tempdir().unwrap();
    let pki = common::certs::make(dir.path(), "x", &["localhost"]);
    let (code, report) = check(env(free_port(), &pki.ca_pem, &emu)).await;
    assert_eq!(code, 1, "{report}");
    assert!(line(&report, "token").starts_with("ok"), "{report}");
    let connect = line(&report, "connect");
    assert!(
        connect.starts_with("FAIL") && connect.contains("refused"),
        "{report}"
    );
    assert!(report.contains("upstream.port"), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_port_is_named() {
    let plain = PlainRedis::start();
    let emu = emulator().await;
    let dir = tempfile::tempdir().unwrap();
    let pki = common::certs::make(dir.path(), "x", &["localhost"]);
    let (code, report) = check(env(plain.port, &pki.ca_pem, &emu)).await;
    assert_eq!(code, 1, "{report}");
    let tls = line(&report, "tls");
    assert!(
        tls.starts_with("FAIL") && tls.contains("did not speak TLS"),
        "{report}"
    );
    assert!(report.contains("plaintext port?"), "{report}");
}

/// The server's chain has an expired intermediate CA (root -> expired
/// intermediate -> server), as after a missed CA rotation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_ca_in_the_chain_is_named() {
    let redis = RedisServer::start("someone-else", "unused");
    let emu = emulator().await;
    let dir = tempfile::tempdir().unwrap();
    let (root_pem, chain_pem, key_pem) = expired_intermediate_chain(dir.path());
    let out = redis.cli(&[
        "CONFIG",
        "SET",
        "tls-cert-file",
        chain_pem.to_str().unwrap(),
        "tls-key-file",
        key_pem.to_str().unwrap(),
    ]);
    assert!(out.contains("OK"), "{out}");
    let (code, report) = check(env(redis.port, &root_pem, &emu)).await;
    assert_eq!(code, 1, "{report}");
    assert!(line(&report, "token").starts_with("ok"), "{report}");
    let tls = line(&report, "tls");
    assert!(
        tls.starts_with("FAIL") && tls.to_lowercase().contains("expired"),
        "{report}"
    );
    assert!(report.contains("has expired"), "{report}");
}

/// root (valid) -> intermediate (expired in 2021) -> server (localhost); returns
/// the root's PEM file, the server's chain (server + intermediate) and its key.
fn expired_intermediate_chain(
    dir: &std::path::Path,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let root_key = KeyPair::generate().unwrap();
    let mut root = CertificateParams::new(Vec::<String>::new()).unwrap();
    root.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    root.distinguished_name
        .push(rcgen::DnType::CommonName, "check test root");
    let root_cert = root.self_signed(&root_key).unwrap();
    let mid_key = KeyPair::generate().unwrap();
    let mut mid = CertificateParams::new(Vec::<String>::new()).unwrap();
    mid.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    mid.distinguished_name.push(
        rcgen::DnType::CommonName,
        "check test intermediate (expired)",
    );
    mid.not_before = rcgen::date_time_ymd(2020, 1, 1);
    mid.not_after = rcgen::date_time_ymd(2021, 1, 1);
    let mid_cert = mid
        .signed_by(&mid_key, &Issuer::from_params(&root, &root_key))
        .unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    let leaf_cert = leaf
        .signed_by(&leaf_key, &Issuer::from_params(&mid, &mid_key))
        .unwrap();
    let root_pem = dir.join("root.pem");
    let chain_pem = dir.join("chain.pem");
    let key_pem = dir.join("key.pem");
    std::fs::write(&root_pem, root_cert.pem()).unwrap();
    std::fs::write(&chain_pem, leaf_cert.pem() + &mid_cert.pem()).unwrap();
    std::fs::write(&key_pem, leaf_key.serialize_pem()).unwrap();
    (root_pem, chain_pem, key_pem)
}

/// A scope for another resource gets a token the cache would refuse: the token
/// step says the audience is wrong and names the setting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_for_another_audience_is_named() {
    let redis = RedisServer::start("someone-else", "unused");
    let emu = emulator().await;
    let mut env = env(redis.port, &redis.pki.ca_pem, &emu);
    env.push((
        "REDIS_ENTRA_PROXY_AUTH__ENTRA__SCOPE".into(),
        "https://management.azure.com/.default".into(),
    ));
    let (code, report) = check(env).await;
    assert_eq!(code, 1, "{report}");
    let token = line(&report, "token");
    assert!(
        token.starts_with("FAIL") && token.contains("aud https://management.azure.com"),
        "{report}"
    );
    assert!(
        report.contains("audience wrong") && report.contains("auth.entra.scope"),
        "{report}"
    );
}
