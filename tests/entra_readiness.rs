//! Readiness under `admin.readiness = credential` needs more than a token in hand:
//! the cache must have accepted it. A wrong identity or a missing access policy
//! (WRONGPASS on the proxy's own AUTH) used to leave `/startup` and `/readyz` at
//! 200 while every command failed, so a broken rollout passed readiness on every pod.

mod common;

use common::proxy::{acl_user_per_token, enable_admin, entra_imds_env, http, metric_sum, Proxy};
use common::redis::RedisServer;
use common::token_emulator::{EmulatorConfig, TokenEmulator};
use std::time::{Duration, Instant};

/// Poll `/readyz` until `want` or a generous hang guard.
fn readyz_until(admin: u16, want: u16) -> (u16, String) {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let (status, body) = http(admin, "GET", "/readyz");
        if status == want || Instant::now() > deadline {
            return (status, body);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_waits_until_the_cache_accepts_the_token() {
    // The identity has no access policy: no ACL user for its oid.
    let redis = RedisServer::start("someone-else", "unused-password");
    let emu = TokenEmulator::start(EmulatorConfig {
        oid_prefix: "no-policy-".into(),
        ..Default::default()
    })
    .await;
    let mut env = entra_imds_env(&redis, &emu);
    let admin = enable_admin(&mut env);
    let proxy = Proxy::start(&env);

    // The token is in hand and the server refuses it.
    let deadline = Instant::now() + Duration::from_secs(40);
    let metrics = loop {
        let (_, m) = http(admin, "GET", "/metrics");
        if metric_sum(
            &m,
            "redis_entra_proxy_upstream_auth_refused_total{reason=\"wrongpass\"}",
        ) > 0.0
            || Instant::now() > deadline
        {
            break m;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        metric_sum(
            &metrics,
            "redis_entra_proxy_upstream_auth_refused_total{reason=\"wrongpass\"}"
        ) > 0.0,
        "{metrics}"
    );
    let (status, body) = http(admin, "GET", "/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("WRONGPASS") && body.contains("no-policy-1"),
        "{body}"
    );
    assert!(body.contains("access policy"), "{body}");
    // One line a minute, not one per attempt.
    let log = proxy.log_text();
    let lines = log
        .lines()
        .filter(|l| l.contains("the cache refused the proxy's credential"))
        .count();
    assert_eq!(lines, 1, "{log}");

    // The access policy is assigned: the next attempt is accepted, ready again.
    let token = emu.issued().last().unwrap().token.clone();
    let pass = format!(">{token}");
    redis.cli(&[
        "ACL",
        "SETUSER",
        "no-policy-1",
        "on",
        &pass,
        "~*",
        "&*",
        "+@all",
    ]);
    let (status, body) = readyz_until(admin, 200);
    assert_eq!(status, 200, "{body}");
    let (_, m) = http(admin, "GET", "/metrics");
    assert_eq!(
        metric_sum(&m, "redis_entra_proxy_upstream_auth_accepted "),
        1.0,
        "{m}"
    );

    // Once accepted, a cache outage does not take readiness away (every pod would
    // leave its Service at once).
    let mut redis = redis;
    redis.kill();
    std::thread::sleep(Duration::from_millis(500));
    let (status, body) = http(admin, "GET", "/readyz");
    assert_eq!(status, 200, "{body}");
}

/// A sidecar starts with its app: the app's first commands can arrive before
/// the first token does. They wait for it (bounded by the connect timeout)
/// instead of failing with "no credential yet" (seen failing before: the
/// first SET answered `-ERR upstream localhost:P: no credential yet: waiting
/// for the first Entra token from the token endpoint`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_sent_before_the_first_token_wait_for_it() {
    let redis = RedisServer::start("someone-else", "unused-password");
    let emu = TokenEmulator::start(EmulatorConfig {
        oid_prefix: "slow-first-".into(),
        ..Default::default()
    })
    .await;
    // A token endpoint that takes its time (IMDS can).
    acl_user_per_token(&redis, &emu, Duration::from_millis(1500));
    let mut env = entra_imds_env(&redis, &emu);
    env.push((
        "REDIS_ENTRA_PROXY_UPSTREAM__CONNECT_TIMEOUT".into(),
        "10s".into(),
    ));
    let proxy = Proxy::start(&env);
    let port = proxy.port;
    let replies = tokio::task::spawn_blocking(move || {
        let mut c = common::proxy::Raw::connect(port);
        let set = c.call(&["SET", "early", "1"]);
        let get = c.call(&["GET", "early"]);
        (set, get)
    })
    .await
    .unwrap();
    assert_eq!(replies.0, "+OK\r\n", "{}", proxy.log_text());
    assert_eq!(replies.1, "$1\r\n1\r\n");
    assert_eq!(emu.issued().len(), 1);
}
