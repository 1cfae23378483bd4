//! Microsoft Entra ID token source (placeholder until the Entra issue lands).

use super::{AuthError, TokenState};
use crate::config::AuthConfig;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Start the Entra token rotator.
pub fn spawn(
    _cfg: &AuthConfig,
    _tx: watch::Sender<TokenState>,
    _shutdown: CancellationToken,
) -> Result<(), AuthError> {
    Err(AuthError::Config(
        "auth.source = \"entra\" is not implemented yet; use auth.source = \"static\"".into(),
    ))
}
