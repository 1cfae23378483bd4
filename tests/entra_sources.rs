//! The Entra token sources and the rotator against the token-endpoint emulator
//! (`common::token_emulator`): each credential kind gets a real token over real
//! HTTP (plain for IMDS and App Service, https with a test CA for the Entra v2
//! endpoint), rotation happens before expiry with short-lived tokens, and scripted
//! endpoint failures are survived. No Redis, no network beyond loopback; every
//! wait is bounded.

mod common;

use common::rotator::{env, secs, start};

use common::token_emulator::{EmulatorConfig, Endpoint, Fault, TokenEmulator};
use redis_entra_proxy::auth::{EntraEnv, TokenState};
use redis_entra_proxy::config::{AuthConfig, EntraConfig, EntraCredentialKind};
use redis_entra_proxy::secret::Secret;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

const REDIS_RESOURCE: &str = "https://redis.azure.com";

fn auth_config(kind: EntraCredentialKind, f: impl FnOnce(&mut EntraConfig)) -> AuthConfig {
    common::rotator::auth_config_with(kind, secs(2), f)
}

/// The published credential is exactly what the emulator issued as `generation`.
fn assert_published(state: &TokenState, emu: &TokenEmulator, generation: u64) {
    let issued = &emu.issued()[generation as usize - 1];
    let cred = state.current.as_ref().expect("a credential");
    assert_eq!(cred.username, issued.oid);
    assert_eq!(cred.password.expose(), issued.token);
    let exp = cred.expires_at.expect("an expiry");
    let skew = exp
        .duration_since(issued.expires_at)
        .unwrap_or_else(|e| e.duration());
    assert!(skew <= secs(2), "expiry off by {skew:?}");
    assert!(state.usable(SystemTime::now()).is_some());
}

#[tokio::test]
async fn imds_system_and_user_assigned() {
    let emu = TokenEmulator::start(EmulatorConfig::default()).await;
    let hook_ran = Arc::new(AtomicBool::new(false));
    let flag = hook_ran.clone();
    emu.on_issue(move |_t| {
        let flag = flag.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            flag.store(true, Ordering::SeqCst);
        }
    });
    let cfg = auth_config(EntraCredentialKind::ManagedIdentity, |e| {
        e.imds_endpoint = Some(emu.imds_endpoint());
    });
    let mut r = start(&cfg, EntraEnv::default());
    let s = r.generation(1, secs(10)).await;
    assert!(
        hook_ran.load(Ordering::SeqCst),
        "the hook runs before the client gets the token"
    );
    assert_published(&s, &emu, 1);
    assert!(s.last_error.is_none());
    let req = &emu.requests()[0];
    assert_eq!(req.endpoint, Endpoint::Imds);
    assert_eq!(req.method, "GET");
    assert_eq!(
        req.headers.get("metadata").map(String::as_str),
        Some("true")
    );
    // azure_identity's IMDS request, at the configured endpoint instead of 169.254.169.254.
    assert_eq!(req.query["api-version"], "2019-08-01");
    assert_eq!(req.query["resource"], REDIS_RESOURCE);
    assert!(!req.query.contains_key("client_id"));
    assert_eq!(r.metric("ok", "ok"), 1);
    drop(r);

    // User-assigned: each way of naming the identity becomes its IMDS parameter.
    for (param, set) in [
        (
            "client_id",
            (|e: &mut EntraConfig| e.client_id = Some("the-id".into())) as fn(&mut EntraConfig),
        ),
        ("object_id", |e: &mut EntraConfig| {
            e.object_id = Some("the-id".into())
        }),
        ("msi_res_id", |e: &mut EntraConfig| {
            e.resource_id = Some("the-id".into())
        }),
    ] {
        let before = emu.request_count();
        let cfg = auth_config(EntraCredentialKind::ManagedIdentity, |e| {
            e.imds_endpoint = Some(emu.imds_endpoint());
            set(e);
        });
        let mut r = start(&cfg, EntraEnv::default());
        r.generation(1, secs(10)).await;
        let req = &emu.requests()[before];
        assert_eq!(
            req.query.get(param).map(String::as_str),
            Some("the-id"),
            "{param}"
        );
    }
}

#[tokio::test]
async fn workload_identity_rereads_the_federated_token_file() {
    let emu = TokenEmulator::start(EmulatorConfig {
        lifetime: secs(4),
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("azure-identity-token");
    std::fs::write(&token_file, "kubelet-assertion-1").unwrap();
    let emu_cfg = emu.config();
    let cfg = auth_config(EntraCredentialKind::WorkloadIdentity, |e| {
        e.ca_file = Some(emu.ca_file().to_path_buf());
    });
    // Everything from the variables the AKS webhook injects.
    let wi_env = env(&[
        ("AZURE_TENANT_ID", &emu_cfg.tenant),
        ("AZURE_CLIENT_ID", &emu_cfg.client_id),
        ("AZURE_FEDERATED_TOKEN_FILE", token_file.to_str().unwrap()),
        ("AZURE_AUTHORITY_HOST", &emu.authority_host()),
    ]);
    let mut r = start(&cfg, wi_env);
    let s = r.generation(1, secs(10)).await;
    assert_published(&s, &emu, 1);
    let req = &emu.requests()[0];
    assert_eq!(req.endpoint, Endpoint::Entra);
    assert!(req.tls, "workload identity goes over https");
    assert_eq!(req.path, format!("/{}/oauth2/v2.0/token", emu_cfg.tenant));
    assert_eq!(req.form["client_assertion"], "kubelet-assertion-1");
    assert_eq!(
        req.form["client_assertion_type"],
        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    );
    assert_eq!(req.form["scope"], "https://redis.azure.com/.default");
    assert_eq!(req.form["grant_type"], "client_credentials");
    assert!(!req.form.contains_key("client_secret"));

    // Kubelet rotates the file: the next exchange sends the new content, and the
    // emulator now refuses the old one.
    std::fs::write(&token_file, "kubelet-assertion-2").unwrap();
    emu.expect_assertion(Some("kubelet-assertion-2"));
    let s = r.generation(2, secs(10)).await;
    assert_published(&s, &emu, 2);
    let last = emu.requests().last().unwrap().clone();
    assert_eq!(last.form["client_assertion"], "kubelet-assertion-2");
    assert_eq!(r.metric("failed", "config"), 0);
}

#[tokio::test]
async fn workload_identity_config_keys_win_and_tls_is_verified() {
    let emu = TokenEmulator::start(EmulatorConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "assertion").unwrap();
    let emu_cfg = emu.config();
    // Config keys win over the (wrong) environment.
    let wrong_env = env(&[
        ("AZURE_TENANT_ID", "wrong-tenant"),
        ("AZURE_CLIENT_ID", "wrong-client"),
        ("AZURE_FEDERATED_TOKEN_FILE", "/nonexistent"),
        ("AZURE_AUTHORITY_HOST", "https://127.0.0.1:9"),
    ]);
    let cfg = auth_config(EntraCredentialKind::WorkloadIdentity, |e| {
        e.tenant_id = Some(emu_cfg.tenant.clone());
        e.client_id = Some(emu_cfg.client_id.clone());
        e.federated_token_file = Some(token_file.clone());
        e.authority_host = Some(emu.authority_host());
        e.ca_file = Some(emu.ca_file().to_path_buf());
    });
    let mut r = start(&cfg, wrong_env.clone());
    let s = r.generation(1, secs(10)).await;
    assert_published(&s, &emu, 1);
    drop(r);

    // Without the test CA the emulator's certificate is not trusted: no token.
    let before = emu.issued().len();
    let cfg = auth_config(EntraCredentialKind::WorkloadIdentity, |e| {
        e.tenant_id = Some(emu_cfg.tenant.clone());
        e.client_id = Some(emu_cfg.client_id.clone());
        e.federated_token_file = Some(token_file.clone());
        e.authority_host = Some(emu.authority_host());
    });
    let mut r = start(&cfg, wrong_env);
    let s = r
        .until(secs(10), "an error", |s| s.last_error.is_some())
        .await;
    let e = s.last_error.unwrap();
    assert!(s.current.is_none());
    assert!(e.to_lowercase().contains("certificate"), "{e}");
    assert_eq!(emu.issued().len(), before);
    assert_eq!(r.metric("failed", "network"), 1);
}

#[tokio::test]
async fn client_secret_from_env_and_from_a_file() {
    let emu = TokenEmulator::start(EmulatorConfig::default()).await;
    let emu_cfg = emu.config();
    let base = |e: &mut EntraConfig| {
        e.tenant_id = Some(emu_cfg.tenant.clone());
        e.client_id = Some(emu_cfg.client_id.clone());
        e.authority_host = Some(emu.authority_host());
        e.ca_file = Some(emu.ca_file().to_path_buf());
    };
    // The secret as it arrives from REDIS_ENTRA_PROXY_AUTH__ENTRA__CLIENT_SECRET.
    let cfg = auth_config(EntraCredentialKind::ClientSecret, |e| {
        base(e);
        e.client_secret = Some(Secret::new(emu_cfg.client_secret.clone()));
    });
    let mut r = start(&cfg, EntraEnv::default());
    let s = r.generation(1, secs(10)).await;
    assert_published(&s, &emu, 1);
    let req = &emu.requests()[0];
    assert!(req.tls);
    assert_eq!(req.form["client_secret"], emu_cfg.client_secret);
    assert_eq!(req.form["client_id"], emu_cfg.client_id);
    assert!(!req.form.contains_key("client_assertion"));
    drop(r);

    // A wrong secret in a file: 401, a loud configuration error retried slowly
    // (max_backoff), never a hot loop; fixing the file recovers without a restart.
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("client-secret");
    std::fs::write(&secret_file, "wrong-secret").unwrap();
    let cfg = auth_config(EntraCredentialKind::ClientSecret, |e| {
        base(e);
        e.client_secret_file = Some(secret_file.clone());
        e.max_backoff = secs(1);
    });
    let before = emu.request_count();
    let t0 = Instant::now();
    let mut r = start(&cfg, EntraEnv::default());
    let s = r
        .until(secs(10), "an error", |s| s.last_error.is_some())
        .await;
    let e = s.last_error.unwrap();
    assert!(e.contains("401") && e.contains("AADSTS7000215"), "{e}");
    assert!(!e.contains("wrong-secret"), "{e}");
    tokio::time::sleep(secs(3) + Duration::from_millis(500)).await;
    let attempts = emu.request_count() - before;
    let elapsed = t0.elapsed().as_secs_f64();
    assert!(
        (3..=5).contains(&attempts),
        "{attempts} attempts in {elapsed:.1}s: expected about one per second"
    );
    assert!(r.rx.borrow().current.is_none());
    std::fs::write(&secret_file, format!("{}\n", emu_cfg.client_secret)).unwrap();
    let s = r.generation(1, secs(5)).await;
    assert!(s.last_error.is_none());
    assert!(r.metric("failed", "config") >= 3);
    assert_eq!(r.metric("ok", "ok"), 1);
}

fn fake_az(dir: &std::path::Path, stdout: &str, stderr: &str, exit: i32) {
    common::token_emulator::fake_cli(dir, "az", stdout, stderr, exit);
}

fn jwt_with(payload: &str) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    format!(
        "{}.{}.c2lnbmF0dXJl",
        URL_SAFE_NO_PAD.encode(r#"{"typ":"JWT","alg":"RS256"}"#),
        URL_SAFE_NO_PAD.encode(payload)
    )
}

#[tokio::test]
async fn azure_cli_through_a_fake_az_on_the_injected_path() {
    let dir = tempfile::tempdir().unwrap();
    let exp = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let token = jwt_with(&format!(r#"{{"oid":"dev-laptop-oid","exp":{exp}}}"#));
    let out = common::token_emulator::az_output(&token, exp);
    fake_az(dir.path(), &out, "", 0);
    let path = format!("/nonexistent-bin:{}:/usr/bin:/bin", dir.path().display());
    let cfg = auth_config(EntraCredentialKind::AzureCli, |_| {});
    let mut r = start(&cfg, env(&[("PATH", &path), ("HOME", "/home/dev")]));
    let s = r.generation(1, secs(10)).await;
    let cred = s.current.unwrap();
    assert_eq!(cred.username, "dev-laptop-oid");
    assert_eq!(cred.password.expose(), token);
    assert_eq!(
        cred.expires_at,
        Some(SystemTime::UNIX_EPOCH + Duration::from_secs(exp)),
        "expires_on wins over the zone-less expiresOn"
    );
    let log = std::fs::read_to_string(dir.path().join("az-args.log")).unwrap();
    assert!(
        log.contains("account get-access-token -o json --scope https://redis.azure.com/.default"),
        "{log}"
    );
    assert!(
        log.contains("HOME=/home/dev"),
        "the injected environment is az's: {log}"
    );
    drop(r);

    // Not logged in: a configuration error quoting az.
    let dir = tempfile::tempdir().unwrap();
    fake_az(
        dir.path(),
        "",
        "ERROR: Please run 'az login' to setup account.",
        1,
    );
    let path = format!("{}:/usr/bin:/bin", dir.path().display());
    let mut r = start(&cfg, env(&[("PATH", &path)]));
    let s = r
        .until(secs(10), "an error", |s| s.last_error.is_some())
        .await;
    let e = s.last_error.unwrap();
    assert!(e.contains("az login"), "{e}");
    assert_eq!(r.metric("failed", "config"), 1);
}

#[tokio::test]
async fn rotates_before_expiry_with_short_lived_tokens() {
    let emu = TokenEmulator::start(EmulatorConfig {
        lifetime: secs(6),
        ..Default::default()
    })
    .await;
    let cfg = auth_config(EntraCredentialKind::ManagedIdentity, |e| {
        e.imds_endpoint = Some(emu.imds_endpoint());
    });
    let mut r = start(&cfg, EntraEnv::default());
    let mut prev: Option<TokenState> = None;
    for generation in 1..=4 {
        let s = r.generation(generation, secs(8)).await;
        assert_eq!(s.generation, generation);
        assert_published(&s, &emu, generation);
        if let Some(p) = prev {
            let old = p.current.unwrap();
            let left = old
                .expires_at
                .unwrap()
                .duration_since(SystemTime::now())
                .expect("the new token arrived after the old one expired");
            // 6 s tokens (5-6 s left on arrival) refresh after 3.25-3.75 s: over a second to spare.
            assert!(left >= Duration::from_millis(500), "only {left:?} left");
            assert_ne!(old.username, s.current.as_ref().unwrap().username);
        }
        prev = Some(s);
    }
    assert_eq!(r.metric("ok", "ok"), 4);
    assert_eq!(emu.issued().len(), 4, "one request per refresh, no extras");
    assert_eq!(emu.request_count(), 4);
}

#[tokio::test]
async fn survives_throttling_server_errors_and_slow_answers() {
    let emu = TokenEmulator::start(EmulatorConfig {
        lifetime: secs(12),
        ..Default::default()
    })
    .await;
    let cfg = auth_config(EntraCredentialKind::ManagedIdentity, |e| {
        e.imds_endpoint = Some(emu.imds_endpoint());
        e.attempt_timeout = secs(1);
        e.max_backoff = secs(2);
    });
    let mut r = start(&cfg, EntraEnv::default());
    let first = r.generation(1, secs(10)).await;
    let gen1 = first.current.clone().unwrap();
    emu.push_faults([
        Fault::throttled(2),
        Fault::server_error(),
        Fault::server_error(),
        Fault::server_error(),
        Fault::Slow(secs(3)),
    ]);
    let s = r
        .until(secs(15), "the 429", |s| {
            s.last_error.as_deref().is_some_and(|e| e.contains("429"))
        })
        .await;
    assert!(s.last_error.as_deref().unwrap().contains("retry after 2s"));
    // Failing, but the last good token is still published.
    assert_eq!(s.generation, 1);
    assert_eq!(s.current.as_ref().unwrap().username, gen1.username);
    let throttled_at = Instant::now();
    let s = r
        .until(secs(10), "a 500", |s| {
            s.last_error
                .as_deref()
                .is_some_and(|e| e.contains("HTTP 500"))
        })
        .await;
    assert!(
        throttled_at.elapsed() >= Duration::from_millis(1800),
        "Retry-After: 2 not honoured ({:?})",
        throttled_at.elapsed()
    );
    assert_eq!(s.current.as_ref().unwrap().username, gen1.username);
    let s = r
        .until(secs(15), "the timeout", |s| {
            s.last_error
                .as_deref()
                .is_some_and(|e| e.contains("attempt_timeout"))
        })
        .await;
    assert_eq!(s.current.as_ref().unwrap().username, gen1.username);
    let s = r.generation(2, secs(10)).await;
    assert_published(&s, &emu, 2);
    assert!(s.last_error.is_none());
    assert_eq!(emu.pending_faults(), 0);
    assert_eq!(r.metric("failed", "throttled"), 1);
    assert_eq!(r.metric("failed", "server_error"), 3);
    assert_eq!(r.metric("failed", "timeout"), 1);
    // The slow answer was abandoned by the client: nothing was issued for it.
    assert_eq!(emu.issued().len(), 2);
    assert_eq!(emu.request_count(), 7);
    for e in [&gen1.password, &s.current.unwrap().password] {
        assert!(!r.metrics.render().contains(e.expose()));
    }
}

#[tokio::test]
async fn imds_gone_dropped_malformed_and_oidless_answers_are_retried() {
    let emu = TokenEmulator::start(EmulatorConfig::default()).await;
    emu.push_faults([
        Fault::gone(),
        Fault::DropConnection,
        Fault::MalformedJson,
        Fault::NoOid,
    ]);
    let cfg = auth_config(EntraCredentialKind::ManagedIdentity, |e| {
        e.imds_endpoint = Some(emu.imds_endpoint());
    });
    let mut r = start(&cfg, EntraEnv::default());
    let mut errors = Vec::new();
    // Collect every distinct last_error until the first token (bounded).
    let deadline = Instant::now() + secs(20);
    loop {
        let s = r.rx.borrow_and_update().clone();
        if s.generation >= 1 {
            break;
        }
        if let Some(e) = s.last_error {
            if errors.last() != Some(&e) {
                errors.push(e);
            }
        }
        assert!(Instant::now() < deadline, "no token; errors: {errors:?}");
        let _ = tokio::time::timeout(secs(1), r.rx.changed()).await;
    }
    let all = errors.join("\n");
    assert!(all.contains("HTTP 410"), "{all}");
    assert!(all.contains("not JSON"), "{all}");
    assert!(all.contains("oid"), "{all}");
    assert!(
        !all.contains("trunc"),
        "a success body is never quoted: {all}"
    );
    let s = r.rx.borrow().clone();
    // Generation 2 of the emulator (generation 1 had no oid and was refused).
    assert_published(&s, &emu, 2);
    assert_eq!(s.current.unwrap().username, "emu-oid-2");
    assert_eq!(r.metric("failed", "server_error"), 1);
    assert_eq!(r.metric("failed", "network"), 1);
    assert_eq!(r.metric("failed", "malformed"), 1);
    assert_eq!(r.metric("failed", "no_oid"), 1);
    let oidless = &emu.issued()[0];
    assert!(oidless.oid.is_empty());
    assert!(!all.contains(&oidless.token));
}

#[tokio::test]
async fn shutdown_stops_the_rotator() {
    let emu = TokenEmulator::start(EmulatorConfig {
        lifetime: secs(3),
        ..Default::default()
    })
    .await;
    let cfg = auth_config(EntraCredentialKind::ManagedIdentity, |e| {
        e.imds_endpoint = Some(emu.imds_endpoint());
    });
    let mut r = start(&cfg, EntraEnv::default());
    r.generation(2, secs(10)).await;
    r.shutdown.cancel();
    let count = emu.request_count();
    tokio::time::sleep(secs(3)).await;
    assert_eq!(emu.request_count(), count, "no requests after shutdown");
    // Receivers keep the last credential after the rotator stops.
    assert_eq!(r.rx.borrow().generation, 2);
}

#[tokio::test]
async fn imds_over_https_with_the_ca_file() {
    let emu = TokenEmulator::start(EmulatorConfig::default()).await;
    let cfg = auth_config(EntraCredentialKind::ManagedIdentity, |e| {
        e.imds_endpoint = Some(emu.imds_endpoint_https());
        e.ca_file = Some(emu.ca_file().to_path_buf());
    });
    let mut r = start(&cfg, EntraEnv::default());
    let s = r.generation(1, secs(10)).await;
    assert_published(&s, &emu, 1);
    assert!(emu.requests()[0].tls);
}
