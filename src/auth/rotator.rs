//! The token rotator: the loop that keeps a fresh Entra token published on the
//! [`TokenState`] watch channel every upstream connection follows.
//!
//! `fetch -> publish -> sleep(refresh_in(lifetime)) -> fetch ...`, and on failure
//! `fetch -> record last_error -> sleep(backoff) -> fetch ...`. The rotator owns the
//! whole schedule: each attempt runs under its own timeout, nothing below it caches
//! or retries, so every refresh yields a genuinely new token. The loop never dies:
//! a failed, timed-out or even panicking attempt is recorded and retried; only the
//! shutdown token ends it. The last good credential stays published until a new one
//! replaces it; consumers check [`TokenState::usable`] for expiry.
//!
//! Single flight: one rotator task per identity runs one attempt at a time, and an
//! attempt that times out is aborted (its HTTP request or `az` process dropped)
//! before the next one starts, so requests to the token endpoint never overlap.
//!
//! The timing rules are pure functions ([`refresh_in`], [`Backoff`],
//! [`retry_delay`]) so they are unit-tested on their own and with a paused clock.

use super::jwt;
use super::{Credential, TokenState};
use crate::metrics::Metrics;
use crate::secret::Secret;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// First backoff ceiling after a failure; doubles per consecutive failure.
pub const BASE_BACKOFF: Duration = Duration::from_millis(500);
/// Shortest wait between two attempts, whatever the jitter draws: no hot loop.
pub const MIN_RETRY: Duration = Duration::from_millis(100);
/// Shortest wait before a refresh, for absurdly short-lived tokens.
pub const MIN_REFRESH: Duration = Duration::from_millis(500);
/// The "15 minutes before expiry" rule of the refresh schedule.
pub const REFRESH_MARGIN: Duration = Duration::from_secs(15 * 60);
/// Tokens living this long or longer are refreshed at half their lifetime.
pub const LONG_LIVED: Duration = Duration::from_secs(2 * 60 * 60);
/// Largest jitter subtracted from a refresh time.
pub const MAX_REFRESH_JITTER: Duration = Duration::from_secs(5 * 60);
/// IMDS answers 410 while it is being upgraded, for up to this long: 410s within
/// this window of the first failure are logged as warnings, later ones as errors.
pub const IMDS_GONE_GRACE: Duration = Duration::from_secs(70);
/// A `Retry-After` longer than this is taken as this (a broken or hostile value
/// must not park the rotator past the current token's expiry).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(10 * 60);

/// When to refresh a token that lives `lifetime` from now: the earliest of 75% of
/// the lifetime, 50% for tokens of [`LONG_LIVED`] or more, and [`REFRESH_MARGIN`]
/// before expiry, minus a jitter of up to 10% of the lifetime (at most
/// [`MAX_REFRESH_JITTER`]) so that many proxies do not refresh in step.
///
/// Short lifetimes scale down: the margin is at most a quarter of the lifetime, so
/// below 60 minutes the 75% rule decides (a 10 s token refreshes after 6.5-7.5 s);
/// the result is never below [`MIN_REFRESH`]. `jitter` is a uniform draw in [0, 1).
pub fn refresh_in(lifetime: Duration, jitter: f64) -> Duration {
    let l = lifetime.as_secs_f64();
    let mut at = 0.75 * l;
    if lifetime >= LONG_LIVED {
        at = at.min(0.5 * l);
    }
    let margin = REFRESH_MARGIN.as_secs_f64().min(0.25 * l);
    at = at.min(l - margin);
    let spread = (0.1 * l).min(MAX_REFRESH_JITTER.as_secs_f64());
    at -= jitter.clamp(0.0, 1.0) * spread;
    Duration::from_secs_f64(at.max(0.0)).max(MIN_REFRESH)
}

/// Capped exponential backoff with full jitter: the n-th consecutive failure waits
/// a uniform draw in [0, min(cap, base * 2^n)], never less than [`MIN_RETRY`].
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    failures: u32,
}

impl Backoff {
    /// A backoff starting at `base` and never exceeding `cap` (at least `base`).
    pub fn new(base: Duration, cap: Duration) -> Self {
        Backoff {
            base,
            cap: cap.max(base),
            failures: 0,
        }
    }

    /// The upper bound of the next wait.
    pub fn ceiling(&self) -> Duration {
        let factor = 2u32.saturating_pow(self.failures.min(31));
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// Record a failure and return how long to wait; `rand` is a uniform draw in [0, 1).
    pub fn next_delay(&mut self, rand: f64) -> Duration {
        let ceiling = self.ceiling();
        self.failures = self.failures.saturating_add(1);
        ceiling.mul_f64(rand.clamp(0.0, 1.0)).max(MIN_RETRY)
    }

    /// Consecutive failures so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Forget past failures (after a success).
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

/// How long to wait after `err`. Configuration errors (400/401/403, a missing file)
/// wait the full `max_backoff`: a loud, slow retry, never a dead loop. Transient
/// ones take the next backoff step. A `Retry-After` is honoured as a minimum (up to
/// [`MAX_RETRY_AFTER`]).
pub fn retry_delay(
    err: &FetchError,
    backoff: &mut Backoff,
    max_backoff: Duration,
    rand: f64,
) -> Duration {
    let delay = if err.is_config() {
        // Still count it, so that a later transient error does not start from zero.
        backoff.next_delay(rand);
        max_backoff.max(MIN_RETRY)
    } else {
        backoff.next_delay(rand)
    };
    match err.retry_after() {
        Some(ra) => delay.max(ra.min(MAX_RETRY_AFTER)),
        None => delay,
    }
}

/// A token as a source returned it, before the rotator checks it.
#[derive(Debug, Clone)]
pub struct FetchedToken {
    /// The access token (the `AUTH` password).
    pub access_token: Secret,
    /// When it expires, as the endpoint said (or its `exp` claim).
    pub expires_at: SystemTime,
}

/// Why one attempt to get a token failed. Never contains a token: response bodies
/// are quoted only for error statuses, shortened.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    /// Local configuration that cannot work (a missing file, `az` not logged in).
    #[error("{0}")]
    Config(String),
    /// The endpoint refused the request (400/401/403): a configuration error.
    #[error("HTTP {status} (configuration error): {detail}")]
    Rejected { status: u16, detail: String },
    /// HTTP 429.
    #[error("HTTP 429 (throttled{}): {detail}", fmt_retry_after(.retry_after))]
    Throttled {
        retry_after: Option<Duration>,
        detail: String,
    },
    /// A retryable server status (404, 410, 5xx and other non-4xx statuses).
    #[error("HTTP {status}{}: {detail}", fmt_retry_after(.retry_after))]
    Server {
        status: u16,
        retry_after: Option<Duration>,
        detail: String,
    },
    /// The attempt did not finish within `auth.entra.attempt_timeout`.
    #[error("no answer within {0:?} (auth.entra.attempt_timeout)")]
    Timeout(Duration),
    /// Connection refused, reset, DNS, TLS, or a command that could not run.
    #[error("{0}")]
    Network(String),
    /// A success status with a body that is not a usable token response.
    #[error("{0}")]
    Malformed(String),
    /// The token has no `oid` claim and `auth.username` is not set.
    #[error("the token has no `oid` claim to use as the Redis username; set auth.username (env REDIS_ENTRA_PROXY_AUTH__USERNAME) to the identity's object id")]
    NoOid,
    /// The attempt panicked (a bug); the rotator carries on.
    #[error("internal error: {0}")]
    Internal(String),
}

fn fmt_retry_after(ra: &Option<Duration>) -> String {
    match ra {
        Some(d) => format!(", retry after {}s", d.as_secs()),
        None => String::new(),
    }
}

impl FetchError {
    /// A short, static label for metrics (`reason` of `token_refreshes_total`).
    pub fn reason(&self) -> &'static str {
        match self {
            FetchError::Config(_) | FetchError::Rejected { .. } => "config",
            FetchError::Throttled { .. } => "throttled",
            FetchError::Server { .. } => "server_error",
            FetchError::Timeout(_) => "timeout",
            FetchError::Network(_) => "network",
            FetchError::Malformed(_) => "malformed",
            FetchError::NoOid => "no_oid",
            FetchError::Internal(_) => "internal",
        }
    }

    /// Whether retrying soon cannot help: wrong settings, wrong identity, no login.
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            FetchError::Config(_) | FetchError::Rejected { .. } | FetchError::NoOid
        )
    }

    /// The server's `Retry-After`, if it sent one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            FetchError::Throttled { retry_after, .. } | FetchError::Server { retry_after, .. } => {
                *retry_after
            }
            _ => None,
        }
    }
}

/// The future a [`TokenSource`] returns.
pub type FetchFuture<'a> =
    Pin<Box<dyn Future<Output = Result<FetchedToken, FetchError>> + Send + 'a>>;

/// One way of getting a token (IMDS, App Service, workload identity, ...). Each
/// call must ask the endpoint anew: no caching, no retries; the rotator does both.
pub trait TokenSource: Send + Sync + 'static {
    /// What this source is, for logs and `last_error` (no secrets).
    fn describe(&self) -> &str;
    /// Ask for a new token once.
    fn fetch(&self) -> FetchFuture<'_>;
}

/// Settings of one rotator.
#[derive(Debug, Clone)]
pub struct RotatorConfig {
    /// Bound on each attempt.
    pub attempt_timeout: Duration,
    /// Cap of the backoff, and the wait after a configuration error.
    pub max_backoff: Duration,
    /// `auth.username`: overrides the `oid` claim.
    pub username: Option<String>,
}

/// Run the rotator until `shutdown` is cancelled. Publishes every new credential on
/// `tx` with a bumped generation, and every failure as `last_error` (keeping the
/// last good credential). Records `metrics.token_refresh(outcome, reason)` for every
/// attempt and `token_expiry_seconds` after it.
pub async fn run(
    source: Arc<dyn TokenSource>,
    cfg: RotatorConfig,
    metrics: Arc<Metrics>,
    tx: watch::Sender<TokenState>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(BASE_BACKOFF, cfg.max_backoff);
    // When the current run of failures began (for the IMDS 410 grace).
    let mut failing_since: Option<tokio::time::Instant> = None;
    let mut generation = tx.borrow().generation;
    loop {
        let Some(result) = attempt(&source, cfg.attempt_timeout, &shutdown).await else {
            return;
        };
        let result = result.and_then(|t| credential(t, cfg.username.as_deref()));
        let delay = match result {
            Ok((cred, lifetime)) => {
                generation += 1;
                let delay = refresh_in(lifetime, fastrand::f64());
                if backoff.failures() > 0 {
                    info!(
                        failures = backoff.failures(),
                        "token endpoint recovered ({})",
                        source.describe()
                    );
                }
                backoff.reset();
                failing_since = None;
                info!(
                    generation,
                    username = %cred.username,
                    expires_at = %cred.expires_at.map(fmt_time).unwrap_or_default(),
                    lifetime_s = lifetime.as_secs(),
                    refresh_in_s = delay.as_secs_f64(),
                    "new Entra token from {}",
                    source.describe()
                );
                metrics.token_refresh("ok", "ok");
                let cred = Arc::new(cred);
                tx.send_modify(|s| {
                    s.current = Some(cred);
                    s.generation = generation;
                    s.last_error = None;
                });
                delay
            }
            Err(err) => {
                let delay = retry_delay(&err, &mut backoff, cfg.max_backoff, fastrand::f64());
                metrics.token_refresh("failed", err.reason());
                let message = format!("{}: {err}", source.describe());
                let usable = tx.borrow().usable(SystemTime::now()).cloned();
                let expires = usable
                    .as_ref()
                    .and_then(|c| c.expires_at)
                    .map(fmt_time)
                    .unwrap_or_else(|| "none".into());
                let failures = backoff.failures();
                let retry_s = delay.as_secs_f64();
                let since = *failing_since.get_or_insert_with(tokio::time::Instant::now);
                let gone_too_long = matches!(err, FetchError::Server { status: 410, .. })
                    && since.elapsed() > IMDS_GONE_GRACE;
                if err.is_config() {
                    error!(
                        reason = err.reason(),
                        failures,
                        retry_in_s = retry_s,
                        current_token_expires = %expires,
                        "Entra token request failed, check the configuration and the identity's permissions: {message}"
                    );
                } else if usable.is_none() || gone_too_long {
                    error!(
                        reason = err.reason(),
                        failures,
                        retry_in_s = retry_s,
                        failing_for_s = since.elapsed().as_secs(),
                        current_token_expires = %expires,
                        "Entra token refresh keeps failing: {message}"
                    );
                } else {
                    warn!(
                        reason = err.reason(),
                        failures,
                        retry_in_s = retry_s,
                        current_token_expires = %expires,
                        "Entra token refresh failed, still serving on the current token: {message}"
                    );
                }
                tx.send_modify(|s| s.last_error = Some(message));
                delay
            }
        };
        let remaining = tx
            .borrow()
            .usable(SystemTime::now())
            .and_then(|c| c.expires_at)
            .and_then(|e| e.duration_since(SystemTime::now()).ok())
            .unwrap_or_default();
        metrics.set_token_expiry_seconds(Some(remaining.as_secs_f64()));
        if !super::refresh::sleep_or_refresh(delay, &tx, &shutdown).await {
            return;
        }
    }
}

/// One attempt in its own task under `timeout`, so a hang is cut off and a panic
/// is caught. `None` when shutdown won.
async fn attempt(
    source: &Arc<dyn TokenSource>,
    timeout: Duration,
    shutdown: &CancellationToken,
) -> Option<Result<FetchedToken, FetchError>> {
    let src = source.clone();
    let task = AbortOnDrop(tokio::spawn(async move { src.fetch().await }));
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => None,
        r = tokio::time::timeout(timeout, task) => Some(match r {
            Err(_) => Err(FetchError::Timeout(timeout)),
            Ok(Err(join)) if join.is_panic() => Err(FetchError::Internal("the token request panicked".into())),
            Ok(Err(_)) => Err(FetchError::Internal("the token request was cancelled".into())),
            Ok(Ok(r)) => r,
        }),
    }
}

/// Aborts the attempt task when the rotator stops waiting for it (timeout,
/// shutdown): its request is dropped and never overlaps the next one.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<T> Future for AbortOnDrop<T> {
    type Output = Result<T, tokio::task::JoinError>;
    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx)
    }
}

/// Check a fetched token and make the credential: username from the override or
/// the `oid` claim, a lifetime that is not already over.
fn credential(
    token: FetchedToken,
    username: Option<&str>,
) -> Result<(Credential, Duration), FetchError> {
    let username = match username {
        Some(u) => u.to_string(),
        None => match jwt::claims(token.access_token.expose()) {
            Ok(claims) => claims
                .oid
                .filter(|o| !o.is_empty())
                .ok_or(FetchError::NoOid)?,
            Err(e) => {
                return Err(FetchError::Malformed(format!(
                    "cannot read the token's `oid` claim: {e}; set auth.username to use this token"
                )))
            }
        },
    };
    let lifetime = token
        .expires_at
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    if lifetime.is_zero() {
        return Err(FetchError::Malformed(format!(
            "the token endpoint returned a token that expires at {}, which is not in the future (is this machine's clock right?)",
            fmt_time(token.expires_at)
        )));
    }
    Ok((
        Credential {
            username,
            password: token.access_token,
            expires_at: Some(token.expires_at),
        },
        lifetime,
    ))
}

fn fmt_time(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests {
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

    struct Scripted {
        steps: Mutex<VecDeque<Step>>,
        calls: Mutex<Vec<Instant>>,
        counter: Mutex<u64>,
    }

    impl Scripted {
        fn new(steps: Vec<Step>) -> Arc<Self> {
            Arc::new(Scripted {
                steps: Mutex::new(steps.into()),
                calls: Mutex::new(vec![]),
                counter: Mutex::new(0),
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
                        expires_at: SystemTime::now() + secs(HOUR),
                    }),
                    Some(Step::Token { oid, lifetime }) => Ok(FetchedToken {
                        access_token: Secret::new(jwt(oid, n)),
                        expires_at: SystemTime::now() + lifetime,
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
        let (tx, rx) = watch::channel(TokenState::default());
        let metrics = Arc::new(Metrics::new());
        let shutdown = CancellationToken::new();
        let cfg = RotatorConfig {
            attempt_timeout: secs(10),
            max_backoff: secs(60),
            username: username.map(str::to_string),
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
        async fn until(
            &mut self,
            limit: Duration,
            pred: impl Fn(&TokenState) -> bool,
        ) -> TokenState {
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
}
