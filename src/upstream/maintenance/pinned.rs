//! Dedicated (pinned) connections through failovers and blips: what a
//! client's session does when the connection holding it drops, whether a
//! blocked command is waited again on a new connection, and how long a new
//! pinned connection is dialled for. Pure decisions; the session and the pool
//! carry them out.

use crate::upstream::UpstreamError;
use std::time::Duration;

/// What the client had on the pinned connection that dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PinnedState {
    pub in_multi: bool,
    pub watching: bool,
    /// SELECTed a database other than 0.
    pub selected_db: bool,
    /// A client mode (tracking, MONITOR, READONLY...) the proxy cannot make
    /// again on its own.
    pub sticky: bool,
}

/// What the session does when its pinned connection drops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterLost {
    /// Close the client (as a direct connection to Redis would be): state
    /// the client relies on for its next commands went with the connection.
    Close,
    /// Keep the client and let go of the connection. `abort_multi`: the
    /// transaction it was queueing is gone, so the next commands are refused
    /// and EXEC answers EXECABORT (nothing of it runs, never half).
    /// `fail_watch`: its WATCH is gone, so the next EXEC aborts.
    Forget { abort_multi: bool, fail_watch: bool },
}

pub fn after_lost(s: PinnedState) -> AfterLost {
    if s.selected_db || s.sticky {
        return AfterLost::Close;
    }
    AfterLost::Forget {
        abort_multi: s.in_multi,
        fail_watch: s.watching && !s.in_multi,
    }
}

/// Whether a blocking command whose pinned connection failed is made again
/// on a new one: only when its reply never came (the connection dropped:
/// the server dropped the wait with it, and an element it had already taken
/// is in a reply lost either way, so waiting again takes nothing twice) or
/// it was never written (the connection had ended before), the client is
/// still there, was not unblocked, and nothing else of it was on that
/// connection.
pub fn reissue_blocking(
    err: &UpstreamError,
    client_gone: bool,
    unblocked: bool,
    holds_state: bool,
) -> bool {
    matches!(
        err,
        UpstreamError::Lost { .. } | UpstreamError::Closed { .. }
    ) && !client_gone
        && !unblocked
        && !holds_state
}

/// Whether dialling a pinned connection again may help: the endpoint was
/// unreachable or dropped the connection (a failover's gap, a blip), not a
/// refused credential or a proxy going down.
pub fn dial_again(err: &UpstreamError) -> bool {
    matches!(
        err,
        UpstreamError::Connect { .. }
            | UpstreamError::Tls { .. }
            | UpstreamError::Timeout { .. }
            | UpstreamError::Lost { .. }
    )
}

/// After a failed dial `waited` into a hold of `hold`: how long to wait
/// before the next one (`None`: give up and fail the client's command).
pub fn next_dial(err: &UpstreamError, waited: Duration, hold: Duration) -> Option<Duration> {
    if !dial_again(err) || waited >= hold {
        return None;
    }
    Some(super::HOLD_RETRY.min(hold - waited))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lost() -> UpstreamError {
        UpstreamError::Lost {
            reason: "peer closed".into(),
        }
    }

    fn refused() -> UpstreamError {
        UpstreamError::Connect {
            addr: "cache:6380".into(),
            reason: "Connection refused".into(),
        }
    }

    #[test]
    fn a_lost_transaction_is_aborted_whole_and_the_client_kept() {
        let s = PinnedState {
            in_multi: true,
            watching: true,
            ..Default::default()
        };
        assert_eq!(
            after_lost(s),
            AfterLost::Forget {
                abort_multi: true,
                fail_watch: false
            }
        );
        let s = PinnedState {
            watching: true,
            ..Default::default()
        };
        assert_eq!(
            after_lost(s),
            AfterLost::Forget {
                abort_multi: false,
                fail_watch: true
            }
        );
        assert_eq!(
            after_lost(PinnedState::default()),
            AfterLost::Forget {
                abort_multi: false,
                fail_watch: false
            }
        );
    }

    #[test]
    fn state_the_proxy_cannot_make_again_closes_the_client() {
        for s in [
            PinnedState {
                selected_db: true,
                ..Default::default()
            },
            PinnedState {
                sticky: true,
                in_multi: true,
                ..Default::default()
            },
        ] {
            assert_eq!(after_lost(s), AfterLost::Close, "{s:?}");
        }
    }

    #[test]
    fn a_blocked_wait_is_made_again_only_when_its_reply_never_came() {
        assert!(reissue_blocking(&lost(), false, false, false));
        assert!(
            !reissue_blocking(&lost(), true, false, false),
            "client gone"
        );
        assert!(!reissue_blocking(&lost(), false, true, false), "unblocked");
        assert!(!reissue_blocking(&lost(), false, false, true), "state");
        let timeout = UpstreamError::Timeout {
            addr: "a".into(),
            secs: 30.0,
            during: "waiting for a reply",
        };
        assert!(!reissue_blocking(&timeout, false, false, false));
        // Never written (its connection had ended): it did not run either.
        let closed = UpstreamError::Closed {
            addr: "a".into(),
            reason: "the client's dedicated connection had ended".into(),
        };
        assert!(reissue_blocking(&closed, false, false, false));
        assert!(!reissue_blocking(&closed, false, false, true), "state");
        assert!(!reissue_blocking(
            &UpstreamError::Shutdown,
            false,
            false,
            false
        ));
    }

    #[test]
    fn a_pinned_dial_is_retried_within_the_hold_for_transport_errors_only() {
        let hold = Duration::from_secs(15);
        assert_eq!(
            next_dial(&refused(), Duration::ZERO, hold),
            Some(super::super::HOLD_RETRY)
        );
        assert_eq!(
            next_dial(&refused(), Duration::from_millis(14_900), hold),
            Some(Duration::from_millis(100))
        );
        assert_eq!(next_dial(&refused(), hold, hold), None);
        assert_eq!(next_dial(&refused(), Duration::ZERO, Duration::ZERO), None);
        let auth = UpstreamError::Auth {
            addr: "a".into(),
            reason: "WRONGPASS".into(),
        };
        assert_eq!(next_dial(&auth, Duration::ZERO, hold), None);
        assert_eq!(
            next_dial(&UpstreamError::Shutdown, Duration::ZERO, hold),
            None
        );
    }
}
