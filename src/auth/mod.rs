//! Upstream credentials: where the proxy's own `AUTH <username> <password>` comes
//! from. A source publishes [`TokenState`] on a `watch` channel; every upstream
//! connection subscribes, authenticates with the current credential on connect and
//! re-AUTHs whenever the generation changes (see `upstream::conn`).
//!
//! - `static`: an access key or fixed password, published once, never expires.
//! - `entra`: a rotator ([`rotator`]) fetches Microsoft Entra ID tokens from the
//!   source [`entra`] configures (through `azure_identity`, [`azure`], or by hand
//!   where the crate cannot serve, [`sources`]; `auto` chooses in [`auto`]) and
//!   publishes each new one well before the previous one expires; the username is
//!   the token's `oid` ([`jwt`]).

pub mod auto;
pub mod azure;
pub mod cert;
pub mod entra;
pub mod env;
pub mod http;
pub mod jwt;
pub mod refresh;
pub mod rotator;
pub mod sources;

pub use entra::EntraEnv;
pub use refresh::RefreshRequests;
pub use rotator::RefreshNow;

use crate::config::{AuthConfig, AuthSource};
use crate::metrics::Metrics;
use crate::secret::Secret;
use std::sync::Arc;
use std::time::SystemTime;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The crates under the Entra sources whose logging is held at `warn`: the proxy
/// builds a fresh credential per fetch, and `azure_identity` logs its choice at
/// `info` each time; the proxy logs each fetch itself.
pub const SDK_LOG_TARGETS: &[&str] = &["azure_identity", "azure_core", "typespec_client_core"];

/// `level` (a `tracing` filter) with `<target>=warn` added for each of
/// [`SDK_LOG_TARGETS`] it does not name itself.
pub fn log_filter(level: &str) -> String {
    let mut filter = level.trim().to_string();
    for target in SDK_LOG_TARGETS {
        if !level.contains(target) {
            if !filter.is_empty() {
                filter.push(',');
            }
            filter.push_str(target);
            filter.push_str("=warn");
        }
    }
    filter
}

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
    start_with_refresh(cfg, metrics, env, RefreshNow::new(), shutdown)
}

/// [`start_with_env`] with a [`RefreshNow`] handle: `refresh.refresh_now()` makes an
/// Entra rotator fetch at once (for SIGHUP); for a static credential it does nothing.
pub fn start_with_refresh(
    cfg: &AuthConfig,
    metrics: Arc<Metrics>,
    env: EntraEnv,
    refresh: RefreshNow,
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
            entra::spawn(cfg, metrics, env, tx, refresh, shutdown)?;
            Ok(rx)
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sdk_logs_are_held_at_warn_unless_named() {
        assert_eq!(
            super::log_filter("info"),
            "info,azure_identity=warn,azure_core=warn,typespec_client_core=warn"
        );
        assert_eq!(
            super::log_filter("debug,azure_identity=debug"),
            "debug,azure_identity=debug,azure_core=warn,typespec_client_core=warn"
        );
    }
}
