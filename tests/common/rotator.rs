//! A credential rotator started in-process for the token-source tests
//! (`entra_sources`, `entra_kinds`): configuration, start, and waiting for a
//! state.

use redis_entra_proxy::auth::{self, EntraEnv, TokenState, TokenWatch};
use redis_entra_proxy::config::{AuthConfig, EntraConfig, EntraCredentialKind};
use redis_entra_proxy::metrics::Metrics;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

pub fn auth_config_with(
    kind: EntraCredentialKind,
    attempt_timeout: Duration,
    f: impl FnOnce(&mut EntraConfig),
) -> AuthConfig {
    let mut cfg = AuthConfig::default();
    cfg.entra.credential = kind;
    cfg.entra.attempt_timeout = attempt_timeout;
    cfg.entra.max_backoff = secs(2);
    f(&mut cfg.entra);
    cfg
}

pub fn env(pairs: &[(&str, &str)]) -> EntraEnv {
    pairs.iter().copied().collect()
}

/// A running rotator; cancelled on drop.
pub struct Running {
    pub rx: TokenWatch,
    pub metrics: Arc<Metrics>,
    pub shutdown: CancellationToken,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub fn start(cfg: &AuthConfig, env: EntraEnv) -> Running {
    let metrics = Arc::new(Metrics::new());
    let shutdown = CancellationToken::new();
    let rx = auth::start_with_env(cfg, metrics.clone(), env, shutdown.clone())
        .expect("valid configuration");
    Running {
        rx,
        metrics,
        shutdown,
    }
}

impl Running {
    pub async fn until(
        &mut self,
        limit: Duration,
        what: &str,
        pred: impl Fn(&TokenState) -> bool,
    ) -> TokenState {
        let result = tokio::time::timeout(limit, self.rx.wait_for(|s| pred(s)))
            .await
            .map(|r| r.map(|s| s.clone()));
        match result {
            Ok(Ok(s)) => s,
            Ok(Err(_)) => panic!("rotator gone while waiting for {what}"),
            Err(_) => {
                let s = self.rx.borrow();
                panic!(
                    "{what} not reached within {limit:?}; last state: generation {}, last_error {:?}",
                    s.generation, s.last_error
                )
            }
        }
    }

    pub async fn generation(&mut self, n: u64, limit: Duration) -> TokenState {
        self.until(limit, &format!("generation {n}"), |s| s.generation >= n)
            .await
    }

    pub fn metric(&self, outcome: &str, reason: &str) -> u64 {
        let text = self.metrics.render();
        let needle = format!(
            "redis_entra_proxy_token_refreshes_total{{outcome=\"{outcome}\",reason=\"{reason}\"}} "
        );
        text.lines()
            .find_map(|l| l.strip_prefix(&needle))
            .map(|v| v.trim().parse().unwrap())
            .unwrap_or(0)
    }
}
