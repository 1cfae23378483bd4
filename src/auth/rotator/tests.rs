//! Unit tests of [`super`].

use super::*;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use std::collections::VecDeque;
use std::sync::Mutex;
use tokio::time::Instant;

const MIN: u64 = 60;
const HOUR: u64 = 3600;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

#[test]
fn schedule_for_typical_lifetimes() {
    // (lifetime, refresh without jitter, refresh with the largest jitter)
    let cases = [
        (secs(10), 7.5, 6.5),
        (secs(5 * MIN), 225.0, 195.0),
        (secs(60 * MIN), 45.0 * 60.0, 40.0 * 60.0),
        (secs(90 * MIN), 67.5 * 60.0, 62.5 * 60.0),
        (secs(24 * HOUR), 12.0 * 3600.0, 12.0 * 3600.0 - 300.0),
    ];
    for (lifetime, latest, earliest) in cases {
        let at0 = refresh_in(lifetime, 0.0).as_secs_f64();
        let at1 = refresh_in(lifetime, 0.999_999).as_secs_f64();
        assert!(
            (at0 - latest).abs() < 1e-3,
            "{lifetime:?}: {at0} != {latest}"
        );
        assert!(
            (at1 - earliest).abs() < 1e-2,
            "{lifetime:?}: {at1} != {earliest}"
        );
        for i in 0..100 {
            let at = refresh_in(lifetime, i as f64 / 100.0);
            assert!(at.as_secs_f64() <= latest + 1e-3 && at.as_secs_f64() >= earliest - 1e-2);
            // Always comfortably before expiry: at least a quarter of the life left.
            assert!(at <= lifetime.mul_f64(0.75), "{lifetime:?}: {at:?}");
        }
    }
    // The 15-minute rule binds between 60 min and 2 h...
    assert_eq!(refresh_in(secs(80 * MIN), 0.0), secs(60 * MIN));
    // ...and the 50% rule from 2 h on.
    assert_eq!(refresh_in(secs(2 * HOUR), 0.0), secs(HOUR));
}

#[test]
fn schedule_never_loops_on_tiny_or_expired_lifetimes() {
    for l in [
        Duration::ZERO,
        Duration::from_millis(300),
        Duration::from_millis(600),
    ] {
        assert_eq!(refresh_in(l, 0.5), MIN_REFRESH, "{l:?}");
    }
    assert!(refresh_in(secs(4), 0.0) >= secs(2));
}

#[test]
fn backoff_grows_caps_and_jitters_fully() {
    let cap = secs(60);
    let mut b = Backoff::new(BASE_BACKOFF, cap);
    let ceilings: Vec<_> = (0..10)
        .map(|_| {
            let c = b.ceiling();
            // rand = 1.0 takes the ceiling itself.
            assert_eq!(b.next_delay(1.0), c);
            c
        })
        .collect();
    assert_eq!(
        ceilings[..8],
        [500, 1000, 2000, 4000, 8000, 16000, 32000, 60000].map(Duration::from_millis)
    );
    assert_eq!(ceilings[9], cap);
    // Full jitter: anywhere from (almost) zero to the ceiling.
    let mut b = Backoff::new(BASE_BACKOFF, cap);
    for _ in 0..6 {
        b.next_delay(0.0);
    }
    let ceiling = b.ceiling();
    assert_eq!(b.clone().next_delay(0.0), MIN_RETRY);
    assert_eq!(b.clone().next_delay(0.5), ceiling / 2);
    for _ in 0..1000 {
        let d = b.clone().next_delay(fastrand::f64());
        assert!(d >= MIN_RETRY && d <= ceiling, "{d:?}");
    }
    // Many failures never overflow.
    for _ in 0..100 {
        b.next_delay(1.0);
    }
    assert_eq!(b.ceiling(), cap);
    b.reset();
    assert_eq!(b.ceiling(), BASE_BACKOFF);
}

#[test]
fn retry_after_and_config_errors() {
    let max = secs(60);
    let mut b = Backoff::new(BASE_BACKOFF, max);
    let throttled = FetchError::Throttled {
        retry_after: Some(secs(7)),
        detail: String::new(),
    };
    assert_eq!(retry_delay(&throttled, &mut b, max, 0.0), secs(7));
    // A longer backoff wins over a short Retry-After.
    let mut b2 = Backoff::new(secs(20), max);
    let short = FetchError::Server {
        status: 503,
        retry_after: Some(secs(1)),
        detail: String::new(),
    };
    assert_eq!(retry_delay(&short, &mut b2, max, 1.0), secs(20));
    // An absurd Retry-After is capped.
    let absurd = FetchError::Throttled {
        retry_after: Some(secs(86_400)),
        detail: String::new(),
    };
    assert_eq!(retry_delay(&absurd, &mut b, max, 0.0), MAX_RETRY_AFTER);
    // Configuration errors wait max_backoff, every time.
    let rejected = FetchError::Rejected {
        status: 401,
        detail: String::new(),
    };
    for _ in 0..3 {
        assert_eq!(retry_delay(&rejected, &mut b, max, 0.0), max);
    }
    assert_eq!(rejected.reason(), "config");
    assert_eq!(throttled.reason(), "throttled");
    assert_eq!(short.reason(), "server_error");
}

// ---- the loop, with a scripted source and a paused clock ----

enum Step {
    Token {
        oid: Option<&'static str>,
        lifetime: Duration,
    },
    Fail(FetchError),
    Hang,
    Panic,
}

/// Wall time that follows tokio's (paused) clock, plus jumps (a suspend).
struct TestClock {
    base: SystemTime,
    t0: Instant,
    jump: Mutex<Duration>,
}

impl TestClock {
    fn new() -> Arc<TestClock> {
        Arc::new(TestClock {
            base: SystemTime::now(),
            t0: Instant::now(),
            jump: Mutex::new(Duration::ZERO),
        })
    }
    fn now(&self) -> SystemTime {
        self.base + (Instant::now() - self.t0) + *self.jump.lock().unwrap()
    }
    /// Move the wall clock forward without the monotonic clock, as a suspend does.
    fn suspend(&self, d: Duration) {
        *self.jump.lock().unwrap() += d;
    }
    fn clock(self: &Arc<Self>) -> Clock {
        let c = self.clone();
        Clock::from_fn(move || c.now())
    }
}

struct Scripted {
    steps: Mutex<VecDeque<Step>>,
    calls: Mutex<Vec<Instant>>,
    counter: Mutex<u64>,
    clock: Arc<TestClock>,
}

impl Scripted {
    fn new(steps: Vec<Step>) -> Arc<Self> {
        Arc::new(Scripted {
            steps: Mutex::new(steps.into()),
            calls: Mutex::new(vec![]),
            counter: Mutex::new(0),
            clock: TestClock::new(),
        })
    }
    fn calls(&self) -> Vec<Instant> {
        self.calls.lock().unwrap().clone()
    }
}

fn jwt(oid: Option<&str>, n: u64) -> String {
    let payload = match oid {
        Some(o) => format!(r#"{{"oid":"{o}","n":{n}}}"#),
        None => format!(r#"{{"n":{n}}}"#),
    };
    format!("e30.{}.c2ln", URL_SAFE_NO_PAD.encode(payload))
}

impl TokenSource for Scripted {
    fn describe(&self) -> &str {
        "scripted source"
    }
    fn fetch(&self) -> FetchFuture<'_> {
        Box::pin(async move {
            self.calls.lock().unwrap().push(Instant::now());
            let step = self.steps.lock().unwrap().pop_front();
            let n = {
                let mut c = self.counter.lock().unwrap();
                *c += 1;
                *c
            };
            match step {
                // When the script runs out, keep issuing hour-long tokens.
                None => Ok(FetchedToken {
                    access_token: Secret::new(jwt(Some("oid-default"), n)),
                    expires_at: self.clock.now() + secs(HOUR),
                }),
                Some(Step::Token { oid, lifetime }) => Ok(FetchedToken {
                    access_token: Secret::new(jwt(oid, n)),
                    expires_at: self.clock.now() + lifetime,
                }),
                Some(Step::Fail(e)) => Err(e),
                Some(Step::Hang) => {
                    std::future::pending::<()>().await;
                    unreachable!()
                }
                Some(Step::Panic) => panic!("scripted panic"),
            }
        })
    }
}

struct Harness {
    rx: watch::Receiver<TokenState>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    start: Instant,
}

fn start(source: Arc<Scripted>, username: Option<&str>) -> Harness {
    let clock = source.clock.clock();
    start_with(source, clock, RefreshNow::new(), username)
}

fn start_with(
    source: Arc<dyn TokenSource>,
    clock: Clock,
    refresh: RefreshNow,
    username: Option<&str>,
) -> Harness {
    let (tx, rx) = watch::channel(TokenState::default());
    let metrics = Arc::new(Metrics::new());
    let shutdown = CancellationToken::new();
    let cfg = RotatorConfig {
        attempt_timeout: secs(10),
        max_backoff: secs(60),
        username: username.map(str::to_string),
        clock,
        refresh,
    };
    let task = tokio::spawn(run(source, cfg, metrics.clone(), tx, shutdown.clone()));
    Harness {
        rx,
        metrics,
        shutdown,
        task,
        start: Instant::now(),
    }
}

impl Harness {
    /// Wait (in paused time) until `pred` holds, at most `limit`.
    async fn until(&mut self, limit: Duration, pred: impl Fn(&TokenState) -> bool) -> TokenState {
        tokio::time::timeout(limit, self.rx.wait_for(|s| pred(s)))
            .await
            .expect("condition not reached in time")
            .expect("rotator dropped its sender")
            .clone()
    }
    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(secs(1), self.task)
            .await
            .expect("rotator did not stop on shutdown")
            .unwrap();
    }
}

fn offsets(start: Instant, calls: &[Instant]) -> Vec<f64> {
    calls.iter().map(|c| (*c - start).as_secs_f64()).collect()
}

#[tokio::test(start_paused = true)]
async fn refreshes_on_schedule() {
    let src = Scripted::new(vec![
        Step::Token {
            oid: Some("gen1"),
            lifetime: secs(60 * MIN),
        },
        Step::Token {
            oid: Some("gen2"),
            lifetime: secs(60 * MIN),
        },
    ]);
    let mut h = start(src.clone(), None);
    let s = h.until(secs(1), |s| s.generation == 1).await;
    assert_eq!(s.current.as_ref().unwrap().username, "gen1");
    let s = h.until(secs(2 * HOUR), |s| s.generation == 2).await;
    assert_eq!(s.current.as_ref().unwrap().username, "gen2");
    let t = offsets(h.start, &src.calls());
    assert!(t[1] >= 40.0 * 60.0 && t[1] <= 45.0 * 60.0 + 1.0, "{t:?}");
    assert!(h
        .metrics
        .render()
        .contains(r#"token_refreshes_total{outcome="ok",reason="ok"} 2"#));
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn honours_retry_after_and_keeps_the_last_good_token() {
    let src = Scripted::new(vec![
        Step::Token {
            oid: Some("gen1"),
            lifetime: secs(20),
        },
        Step::Fail(FetchError::Throttled {
            retry_after: Some(secs(30)),
            detail: "slow down".into(),
        }),
        Step::Token {
            oid: Some("gen2"),
            lifetime: secs(HOUR),
        },
    ]);
    let mut h = start(src.clone(), None);
    h.until(secs(1), |s| s.generation == 1).await;
    let s = h.until(secs(60), |s| s.last_error.is_some()).await;
    assert_eq!(s.generation, 1, "a failure must not bump the generation");
    assert_eq!(s.current.as_ref().unwrap().username, "gen1");
    let e = s.last_error.unwrap();
    assert!(e.contains("429") && e.contains("retry after 30s"), "{e}");
    let s = h.until(secs(120), |s| s.generation == 2).await;
    assert!(s.last_error.is_none(), "success clears last_error");
    let t = offsets(h.start, &src.calls());
    // Offsets are f64 seconds: 44.556 - 14.556 may come out a hair under 30.
    assert!(
        t[2] - t[1] >= 30.0 - 1e-6,
        "Retry-After not honoured: {t:?}"
    );
    assert!(t[2] - t[1] < 31.0, "{t:?}");
    let m = h.metrics.render();
    assert!(
        m.contains(r#"token_refreshes_total{outcome="failed",reason="throttled"} 1"#),
        "{m}"
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn transient_failures_back_off_then_recover() {
    let mut steps: Vec<Step> = (0..6)
        .map(|_| {
            Step::Fail(FetchError::Server {
                status: 500,
                retry_after: None,
                detail: "boom".into(),
            })
        })
        .collect();
    steps.push(Step::Token {
        oid: Some("ok"),
        lifetime: secs(HOUR),
    });
    let src = Scripted::new(steps);
    let mut h = start(src.clone(), None);
    let s = h.until(secs(600), |s| s.generation == 1).await;
    assert_eq!(s.current.unwrap().username, "ok");
    let t = offsets(h.start, &src.calls());
    assert_eq!(t.len(), 7);
    // Each wait within its full-jitter bound: 0.5, 1, 2, 4, 8, 16 s.
    for (i, w) in t.windows(2).enumerate() {
        let gap = w[1] - w[0];
        let ceiling = 0.5 * 2f64.powi(i as i32);
        assert!(
            gap >= 0.1 - 1e-6 && gap <= ceiling + 1e-3,
            "gap {i}: {gap} {t:?}"
        );
    }
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn config_errors_retry_slowly_forever() {
    let steps = (0..4)
        .map(|_| {
            Step::Fail(FetchError::Rejected {
                status: 401,
                detail: "AADSTS700016: application not found".into(),
            })
        })
        .collect();
    let src = Scripted::new(steps);
    let mut h = start(src.clone(), None);
    let s = h.until(secs(1), |s| s.last_error.is_some()).await;
    assert!(s.current.is_none());
    let e = s.last_error.unwrap();
    assert!(e.contains("401") && e.contains("configuration"), "{e}");
    h.until(secs(300), |s| s.generation == 1).await;
    let t = offsets(h.start, &src.calls());
    assert_eq!(t.len(), 5);
    for w in t.windows(2) {
        assert!((w[1] - w[0] - 60.0).abs() < 1e-3, "{t:?}");
    }
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn hung_and_panicking_attempts_do_not_kill_the_loop() {
    let src = Scripted::new(vec![
        Step::Hang,
        Step::Panic,
        Step::Token {
            oid: Some("alive"),
            lifetime: secs(HOUR),
        },
    ]);
    let mut h = start(src.clone(), None);
    let s = h.until(secs(15), |s| s.last_error.is_some()).await;
    assert!(s.last_error.unwrap().contains("attempt_timeout"));
    let s = h.until(secs(30), |s| s.generation == 1).await;
    assert_eq!(s.current.unwrap().username, "alive");
    let t = offsets(h.start, &src.calls());
    assert!((t[1] - t[0]) >= 10.0, "timeout of 10 s applied: {t:?}");
    let m = h.metrics.render();
    assert!(m.contains(r#"reason="timeout"} 1"#), "{m}");
    assert!(m.contains(r#"reason="internal"} 1"#), "{m}");
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn token_without_oid_is_refused_unless_username_is_set() {
    let src = Scripted::new(vec![
        Step::Token {
            oid: None,
            lifetime: secs(HOUR),
        },
        Step::Token {
            oid: Some("gen"),
            lifetime: secs(HOUR),
        },
    ]);
    let mut h = start(src.clone(), None);
    let s = h.until(secs(1), |s| s.last_error.is_some()).await;
    assert!(s.current.is_none(), "a token without oid is not published");
    assert!(s.last_error.unwrap().contains("auth.username"));
    h.until(secs(120), |s| s.generation == 1).await;
    h.stop().await;

    let src = Scripted::new(vec![Step::Token {
        oid: None,
        lifetime: secs(HOUR),
    }]);
    let mut h = start(src, Some("override"));
    let s = h.until(secs(1), |s| s.generation == 1).await;
    let cred = s.current.unwrap();
    assert_eq!(cred.username, "override");
    assert!(
        !format!("{cred:?}").contains("e30."),
        "Debug shows no token"
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn already_expired_token_is_an_error_not_a_hot_loop() {
    let src = Scripted::new(vec![
        Step::Token {
            oid: Some("x"),
            lifetime: Duration::ZERO,
        },
        Step::Token {
            oid: Some("x"),
            lifetime: Duration::ZERO,
        },
    ]);
    let mut h = start(src.clone(), None);
    let s = h.until(secs(1), |s| s.last_error.is_some()).await;
    assert!(s.last_error.unwrap().contains("clock"));
    h.until(secs(10), |s| s.generation == 1).await;
    let t = offsets(h.start, &src.calls());
    assert_eq!(t.len(), 3, "{t:?}");
    assert!(t[1] - t[0] >= MIN_RETRY.as_secs_f64() - 1e-6);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_ends_a_pending_attempt() {
    let src = Scripted::new(vec![Step::Hang]);
    let h = start(src.clone(), None);
    tokio::time::sleep(secs(1)).await;
    assert_eq!(src.calls().len(), 1);
    h.stop().await;
}

// ---- a caching endpoint, suspend, refresh on request ----

/// An endpoint that, like IMDS, hands back its cached token until `cache_for` after
/// minting it, then mints a new one.
struct Caching {
    clock: Arc<TestClock>,
    lifetime: Duration,
    cache_for: Duration,
    /// (token number, minted at) of the cached token.
    cached: Mutex<Option<(u64, SystemTime)>>,
    calls: Mutex<Vec<SystemTime>>,
}

impl TokenSource for Caching {
    fn describe(&self) -> &str {
        "caching source"
    }
    fn fetch(&self) -> FetchFuture<'_> {
        Box::pin(async move {
            let now = self.clock.now();
            self.calls.lock().unwrap().push(now);
            let mut cached = self.cached.lock().unwrap();
            let (n, minted) = match *cached {
                Some((n, at)) if now < at + self.cache_for => (n, at),
                Some((n, _)) => (n + 1, now),
                None => (1, now),
            };
            *cached = Some((n, minted));
            Ok(FetchedToken {
                access_token: Secret::new(jwt(Some(&format!("gen{n}")), n)),
                expires_at: minted + self.lifetime,
            })
        })
    }
}

#[tokio::test(start_paused = true)]
async fn a_caching_endpoint_gives_one_generation_per_token_and_no_creep() {
    let clock = TestClock::new();
    let lifetime = secs(24 * HOUR);
    let src = Arc::new(Caching {
        clock: clock.clone(),
        lifetime,
        cache_for: secs(20 * HOUR),
        cached: Mutex::new(None),
        calls: Mutex::new(vec![]),
    });
    let mut h = start_with(src.clone(), clock.clock(), RefreshNow::new(), None);
    // Every publication is seen (watch changes), so re-AUTH triggers are counted.
    let mut publications = 0u64;
    let mut last_generation = 0;
    let end = Instant::now() + secs(70 * HOUR);
    while Instant::now() < end {
        let changed = tokio::time::timeout(secs(HOUR), h.rx.changed()).await;
        if let Ok(r) = changed {
            r.unwrap();
            let s = h.rx.borrow_and_update().clone();
            if s.generation != last_generation {
                publications += 1;
                last_generation = s.generation;
                assert_eq!(
                    s.current.unwrap().username,
                    format!("gen{}", s.generation),
                    "each generation is a really new token"
                );
            }
        }
    }
    // 70 h with a token minted every 20 h: tokens 1..=4, one generation each.
    assert_eq!(last_generation, 4, "generations");
    assert_eq!(publications, 4, "no re-AUTH for a token handed back again");
    let calls = src.calls.lock().unwrap().clone();
    let t0 = calls[0];
    let at: Vec<f64> = calls
        .iter()
        .map(|c| c.duration_since(t0).unwrap().as_secs_f64() / 3600.0)
        .collect();
    // Where the endpoint minted each token (as `Caching` decides).
    let mut minted = vec![0.0];
    for a in &at {
        if *a >= minted.last().unwrap() + 20.0 {
            minted.push(*a);
        }
    }
    assert_eq!(minted.len(), 4, "{at:?}");
    // The first re-ask of each token is at about half its life (12 h, not 6 h, 3 h...).
    for m in &minted {
        if let Some(first) = at.iter().find(|a| **a > m + 1e-6) {
            let age = first - m;
            assert!(
                (11.0..=12.01).contains(&age),
                "first re-ask at {age} h: {at:?}"
            );
        }
    }
    // Between 12 h and 20 h of each token, asking again every 15 minutes at most:
    // bounded, and never a hot loop.
    assert!(
        calls.len() <= 4 * (8 * 4 + 2),
        "{} calls: {at:?}",
        calls.len()
    );
    for w in at.windows(2) {
        assert!(
            w[1] - w[0] >= SAME_TOKEN_FLOOR.as_secs_f64() * 0.9 / 3600.0,
            "{at:?}"
        );
    }
    let m = h.metrics.render();
    assert!(m.contains(r#"reason="unchanged""#), "{m}");
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_suspend_past_expiry_is_noticed_within_a_minute() {
    let src = Scripted::new(vec![]);
    let clock = src.clock.clone();
    let mut h = start(src.clone(), None);
    h.until(secs(1), |s| s.generation == 1).await;
    tokio::time::sleep(secs(60)).await;
    assert_eq!(src.calls().len(), 1);
    // The machine sleeps for 3 h: the wall clock jumps, tokio's clock does not.
    clock.suspend(secs(3 * HOUR));
    let resumed = Instant::now();
    let s = h.until(secs(61), |s| s.generation == 2).await;
    let noticed = Instant::now() - resumed;
    assert!(noticed <= secs(60), "noticed after {noticed:?}");
    assert!(
        s.usable(clock.now()).is_some(),
        "a token valid after the resume"
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn refresh_now_fetches_at_once() {
    let src = Scripted::new(vec![]);
    let refresh = RefreshNow::new();
    let clock = src.clock.clock();
    let mut h = start_with(src.clone(), clock, refresh.clone(), None);
    h.until(secs(1), |s| s.generation == 1).await;
    tokio::time::sleep(secs(5 * MIN)).await;
    refresh.refresh_now();
    h.until(secs(1), |s| s.generation == 2).await;
    assert_eq!(src.calls().len(), 2);
    h.stop().await;
}

#[test]
fn same_token_waits_have_a_floor_and_a_ceiling() {
    assert_eq!(same_token_delay(secs(12 * HOUR), 0.0), SAME_TOKEN_CEILING);
    assert_eq!(same_token_delay(secs(HOUR), 0.0), secs(225));
    assert_eq!(same_token_delay(secs(300), 0.0), SAME_TOKEN_FLOOR);
    // Short tokens: a quarter of what is left, never a hot loop.
    assert_eq!(same_token_delay(secs(60), 0.0), secs(15));
    assert_eq!(same_token_delay(Duration::ZERO, 0.0), MIN_RETRY);
    for i in 0..100 {
        let d = same_token_delay(secs(HOUR), i as f64 / 100.0);
        assert!(d <= secs(225) && d >= secs(202), "{d:?}");
    }
}
