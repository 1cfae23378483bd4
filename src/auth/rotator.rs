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
use tokio::sync::{watch, Notify};
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
/// Longest wait between two looks at the wall clock (expiry, the due time).
pub const WALL_CHECK: Duration = Duration::from_secs(60);
/// Shortest wait before asking again after the endpoint returned the held token.
pub const SAME_TOKEN_FLOOR: Duration = Duration::from_secs(30);
/// Longest such wait.
pub const SAME_TOKEN_CEILING: Duration = Duration::from_secs(15 * 60);
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

/// The wall clock the rotator reads expiry against: the system's, or a test's.
#[derive(Clone)]
pub struct Clock(Option<Arc<dyn Fn() -> SystemTime + Send + Sync>>);

impl Clock {
    /// `SystemTime::now`.
    pub fn system() -> Clock {
        Clock(None)
    }

    /// A clock that reads `f` (tests: wall time that follows tokio's paused clock,
    /// or jumps as after a suspend).
    pub fn from_fn(f: impl Fn() -> SystemTime + Send + Sync + 'static) -> Clock {
        Clock(Some(Arc::new(f)))
    }

    /// The time now.
    pub fn now(&self) -> SystemTime {
        match &self.0 {
            None => SystemTime::now(),
            Some(f) => f(),
        }
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_none() {
            "Clock(system)"
        } else {
            "Clock(custom)"
        })
    }
}

/// A handle that asks the rotator to fetch a token now instead of at its next
/// scheduled time (for SIGHUP). Cheap to clone. A request made while an attempt
/// is running starts the next attempt as soon as that one ends; requests made
/// meanwhile count once.
#[derive(Debug, Clone, Default)]
pub struct RefreshNow(Arc<Notify>);

impl RefreshNow {
    /// A handle not yet given to a rotator.
    pub fn new() -> RefreshNow {
        RefreshNow::default()
    }

    /// Ask for a fetch now.
    pub fn refresh_now(&self) {
        self.0.notify_one();
    }
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
    /// The wall clock expiry is judged against.
    pub clock: Clock,
    /// Wakes the rotator for an immediate fetch.
    pub refresh: RefreshNow,
}

/// How long to wait after the endpoint handed back the token already held, with
/// `remaining` life left: a sixteenth of it, between [`SAME_TOKEN_FLOOR`] (or a
/// quarter of what is left, for short tokens) and [`SAME_TOKEN_CEILING`], less up
/// to 10% jitter, never below [`MIN_RETRY`]. IMDS, App Service and `az` return
/// their cached token until close to its expiry; asking again on a floor finds
/// the new one soon after it exists without hammering the endpoint, and the
/// schedule of the next really new token starts from its own lifetime.
pub fn same_token_delay(remaining: Duration, jitter: f64) -> Duration {
    let floor = SAME_TOKEN_FLOOR.min(remaining / 4);
    let base = (remaining / 16).clamp(floor, SAME_TOKEN_CEILING);
    base.mul_f64(1.0 - 0.1 * jitter.clamp(0.0, 1.0))
        .max(MIN_RETRY)
}

/// Run the rotator until `shutdown` is cancelled. Publishes every new credential on
/// `tx` with a bumped generation, and every failure as `last_error` (keeping the
/// last good credential). A token equal to the one held is not published again
/// (no re-AUTH); the next try comes after [`same_token_delay`]. Records
/// `metrics.token_refresh(outcome, reason)` and the refresh latency for every
/// attempt, and the expiry gauges at least every [`WALL_CHECK`].
///
/// Waits are checked against the wall clock at least every [`WALL_CHECK`]: the
/// monotonic clock stops while the machine is suspended, the token's expiry does
/// not, so after a resume past the due time the fetch starts within a minute.
pub async fn run(
    source: Arc<dyn TokenSource>,
    cfg: RotatorConfig,
    metrics: Arc<Metrics>,
    tx: watch::Sender<TokenState>,
    shutdown: CancellationToken,
) {
    let clock = cfg.clock.clone();
    let mut backoff = Backoff::new(BASE_BACKOFF, cfg.max_backoff);
    // When the current run of failures began (for the IMDS 410 grace).
    let mut failing_since: Option<tokio::time::Instant> = None;
    let mut generation = tx.borrow().generation;
    loop {
        let started = tokio::time::Instant::now();
        let started_wall = SystemTime::now();
        let Some(result) = attempt(&source, cfg.attempt_timeout, &shutdown).await else {
            return;
        };
        metrics
            .token_refresh_latency
            .observe(started.elapsed().as_secs_f64());
        let now = clock.now();
        let result = result.and_then(|t| credential(t, cfg.username.as_deref(), now));
        if let Some(otel) = metrics.otel() {
            otel.finished(
                "token refresh",
                1,
                started_wall,
                vec![crate::otel::encode::attr_str(
                    "redis_entra_proxy.token.source",
                    source.describe(),
                )],
                result.as_ref().err().map(|e| e.reason().to_string()),
            );
        }
        let delay = match result {
            Ok((cred, lifetime)) => {
                if backoff.failures() > 0 {
                    info!(
                        failures = backoff.failures(),
                        "token endpoint recovered ({})",
                        source.describe()
                    );
                }
                backoff.reset();
                failing_since = None;
                metrics.set_token_refreshed_at(unix_f64(now));
                let held = tx.borrow().current.clone();
                let same = held.as_ref().is_some_and(|h| {
                    h.password.expose() == cred.password.expose() && h.username == cred.username
                });
                if same {
                    let delay = same_token_delay(lifetime, fastrand::f64());
                    info!(
                        generation,
                        remaining_s = lifetime.as_secs(),
                        retry_in_s = delay.as_secs(),
                        "the token endpoint returned the token already held (its cache); not a new generation, asking again later ({})",
                        source.describe()
                    );
                    metrics.token_refresh("ok", "unchanged");
                    tx.send_if_modified(|s| s.last_error.take().is_some());
                    delay
                } else {
                    generation += 1;
                    let delay = refresh_in(lifetime, fastrand::f64());
                    let claims = jwt::claims(cred.password.expose()).unwrap_or_default();
                    if let Some(w) = jwt::audience_warning(&claims) {
                        warn!(generation, "{w}");
                    }
                    info!(
                        generation,
                        username = %cred.username,
                        audience = %claims.audiences().join(" "),
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
            }
            Err(err) => {
                let delay = retry_delay(&err, &mut backoff, cfg.max_backoff, fastrand::f64());
                metrics.token_refresh("failed", err.reason());
                let message = format!("{}: {err}", source.describe());
                let usable = tx.borrow().usable(now).cloned();
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
        if !wait(delay, &clock, &tx, &metrics, &cfg.refresh, &shutdown).await {
            return;
        }
    }
}

/// Publish the expiry gauges for the credential held at `now`.
fn record_expiry(tx: &watch::Sender<TokenState>, metrics: &Metrics, now: SystemTime) {
    let state = tx.borrow();
    let remaining = state
        .usable(now)
        .and_then(|c| c.expires_at)
        .and_then(|e| e.duration_since(now).ok())
        .unwrap_or_default();
    metrics.set_token_expiry_seconds(Some(remaining.as_secs_f64()));
    if let Some(exp) = state.current.as_ref().and_then(|c| c.expires_at) {
        metrics.set_token_expires_at(unix_f64(exp));
    }
}

/// Sleep `delay` by both clocks: ends when it has passed on the monotonic clock or
/// on the wall clock (checked every [`WALL_CHECK`]), or on a [`RefreshNow`]. False
/// on shutdown.
async fn wait(
    delay: Duration,
    clock: &Clock,
    tx: &watch::Sender<TokenState>,
    metrics: &Metrics,
    refresh: &RefreshNow,
    shutdown: &CancellationToken,
) -> bool {
    let mono_due = tokio::time::Instant::now() + delay;
    let wall_due = clock.now() + delay;
    // SIGHUP's request travels in the published state.
    let requests = tx.borrow().refresh.clone();
    loop {
        let now = clock.now();
        record_expiry(tx, metrics, now);
        let mono_left = mono_due.saturating_duration_since(tokio::time::Instant::now());
        let wall_left = wall_due.duration_since(now).unwrap_or_default();
        if mono_left.is_zero() {
            return true;
        }
        if wall_left.is_zero() {
            if mono_left > WALL_CHECK {
                warn!(
                    monotonic_left_s = mono_left.as_secs(),
                    "the wall clock passed the refresh time well before the monotonic clock (the machine was suspended, or the clock was set); refreshing now"
                );
            }
            return true;
        }
        let step = mono_left.min(wall_left).min(WALL_CHECK);
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return false,
            _ = refresh.0.notified() => {
                info!("token refresh requested; fetching now");
                return true;
            }
            _ = requests.requested() => {
                info!(
                    scheduled_in_s = mono_left.as_secs_f64(),
                    "token refresh requested (SIGHUP): fetching a new token now"
                );
                return true;
            }
            _ = tokio::time::sleep(step) => {}
        }
    }
}

fn unix_f64(t: SystemTime) -> f64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
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
    now: SystemTime,
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
    let lifetime = token.expires_at.duration_since(now).unwrap_or_default();
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
mod tests;
