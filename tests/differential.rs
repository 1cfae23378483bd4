//! The differential test: seeded random command sequences (data types,
//! transactions with errors, scripts, blocking with short timeouts,
//! pub/sub, HELLO / CLIENT REPLY / SELECT / RESET, pipelines, split writes,
//! malformed input; one client and several at once) through the proxy and
//! straight to a plain redis-server with the same configuration, compared
//! reply by reply (tests/common/differential.rs). A short run here; a
//! longer one in scripts/differential.sh (DIFF_SEEDS, DIFF_STEPS,
//! DIFF_CLIENTS).

mod common;

use common::differential::{flush, relay, run_seed, Mix};
use common::proxy::{static_env, Proxy};
use common::redis::{PlainRedis, RedisServer};

const USER: &str = "proxyuser";
const TOKEN: &str = "differential-token";

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Seeds `first..first + seeds`, each with 1 client and then `clients`.
/// Returns the differences not documented, the number documented, and the
/// number of commands sent.
fn campaign(
    want: u16,
    got: u16,
    seeds: usize,
    steps: usize,
    clients: usize,
) -> (Vec<String>, usize, usize) {
    let first = env_or("DIFF_FIRST_SEED", 1) as u64;
    let mut diffs = Vec::new();
    let mut documented = 0;
    let mut commands = 0;
    for seed in first..first + seeds as u64 {
        for n in [1, clients] {
            flush(want);
            flush(got);
            let (d, k, c) = run_seed(seed, n, steps, Mix::all(), want, got);
            diffs.extend(d);
            documented += k;
            commands += c;
        }
    }
    (diffs, documented, commands)
}

#[test]
fn the_proxy_answers_as_redis_does() {
    let redis = RedisServer::start(USER, TOKEN);
    let proxy = Proxy::start(&static_env(&redis, USER, TOKEN));
    let direct = PlainRedis::start();
    let seeds = env_or("DIFF_SEEDS", 6);
    let steps = env_or("DIFF_STEPS", 120);
    let clients = env_or("DIFF_CLIENTS", 4);
    let (diffs, documented, commands) = campaign(direct.port, proxy.port, seeds, steps, clients);
    eprintln!(
        "differential: {seeds} seeds x (1 and {clients} clients), {commands} commands, {} sequences differ ({documented} more where the README says why)",
        diffs.len()
    );
    assert!(diffs.is_empty(), "{}", diffs.join("\n\n"));
}

/// The comparison itself: a byte relay in front of a second redis-server
/// shows no difference, and a relay that swaps two replies is caught.
#[test]
fn the_comparison_sees_a_swapped_reply_and_nothing_else() {
    let a = PlainRedis::start();
    let b = PlainRedis::start();
    let plain = relay(b.port, None);
    let (diffs, documented, commands) = campaign(a.port, plain, 2, 30, 3);
    assert!(commands > 0);
    assert_eq!(documented, 0);
    assert!(diffs.is_empty(), "{}", diffs.join("\n\n"));
    let swapping = relay(b.port, Some(3));
    let (diffs, _, _) = campaign(a.port, swapping, 2, 30, 3);
    assert!(!diffs.is_empty(), "a swapped reply went unnoticed");
}
