//! Shutdown: from SIGTERM/SIGINT (or `POST /quitquitquit`) to exit status 0.
//!
//! `main` owns the order; this module gives it the pieces. The first signal cancels
//! one shutdown token (the same token `admin` cancels on `/quitquitquit`); a second
//! signal exits at once. After the token is cancelled, `main`:
//!
//! 1. marks [`crate::admin::Health`] draining, so `/readyz` answers 503;
//! 2. waits [`min_delay`] (`shutdown.min_delay`) with the listener still accepting,
//!    for pods whose app container still opens connections while it shuts down;
//! 3. stops accepting, and gives the sessions' in-flight commands up to
//!    `shutdown.grace` to finish with [`drain`], which says when the grace runs out;
//! 4. cancels the admin server's own token last (kubelet probes `/livez` during the
//!    drain) and returns exit status 0.
//!
//! SIGHUP never stops the proxy: [`Hangups`] turns it into a refresh
//! of the upstream credential (secret files re-read).

use std::future::Future;
use std::time::Duration;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// A signal that asks the proxy to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopSignal {
    Term,
    Int,
}

impl StopSignal {
    /// The signal's name, for logs.
    pub fn name(self) -> &'static str {
        match self {
            StopSignal::Term => "SIGTERM",
            StopSignal::Int => "SIGINT",
        }
    }

    /// The conventional status of a process ended by this signal (128 + number).
    pub fn exit_status(self) -> i32 {
        match self {
            StopSignal::Term => 128 + 15,
            StopSignal::Int => 128 + 2,
        }
    }
}

/// SIGTERM and SIGINT handlers. Once installed, these signals no longer kill the
/// process by default: they are delivered here.
#[derive(Debug)]
pub struct StopSignals {
    term: Signal,
    int: Signal,
}

impl StopSignals {
    /// Install the handlers. Needs a tokio runtime; fails only if the OS refuses.
    pub fn install() -> std::io::Result<Self> {
        Ok(StopSignals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// The next SIGTERM or SIGINT.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a signal that arrives while nobody waits is kept for the next call.
    pub async fn recv(&mut self) -> StopSignal {
        tokio::select! {
            Some(()) = self.term.recv() => StopSignal::Term,
            Some(()) = self.int.recv() => StopSignal::Int,
        }
    }
}

/// Install SIGTERM/SIGINT handlers and spawn a task that cancels `shutdown` on the
/// first signal and exits the process at once (status 128 + signal number) on the
/// second. Call it early in `main`, inside the runtime: handlers are installed
/// before this returns, so no signal is missed.
/// `exit` ends the process (`main` flushes the log first).
pub fn spawn_signal_handler(
    shutdown: CancellationToken,
    exit: impl FnOnce(i32) + Send + 'static,
) -> std::io::Result<JoinHandle<()>> {
    let signals = StopSignals::install()?;
    Ok(tokio::spawn(handle_signals(signals, shutdown, exit)))
}

/// The signal policy, with `exit` injected so tests can watch it instead of dying.
async fn handle_signals(
    mut signals: StopSignals,
    shutdown: CancellationToken,
    exit: impl FnOnce(i32),
) {
    // Act first, log after: nothing a log line does may delay or prevent the act.
    let first = signals.recv().await;
    shutdown.cancel();
    tracing::info!(
        signal = first.name(),
        "shutdown: draining; send the signal again to exit at once"
    );
    let second = signals.recv().await;
    tracing::warn!(
        signal = second.name(),
        "shutdown: second signal; exiting now without waiting for in-flight commands"
    );
    exit(second.exit_status());
}

/// The SIGHUP handler. Installed before anything listens, so that no SIGHUP can
/// find the process without it (the default action would kill it with no drain).
#[derive(Debug)]
pub struct Hangups(Signal);

impl Hangups {
    /// Install the handler: from now on SIGHUP no longer kills the process.
    pub fn install() -> std::io::Result<Self> {
        Ok(Hangups(signal(SignalKind::hangup())?))
    }

    /// Spawn a task that, on every SIGHUP (including any received since
    /// [`Hangups::install`]), asks the credential source for a new credential now
    /// through `tokens`, which re-reads the secret files
    /// (`auth.static.password_file`, `auth.entra.client_secret_file`, the federated
    /// token file). SIGHUP never stops the proxy.
    /// `reload` runs first on each SIGHUP (main passes the listener's password
    /// file re-read), so this module needs nothing from `server`.
    pub fn spawn(
        mut self,
        tokens: crate::auth::TokenWatch,
        reload: impl Fn() + Send + 'static,
    ) -> JoinHandle<()> {
        tokio::spawn(async move {
            while self.0.recv().await.is_some() {
                reload();
                tokens.borrow().refresh.request();
                tracing::info!(
                    "SIGHUP: re-reading the secret files and refreshing the upstream credential now"
                );
            }
        })
    }
}

/// Keep the listener open for `delay` after shutdown began (`shutdown.min_delay`),
/// so that connections opened meanwhile are still served. Returns at once for zero.
pub async fn min_delay(delay: Duration) {
    if delay.is_zero() {
        return;
    }
    tracing::info!(
        delay_ms = delay.as_millis() as u64,
        "shutdown: still accepting connections for shutdown.min_delay"
    );
    tokio::time::sleep(delay).await;
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// All in-flight work finished, after this long.
    Complete(Duration),
    /// The grace ran out with work still in flight.
    GraceExpired,
}

/// Wait for `in_flight` (a future that resolves when the last in-flight command has
/// been answered and the sessions are closed) for at most `grace`
/// (`shutdown.grace`). Logs the outcome, and says so when the grace runs out: the
/// caller then exits anyway, closing what is left.
pub async fn drain<F: Future<Output = ()>>(grace: Duration, in_flight: F) -> Drained {
    let started = Instant::now();
    tracing::info!(
        grace_ms = grace.as_millis() as u64,
        "shutdown: waiting for in-flight commands"
    );
    match tokio::time::timeout(grace, in_flight).await {
        Ok(()) => {
            let took = started.elapsed();
            tracing::info!(took_ms = took.as_millis() as u64, "shutdown: drained");
            Drained::Complete(took)
        }
        Err(_) => {
            tracing::warn!(
                grace_ms = grace.as_millis() as u64,
                "shutdown: grace ran out with commands still in flight; closing their connections"
            );
            Drained::GraceExpired
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicI32, Ordering};
    use std::sync::Arc;

    #[tokio::test(start_paused = true)]
    async fn drain_completes_when_work_finishes() {
        let outcome = drain(
            Duration::from_secs(30),
            tokio::time::sleep(Duration::from_secs(2)),
        )
        .await;
        assert_eq!(outcome, Drained::Complete(Duration::from_secs(2)));
    }

    #[tokio::test(start_paused = true)]
    async fn drain_gives_up_when_grace_runs_out() {
        let started = tokio::time::Instant::now();
        let outcome = drain(Duration::from_secs(30), std::future::pending()).await;
        assert_eq!(outcome, Drained::GraceExpired);
        assert_eq!(started.elapsed(), Duration::from_secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn min_delay_waits_exactly_that_long() {
        let started = tokio::time::Instant::now();
        min_delay(Duration::ZERO).await;
        assert_eq!(started.elapsed(), Duration::ZERO);
        min_delay(Duration::from_secs(5)).await;
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }

    #[test]
    fn exit_statuses_follow_the_shell_convention() {
        assert_eq!(StopSignal::Term.exit_status(), 143);
        assert_eq!(StopSignal::Int.exit_status(), 130);
    }

    /// Sends real signals to this test process. The handlers are installed first,
    /// and once tokio has installed a handler for a signal it stays installed for
    /// the life of the process, so no other test can be killed by these signals.
    #[tokio::test]
    async fn first_signal_cancels_second_exits() {
        let shutdown = CancellationToken::new();
        let exited = Arc::new(AtomicI32::new(-1));
        let seen = exited.clone();
        let signals = StopSignals::install().unwrap();
        let task = tokio::spawn(handle_signals(signals, shutdown.clone(), move |status| {
            seen.store(status, Ordering::SeqCst)
        }));
        let raise = |sig: &str| {
            let status = std::process::Command::new("kill")
                .args([sig, &std::process::id().to_string()])
                .status()
                .unwrap();
            assert!(status.success());
        };

        raise("-TERM");
        tokio::time::timeout(Duration::from_secs(5), shutdown.cancelled())
            .await
            .expect("first SIGTERM cancels the shutdown token");
        assert_eq!(exited.load(Ordering::SeqCst), -1, "no exit on the first");

        raise("-INT");
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("second signal ends the handler")
            .unwrap();
        assert_eq!(exited.load(Ordering::SeqCst), 130);
    }
}
