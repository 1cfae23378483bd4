//! Asking the credential source for a new credential now, out of schedule: what
//! SIGHUP does after the operator replaced a secret file. The request travels in
//! [`super::TokenState`] itself, so whoever holds the watch can ask and the source
//! needs no extra wiring; the rotator's wait between attempts
//! ([`sleep_or_refresh`]) is cut short by it.

use super::{Credential, TokenState};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

/// A request for a refresh now. Requests made while the source is busy are kept
/// (one), so a refresh always follows the latest request.
#[derive(Debug, Clone, Default)]
pub struct RefreshRequests(Arc<Notify>);

impl RefreshRequests {
    /// Ask for a new credential now.
    pub fn request(&self) {
        self.0.notify_one();
    }

    /// The next request.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a request made while nobody waits is kept for the next call.
    pub async fn requested(&self) {
        self.0.notified().await;
    }
}

/// The rotator's wait before its next attempt: `delay`, or less if a refresh is
/// requested meanwhile (logged). `false` when `shutdown` came first.
pub async fn sleep_or_refresh(
    delay: Duration,
    tx: &watch::Sender<TokenState>,
    shutdown: &CancellationToken,
) -> bool {
    let requests = tx.borrow().refresh.clone();
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => false,
        _ = requests.requested() => {
            tracing::info!(
                scheduled_in_s = delay.as_secs_f64(),
                "token refresh requested (SIGHUP): fetching a new token now"
            );
            true
        }
        _ = tokio::time::sleep(delay) => true,
    }
}

/// The static source's task: holds `tx` until `shutdown`, and on each refresh
/// request re-reads `file` (`auth.static.password_file`), publishing the password
/// as a new generation when it changed, so every connection re-AUTHs with it.
pub async fn serve_static(
    tx: watch::Sender<TokenState>,
    file: Option<PathBuf>,
    shutdown: CancellationToken,
) {
    let requests = tx.borrow().refresh.clone();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = requests.requested() => {}
        }
        let Some(path) = &file else {
            tracing::info!(
                "refresh requested (SIGHUP): the static password comes from the environment, nothing to re-read"
            );
            continue;
        };
        match crate::config::read_secret_file("auth.static.password_file", path) {
            Err(e) => {
                tracing::error!("refresh requested (SIGHUP): keeping the current password: {e}")
            }
            Ok(password) => {
                let changed = tx
                    .borrow()
                    .current
                    .as_ref()
                    .is_none_or(|c| c.password != password);
                if !changed {
                    tracing::info!(
                        "refresh requested (SIGHUP): auth.static.password_file is unchanged"
                    );
                    continue;
                }
                tx.send_modify(|s| {
                    if let Some(c) = &s.current {
                        s.current = Some(Arc::new(Credential {
                            username: c.username.clone(),
                            password,
                            expires_at: None,
                        }));
                        s.generation += 1;
                    }
                });
                tracing::info!(
                    generation = tx.borrow().generation,
                    "refresh requested (SIGHUP): new password from auth.static.password_file; re-authenticating every upstream connection"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_request_cuts_the_wait_short_and_shutdown_ends_it() {
        let (tx, rx) = watch::channel(TokenState::default());
        let shutdown = CancellationToken::new();
        let started = tokio::time::Instant::now();
        assert!(sleep_or_refresh(Duration::from_secs(5), &tx, &shutdown).await);
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        // Asked before the wait began: kept, so the wait ends at once.
        rx.borrow().refresh.request();
        assert!(sleep_or_refresh(Duration::from_secs(3600), &tx, &shutdown).await);
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        shutdown.cancel();
        assert!(!sleep_or_refresh(Duration::from_secs(3600), &tx, &shutdown).await);
    }

    #[tokio::test]
    async fn sighup_rereads_the_static_password_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, "old-key\n").unwrap();
        let (tx, mut rx) = watch::channel(TokenState {
            current: Some(Arc::new(Credential {
                username: "default".into(),
                password: crate::secret::Secret::new("old-key"),
                expires_at: None,
            })),
            generation: 1,
            ..TokenState::default()
        });
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serve_static(tx, Some(path.clone()), shutdown.clone()));
        // Unchanged: no new generation.
        rx.borrow().refresh.request();
        std::fs::write(&path, "new-key\n").unwrap();
        rx.borrow().refresh.request();
        let state =
            tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|s| s.generation == 2))
                .await
                .unwrap()
                .unwrap()
                .clone();
        assert_eq!(state.current.unwrap().password.expose(), "new-key");
        // An unreadable file keeps the current password.
        std::fs::remove_file(&path).unwrap();
        rx.borrow().refresh.request();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(rx.borrow().generation, 2);
        shutdown.cancel();
        task.await.unwrap();
    }
}
