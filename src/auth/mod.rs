//! Upstream credentials: where the proxy's own `AUTH <username> <password>` comes
//! from. A source publishes [`TokenState`] on a `watch` channel; every upstream
//! connection subscribes, authenticates with the current credential on connect and
//! re-AUTHs whenever the generation changes (see `upstream::conn`).
//!
//! - `static`: an access key or fixed password, published once, never expires.
//! - `entra`: a rotator ([`rotator`]) fetches Microsoft Entra ID tokens from the
//!   source [`entra`] configures ([`sources`]) and publishes each new one well
//!   before the previous one expires; the username is the token's `oid` ([`jwt`]).

pub mod entra;
pub mod jwt;
pub mod refresh;
pub mod rotator;
pub mod sources;

pub use entra::EntraEnv;
pub use refresh::RefreshRequests;

use crate::config::{AuthConfig, AuthSource};
use crate::metrics::Metrics;
use crate::secret::Secret;
use std::sync::Arc;
use std::time::SystemTime;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// What the proxy sends upstream as `AUTH <username> <password>`.
#[derive(Debug, Clone)]
pub struct Credential {
    pub username: String,
    pub password: Secret,
    /// When the server stops accepting this credential (`None`: never).
    pub expires_at: Option<SystemTime>,
}

/// The latest credential and what went wrong last, published to every connection.
#[derive(Debug, Clone, Default)]
pub struct TokenState {
    /// The credential to use; `None` until the first one arrives.
    pub current: Option<Arc<Credential>>,
    /// Bumped every time `current` changes.
    pub generation: u64,
    /// Why the last attempt to get a credential failed, if it did (never contains a secret).
    pub last_error: Option<String>,
    /// Ask the source for a new credential now (SIGHUP): see [`refresh`].
    pub refresh: RefreshRequests,
}

impl TokenState {
    /// The current credential if it is still valid at `now`.
    pub fn usable(&self, now: SystemTime) -> Option<&Arc<Credential>> {
        self.current
            .as_ref()
            .filter(|c| c.expires_at.is_none_or(|exp| exp > now))
    }
}

/// A receiver of credential updates. Cheap to clone; one per connection.
pub type TokenWatch = watch::Receiver<TokenState>;

/// A credential source could not even be set up (bad configuration).
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("auth: {0}")]
    Config(String),
}

/// Start the configured credential source, reading the Azure environment variables
/// from the process environment. Returns at once; an Entra source keeps refreshing
/// in the background until `shutdown` is cancelled, recording every attempt in
/// `metrics`.
pub fn start(
    cfg: &AuthConfig,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<TokenWatch, AuthError> {
    start_with_env(cfg, metrics, EntraEnv::from_process(), shutdown)
}

/// [`start`] with the environment passed in (tests give a map).
pub fn start_with_env(
    cfg: &AuthConfig,
    metrics: Arc<Metrics>,
    env: EntraEnv,
    shutdown: CancellationToken,
) -> Result<TokenWatch, AuthError> {
    match cfg.source {
        AuthSource::Static => {
            let password = cfg
                .static_
                .password
                .clone()
                .ok_or_else(|| AuthError::Config("auth.static.password is not set".into()))?;
            let username = cfg.username.clone().unwrap_or_else(|| "default".into());
            let (tx, rx) = watch::channel(TokenState {
                current: Some(Arc::new(Credential {
                    username,
                    password,
                    expires_at: None,
                })),
                generation: 1,
                ..TokenState::default()
            });
            // Keeps the sender until shutdown (receivers see "no change", not
            // "closed"), and re-reads auth.static.password_file when asked.
            let file = cfg.static_.password_file.clone();
            tokio::spawn(refresh::serve_static(tx, file, shutdown));
            Ok(rx)
        }
        AuthSource::Entra => {
            let (tx, rx) = watch::channel(TokenState::default());
            entra::spawn(cfg, metrics, env, tx, shutdown)?;
            Ok(rx)
        }
    }
}
