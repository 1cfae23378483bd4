//! A new pinned connection dialled through a failover's gap: while the
//! endpoint refuses or drops connections, dial again every
//! [`super::maintenance::HOLD_RETRY`] for at most `upstream.hold` (the time
//! shared commands are held), instead of failing the client's command at the
//! first refusal. The decision is [`super::maintenance::pinned::next_dial`].

use super::maintenance::pinned::next_dial;
use super::tls::{Authed, Connector};
use super::UpstreamError;
use crate::resp::Proto;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub async fn connect(
    connector: &Connector,
    proto: Proto,
    hold: Duration,
    shutdown: &CancellationToken,
) -> Result<Authed, UpstreamError> {
    let start = Instant::now();
    let mut logged = false;
    loop {
        let err = match connector.connect(proto).await {
            Ok(c) => return Ok(c),
            Err(e) => e,
        };
        let Some(wait) = next_dial(&err, start.elapsed(), hold) else {
            return Err(err);
        };
        if !logged {
            logged = true;
            tracing::debug!(error = %err, ?hold, "pinned connection: endpoint unreachable; dialling again within upstream.hold");
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => return Err(UpstreamError::Shutdown),
        }
    }
}
