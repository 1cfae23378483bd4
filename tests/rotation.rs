//! The reason the product exists: Entra tokens rotated into every live upstream
//! connection under load, with Azure's "an expired token closes the connection"
//! emulated on a real Redis: each token generation is its own ACL user (its
//! `oid`), and when a generation's token expires its user is deleted, which
//! makes Redis kill every connection that did not re-AUTH in time.

mod common;

use common::proxy::{http, metric_sum, Proxy, Raw};
use common::redis::{free_port, RedisServer};
use common::token_emulator::{EmulatorConfig, Fault, Issued, TokenEmulator};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

const LIFETIME: Duration = Duration::from_secs(10);
const ROTATIONS: u64 = 5;

fn cli(port: u16, ca: &std::path::Path, args: &[&str]) -> String {
    let out = common::redis::admin_cli(port, ca)
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn proxy_conn_ids(redis: &RedisServer) -> HashSet<String> {
    redis
        .cli(&["CLIENT", "LIST"])
        .lines()
        .filter(|l| l.contains(" user=gen-"))
        .filter_map(|l| l.split(' ').next().map(str::to_string))
        .collect()
}

fn auth_calls(redis: &RedisServer) -> u64 {
    redis
        .cli(&["INFO", "commandstats"])
        .lines()
        .find(|l| l.starts_with("cmdstat_auth:"))
        .and_then(|l| l.split("calls=").nth(1))
        .and_then(|v| v.split(',').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Proxy environment: Entra managed identity against the emulator's IMDS.
fn entra_env(redis: &RedisServer, emu: &TokenEmulator, admin: u16) -> Vec<(String, String)> {
    [
        ("REDIS_ENTRA_PROXY_UPSTREAM__HOST", "localhost".to_string()),
        ("REDIS_ENTRA_PROXY_UPSTREAM__PORT", redis.port.to_string()),
        (
            "REDIS_ENTRA_PROXY_UPSTREAM__CA_FILE",
            redis.pki.ca_pem.display().to_string(),
        ),
        ("REDIS_ENTRA_PROXY_AUTH__SOURCE", "entra".to_string()),
        (
            "REDIS_ENTRA_PROXY_AUTH__ENTRA__CREDENTIAL",
            "managed-identity".to_string(),
        ),
        (
            "REDIS_ENTRA_PROXY_AUTH__ENTRA__IMDS_ENDPOINT",
            emu.imds_endpoint(),
        ),
        (
            "REDIS_ENTRA_PROXY_AUTH__ENTRA__ATTEMPT_TIMEOUT",
            "2s".to_string(),
        ),
        (
            "REDIS_ENTRA_PROXY_AUTH__ENTRA__MAX_BACKOFF",
            "1s".to_string(),
        ),
        ("REDIS_ENTRA_PROXY_ADMIN__ENABLED", "true".to_string()),
        (
            "REDIS_ENTRA_PROXY_ADMIN__ADDRESS",
            format!("127.0.0.1:{admin}"),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// A Redis and a token emulator whose every generation gets its own ACL user.
async fn redis_and_emulator(prefix: &str, lifetime: Duration) -> (RedisServer, TokenEmulator) {
    let (redis, emu) = redis_and_bare_emulator(prefix, lifetime).await;
    acl_user_per_generation(&redis, &emu);
    (redis, emu)
}

/// A Redis and a token emulator with no ACL hook yet.
async fn redis_and_bare_emulator(prefix: &str, lifetime: Duration) -> (RedisServer, TokenEmulator) {
    let redis = RedisServer::start("bootstrap", "bootstrap-unused");
    let emu = TokenEmulator::start(EmulatorConfig {
        lifetime,
        oid_prefix: prefix.into(),
        ..Default::default()
    })
    .await;
    (redis, emu)
}

/// Create each generation's ACL user before its token is handed out.
fn acl_user_per_generation(redis: &RedisServer, emu: &TokenEmulator) {
    let (port, ca) = (redis.port, redis.pki.ca_pem.clone());
    emu.on_issue(move |t: Issued| {
        let ca = ca.clone();
        async move {
            let pass = format!(">{}", t.token);
            cli(
                port,
                &ca,
                &["ACL", "SETUSER", &t.oid, "on", &pass, "~*", "&*", "+@all"],
            );
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_get_a_fast_clear_error_until_the_first_token_then_service() {
    let (redis, emu) = redis_and_emulator("first-", Duration::from_secs(60)).await;
    // The identity is not allowed yet: a configuration error at the endpoint.
    emu.push_faults([
        Fault::unauthorized(),
        Fault::unauthorized(),
        Fault::unauthorized(),
    ]);
    let admin = free_port();
    let proxy = Proxy::start(&entra_env(&redis, &emu, admin));
    let pport = proxy.port;
    let reply = tokio::task::spawn_blocking(move || {
        let mut c = Raw::connect(pport);
        let t = Instant::now();
        let r = c.call(&["GET", "k"]);
        (r, t.elapsed())
    })
    .await
    .unwrap();
    assert!(
        reply.0.starts_with("-ERR upstream localhost:"),
        "{}",
        reply.0
    );
    assert!(
        reply.0.contains("no credential yet") && reply.0.contains("401"),
        "{}",
        reply.0
    );
    assert!(reply.1 < Duration::from_secs(2), "not fast: {:?}", reply.1);
    assert_eq!(http(admin, "GET", "/startup").0, 503);
    // The endpoint recovers: the proxy serves without a restart.
    emu.wait_issued(1, Duration::from_secs(20)).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = tokio::task::spawn_blocking(move || Raw::connect(pport).call(&["SET", "k", "v"]))
            .await
            .unwrap();
        if r == "+OK\r\n" {
            break;
        }
        assert!(Instant::now() < deadline, "never recovered: {r}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(http(admin, "GET", "/startup").0, 200);
    // Waiting for the first token was neither a failed connect nor a
    // reconnect; the clients that asked meanwhile were counted as such.
    let metrics = http(admin, "GET", "/metrics").1;
    assert!(
        metrics.contains("redis_entra_proxy_upstream_reconnects_total 0"),
        "{metrics}"
    );
    assert!(
        !metrics.contains(r#"errors_total{kind="upstream_connect"}"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"errors_total{kind="no_credential"}"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_turns_false_before_expiry_during_an_outage_and_back() {
    let (redis, emu) = redis_and_emulator("ready-", Duration::from_secs(8)).await;
    let admin = free_port();
    let _proxy = Proxy::start(&entra_env(&redis, &emu, admin));
    let first = emu.wait_issued(1, Duration::from_secs(10)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while http(admin, "GET", "/readyz").0 != 200 {
        assert!(
            Instant::now() < deadline,
            "{:?}",
            http(admin, "GET", "/readyz")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // An outage long enough to run the token close to its expiry.
    emu.push_faults((0..12).map(|_| Fault::server_error()));
    let mut saw_unready = None;
    let deadline = Instant::now() + Duration::from_secs(40);
    while Instant::now() < deadline {
        let (code, body) = http(admin, "GET", "/readyz");
        if code == 503 && saw_unready.is_none() {
            saw_unready = Some((SystemTime::now(), body));
        }
        if code == 200 && saw_unready.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (when, body) = saw_unready.expect("readiness never turned false during the outage");
    assert!(when < first.expires_at, "unready only after expiry: {body}");
    assert_eq!(
        http(admin, "GET", "/readyz").0,
        200,
        "readiness did not come back"
    );
    assert_eq!(emu.pending_faults(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_rotate_into_every_live_connection_under_load() {
    let (redis, emu) = redis_and_bare_emulator("gen-", LIFETIME).await;
    // Each generation: create its ACL user before the token is handed out, and
    // delete it when the token expires (Azure closes such connections).
    let deleted = acl_users_deleted_at_expiry(&redis, &emu);
    let admin = free_port();
    let env = entra_env(&redis, &emu, admin);
    let proxy = Proxy::start(&env);
    let first = emu.wait_issued(1, Duration::from_secs(10)).await;
    assert_eq!(first.oid, "gen-1");
    // Let the shared connections and warm set come up.
    let pport = proxy.port;
    let deadline = Instant::now() + Duration::from_secs(10);
    while http(admin, "GET", "/readyz").0 != 200 {
        assert!(
            Instant::now() < deadline,
            "{:?}",
            http(admin, "GET", "/readyz")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ids_before = proxy_conn_ids(&redis);
    let auth_before = auth_calls(&redis);

    // Load: 16 clients, half pipelining, bounded by a stop flag and a count.
    let stop = Arc::new(AtomicBool::new(false));
    let commands = Arc::new(AtomicU64::new(0));
    let mut load = Vec::new();
    for i in 0..16u64 {
        let (stop, commands) = (stop.clone(), commands.clone());
        load.push(tokio::task::spawn_blocking(move || {
            let mut c = Raw::connect(pport);
            let key = format!("load:{i}");
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) && n < 2_000_000 {
                if i % 2 == 0 {
                    for _ in 0..8 {
                        c.send(&["INCR", &key]);
                    }
                    for _ in 0..8 {
                        n += 1;
                        assert_eq!(c.read(), format!(":{n}\r\n").into_bytes(), "client {i}");
                    }
                } else {
                    n += 1;
                    assert_eq!(c.call(&["INCR", &key]), format!(":{n}\r\n"), "client {i}");
                }
                commands.fetch_add(if i % 2 == 0 { 8 } else { 1 }, Ordering::Relaxed);
            }
            n
        }));
    }
    // A BLPOP that waits across several rotations, then gets its element.
    let blpop = tokio::task::spawn_blocking(move || {
        let mut c = Raw::connect(pport);
        c.s.set_read_timeout(Some(LIFETIME * 12)).unwrap();
        c.call(&["BLPOP", "rotation:queue", "0"])
    });

    // A transaction that straddles a rotation: MULTI shortly before a refresh,
    // EXEC after the new token is out but before the old one expires.
    let g2 = emu.wait_issued(2, LIFETIME * 2).await;
    let straddle_start = g2.issued_at + LIFETIME * 45 / 100;
    tokio::time::sleep(
        straddle_start
            .duration_since(SystemTime::now())
            .unwrap_or_default(),
    )
    .await;
    let tx = tokio::task::spawn_blocking(move || {
        let mut c = Raw::connect(pport);
        assert_eq!(c.call(&["MULTI"]), "+OK\r\n");
        assert_eq!(c.call(&["SET", "tx:key", "straddled"]), "+QUEUED\r\n");
        std::thread::sleep(LIFETIME * 35 / 100);
        c.call(&["EXEC"])
    });
    let g3 = emu.wait_issued(3, LIFETIME * 2).await;
    assert_eq!(tx.await.unwrap(), "*1\r\n+OK\r\n");
    assert!(
        g3.issued_at > straddle_start,
        "the transaction did not straddle a rotation"
    );

    // The token endpoint fails for a while, then recovers.
    emu.push_faults([Fault::server_error(), Fault::server_error()]);
    let last = emu
        .wait_issued(ROTATIONS + 1, LIFETIME * (ROTATIONS as u32 + 2))
        .await;
    assert_eq!(emu.pending_faults(), 0, "the faults were never served");
    // Let the last old generation expire (and its user be deleted) under load.
    tokio::time::sleep(
        last.expires_at
            .duration_since(SystemTime::now())
            .unwrap_or_default()
            / 3,
    )
    .await;
    let mut pusher = Raw::connect(pport);
    assert_eq!(
        pusher.call(&["RPUSH", "rotation:queue", "finally"]),
        ":1\r\n"
    );
    let popped = tokio::time::timeout(Duration::from_secs(10), blpop)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(popped, "*2\r\n$14\r\nrotation:queue\r\n$7\r\nfinally\r\n");
    stop.store(true, Ordering::Relaxed);
    let mut total_client_commands = 0;
    for l in load {
        total_client_commands += l
            .await
            .expect("a load client saw an error or a wrong reply");
    }

    let ids_after = proxy_conn_ids(&redis);
    let survived = ids_before.intersection(&ids_after).count();
    let auth_after = auth_calls(&redis);
    let metrics = http(admin, "GET", "/metrics").1;
    let metric = |name: &str| metric_sum(&metrics, name);
    let reauth_ok = metric("redis_entra_proxy_reauths_total{outcome=\"ok\"}");
    let reauth_failed = metric("redis_entra_proxy_reauths_total{outcome=\"failed\"}");
    let lost = metric("redis_entra_proxy_errors_total{kind=\"upstream_lost\"}");
    let refresh_failed = metric("redis_entra_proxy_token_refreshes_total{outcome=\"failed\"");
    eprintln!(
        "rotation figures: generations={} users_deleted={} client_commands={} commands_counted={} \
         upstream_conns_before={} survived={} auth_calls={} reauth_ok={reauth_ok} reauth_failed={reauth_failed} \
         upstream_lost={lost} token_refresh_failures={refresh_failed}",
        last.generation,
        deleted.load(Ordering::SeqCst),
        total_client_commands,
        commands.load(Ordering::Relaxed),
        ids_before.len(),
        survived,
        auth_after - auth_before,
    );
    assert!(last.generation > ROTATIONS);
    assert!(
        deleted.load(Ordering::SeqCst) >= ROTATIONS - 1,
        "expired generations were deleted"
    );
    assert_eq!(reauth_failed, 0.0, "{metrics}");
    assert_eq!(
        lost,
        0.0,
        "an upstream connection was killed: {}",
        proxy.log_text()
    );
    assert!(
        refresh_failed >= 2.0,
        "the injected endpoint failures were seen"
    );
    // The shared connections opened before the first rotation are still there.
    assert!(survived >= 2, "before {ids_before:?} after {ids_after:?}");
    assert!(reauth_ok >= (2 * ROTATIONS) as f64, "{metrics}");
    assert!(auth_after - auth_before >= 2 * ROTATIONS);
}

/// Each generation's ACL user is made before its token is handed out and
/// deleted when the token expires; returns how many were deleted so far.
fn acl_users_deleted_at_expiry(redis: &RedisServer, emu: &TokenEmulator) -> Arc<AtomicU64> {
    let (port, ca) = (redis.port, redis.pki.ca_pem.clone());
    let deleted = Arc::new(AtomicU64::new(0));
    let deleted_hook = deleted.clone();
    emu.on_issue(move |t: Issued| {
        let ca = ca.clone();
        let deleted = deleted_hook.clone();
        async move {
            let pass = format!(">{}", t.token);
            let out = cli(
                port,
                &ca,
                &["ACL", "SETUSER", &t.oid, "on", &pass, "~*", "&*", "+@all"],
            );
            assert_eq!(out.trim(), "OK", "ACL SETUSER {}", t.oid);
            tokio::spawn(async move {
                let wait = t
                    .expires_at
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                tokio::time::sleep(wait).await;
                cli(port, &ca, &["ACL", "DELUSER", &t.oid]);
                deleted.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    deleted
}

/// The proxy's upstream connections in pub/sub mode: (id, user).
fn pubsub_conns(redis: &RedisServer) -> Vec<(String, String)> {
    redis
        .cli(&["CLIENT", "LIST"])
        .lines()
        .filter(|l| {
            l.split(' ')
                .find_map(|f| f.strip_prefix("flags="))
                .is_some_and(|f| f.contains('P'))
        })
        .map(|l| {
            let get = |name: &str| {
                l.split(' ')
                    .find_map(|f| f.strip_prefix(name))
                    .unwrap_or("")
                    .to_string()
            };
            (get("id="), get("user="))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_get_every_message_across_rotations_on_one_re_authenticated_connection() {
    let (redis, emu) = redis_and_bare_emulator("psgen-", LIFETIME).await;
    let deleted = acl_users_deleted_at_expiry(&redis, &emu);
    let admin = free_port();
    let proxy = Proxy::start(&entra_env(&redis, &emu, admin));
    emu.wait_issued(1, Duration::from_secs(10)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while http(admin, "GET", "/readyz").0 != 200 {
        assert!(
            Instant::now() < deadline,
            "{:?}",
            http(admin, "GET", "/readyz")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pport = proxy.port;
    let (r2, r3) = tokio::task::spawn_blocking(move || {
        let mut r2 = Raw::connect(pport);
        assert!(r2.call(&["SUBSCRIBE", "rot"]).ends_with(":1\r\n"));
        assert!(r2.call(&["PSUBSCRIBE", "ro*"]).ends_with(":2\r\n"));
        let mut r3 = Raw::connect(pport);
        assert!(r3.call(&["HELLO", "3"]).starts_with("%7\r\n"));
        assert!(r3.call(&["SUBSCRIBE", "rot"]).ends_with(":1\r\n"));
        (r2, r3)
    })
    .await
    .unwrap();
    let hub_before = pubsub_conns(&redis);
    assert_eq!(hub_before.len(), 1, "{hub_before:?}");
    assert_eq!(hub_before[0].1, "psgen-1");

    // Publish every 200 ms until three generations have expired and their
    // users are gone (a connection that did not re-AUTH is killed by then).
    let stop = Arc::new(AtomicBool::new(false));
    let stop_pub = stop.clone();
    let publisher = tokio::task::spawn_blocking(move || {
        let mut p = Raw::connect(pport);
        let mut n = 0usize;
        while !stop_pub.load(Ordering::Relaxed) && n < 1000 {
            // Three receivers as one Redis counts them (two clients by
            // channel, one by pattern), which the proxy counts only while the
            // hub's subscriptions are in place: at every moment.
            assert_eq!(
                p.call(&["PUBLISH", "rot", &format!("m{n}")]),
                ":3\r\n",
                "publish {n}: the hub was not subscribed"
            );
            n += 1;
            std::thread::sleep(Duration::from_millis(200));
        }
        n
    });
    let deadline = Instant::now() + LIFETIME * 6;
    while deleted.load(Ordering::SeqCst) < 3 {
        assert!(Instant::now() < deadline, "three generations never expired");
        assert!(!publisher.is_finished(), "the publisher stopped early");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A little more after the last deletion.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let n = publisher.await.expect("every publish reached the hub");
    // Enough to span three rotations; how many fit depends on the machine's
    // load (each publish waits for its reply), so the bound is loose.
    assert!(n >= 30, "only {n} messages");
    let got = tokio::task::spawn_blocking(move || {
        let (mut r2, mut r3) = (r2, r3);
        for i in 0..n {
            let p = format!("m{i}");
            assert_eq!(
                String::from_utf8_lossy(&r2.read()),
                format!(
                    "*3\r\n$7\r\nmessage\r\n$3\r\nrot\r\n${}\r\n{p}\r\n",
                    p.len()
                ),
                "RESP2 message {i}"
            );
            assert_eq!(
                String::from_utf8_lossy(&r2.read()),
                format!(
                    "*4\r\n$8\r\npmessage\r\n$3\r\nro*\r\n$3\r\nrot\r\n${}\r\n{p}\r\n",
                    p.len()
                ),
                "RESP2 pmessage {i}"
            );
            assert_eq!(
                String::from_utf8_lossy(&r3.read()),
                format!(
                    ">3\r\n$7\r\nmessage\r\n$3\r\nrot\r\n${}\r\n{p}\r\n",
                    p.len()
                ),
                "RESP3 message {i}"
            );
        }
        // Still subscribed, still answering.
        assert_eq!(r2.call(&["PING"]), "*2\r\n$4\r\npong\r\n$0\r\n\r\n");
        assert_eq!(r3.call(&["PING"]), "+PONG\r\n");
        (n, r2, r3)
    })
    .await
    .expect("every subscriber got every message in order");
    let (got, _r2, _r3) = got;
    // The same upstream connection throughout, re-authenticated as a current
    // generation.
    let hub_after = pubsub_conns(&redis);
    assert_eq!(hub_after.len(), 1, "{hub_after:?}");
    assert_eq!(
        hub_after[0].0, hub_before[0].0,
        "the hub's connection was replaced"
    );
    let generation: u64 = hub_after[0]
        .1
        .strip_prefix("psgen-")
        .and_then(|g| g.parse().ok())
        .unwrap();
    assert!(generation >= 4, "{hub_after:?}");
    let metrics = http(admin, "GET", "/metrics").1;
    let metric = |name: &str| metric_sum(&metrics, name);
    assert_eq!(
        metric("redis_entra_proxy_errors_total{kind=\"upstream_lost\"}"),
        0.0,
        "{}",
        proxy.log_text()
    );
    assert_eq!(
        metric("redis_entra_proxy_reauths_total{outcome=\"failed\"}"),
        0.0
    );
    eprintln!(
        "pub/sub rotation figures: messages={got} hub_generation={generation} users_deleted={} reauth_ok={}",
        deleted.load(Ordering::SeqCst),
        metric("redis_entra_proxy_reauths_total{outcome=\"ok\"}")
    );
}
