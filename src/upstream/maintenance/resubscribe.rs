//! Subscriptions are made again before publishing resumes (issue 18): when a
//! failover, a restart or a blip drops every connection to the endpoint, the
//! shared connections hold what clients send meanwhile (`upstream.hold`) and
//! the pub/sub hub subscribes again on a connection of its own. Whichever of
//! the two came back first used to win: held `PUBLISH`es reached the new
//! primary before the hub had subscribed again, and subscribers lost those
//! messages. Now the hub closes a [`ResubGate`] while its subscriptions are
//! being made again, and a shared connection re-established after a failure
//! waits for the gate (at most [`RESUB_WAIT_MAX`]) before it sends what it
//! held. Duplicates cannot come of it; a stall of at most one SUBSCRIBE round
//! trip after the gap can.
//!
//! [`Resubscribing`] is the hub's pure bookkeeping; the gate is the signal.

use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// How long a re-established shared connection waits at most for the hub:
/// past this the gate is taken as open (a hub that cannot subscribe again
/// must not stall every other command).
pub const RESUB_WAIT_MAX: Duration = Duration::from_secs(3);

/// Closed (since when) while the hub makes its subscriptions again on the
/// endpoint; shared by the hub and the endpoint's shared connections.
#[derive(Debug)]
pub struct ResubGate {
    tx: watch::Sender<Option<Instant>>,
}

impl Default for ResubGate {
    fn default() -> Self {
        ResubGate {
            tx: watch::Sender::new(None),
        }
    }
}

impl ResubGate {
    /// Close (`true`) or open the gate; a gate closed stays closed since the
    /// first time.
    pub fn set(&self, closed: bool) {
        self.tx.send_if_modified(|v| match (closed, v.is_some()) {
            (true, false) => {
                *v = Some(Instant::now());
                true
            }
            (false, true) => {
                *v = None;
                true
            }
            _ => false,
        });
    }

    pub fn is_closed(&self) -> bool {
        self.tx.borrow().is_some()
    }

    /// Wait until the gate is open, for at most `max` (then taken as open).
    /// Returns how long this waited. (Bounded from the start of the wait,
    /// not from the close: the gate closes at the drop, and the wait begins
    /// only once the endpoint is back, a whole gap later.)
    pub async fn wait_open(&self, max: Duration) -> Duration {
        let start = Instant::now();
        let until = start + max;
        let mut rx = self.tx.subscribe();
        loop {
            if rx.borrow_and_update().is_none() || Instant::now() >= until {
                return start.elapsed();
            }
            tokio::select! {
                r = rx.changed() => if r.is_err() { return start.elapsed() },
                _ = tokio::time::sleep_until(until) => return start.elapsed(),
            }
        }
    }
}

/// The hub's side: how many of its subscriptions on the endpoint wait to be
/// confirmed again. `None`: nothing to make again (the gate is open).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Resubscribing {
    outstanding: Option<usize>,
}

impl Resubscribing {
    /// The hub's connection dropped holding `subscriptions`: closed until they
    /// are made again (open at once if there were none). Returns whether
    /// the gate is closed.
    pub fn lost(&mut self, subscriptions: usize) -> bool {
        self.outstanding = (subscriptions > 0).then_some(usize::MAX);
        self.closed()
    }

    /// A new connection came up and `sent` subscriptions were sent again.
    pub fn connected(&mut self, sent: usize) -> bool {
        self.outstanding = (sent > 0).then_some(sent);
        self.closed()
    }

    /// One (P|S)SUBSCRIBE confirmation arrived.
    pub fn confirmed(&mut self) -> bool {
        if let Some(n) = self.outstanding {
            // Still down (`usize::MAX`): a confirmation of the old connection.
            if n != usize::MAX {
                self.outstanding = n.checked_sub(1).filter(|n| *n > 0);
            }
        }
        self.closed()
    }

    pub fn closed(&self) -> bool {
        self.outstanding.is_some()
    }
}

/// Whether a push frame confirms a SUBSCRIBE, PSUBSCRIBE or SSUBSCRIBE.
pub fn is_subscribe_confirmation(frame: &[u8]) -> bool {
    matches!(
        crate::resp::push_head(frame),
        Some((b"subscribe" | b"psubscribe" | b"ssubscribe", _))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confirmations_are_told_from_messages() {
        assert!(is_subscribe_confirmation(
            b">3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n"
        ));
        assert!(is_subscribe_confirmation(
            b">3\r\n$10\r\npsubscribe\r\n$2\r\nc*\r\n:2\r\n"
        ));
        assert!(!is_subscribe_confirmation(
            b">3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$1\r\nx\r\n"
        ));
        assert!(!is_subscribe_confirmation(
            b">3\r\n$11\r\nunsubscribe\r\n$2\r\nch\r\n:0\r\n"
        ));
        assert!(!is_subscribe_confirmation(b"+OK\r\n"));
    }

    #[test]
    fn the_gate_is_closed_from_the_drop_until_every_subscription_is_made_again() {
        let mut r = Resubscribing::default();
        assert!(!r.closed());
        assert!(r.lost(3), "closed at the drop");
        assert!(r.confirmed(), "a late confirmation of the old connection");
        assert!(r.connected(3));
        assert!(r.confirmed());
        assert!(r.confirmed());
        assert!(!r.confirmed(), "open once the third is in");
        assert!(!r.confirmed(), "and stays open");
    }

    #[test]
    fn a_hub_without_subscriptions_never_closes_the_gate() {
        let mut r = Resubscribing::default();
        assert!(!r.lost(0));
        assert!(!r.connected(0));
        assert!(r.lost(1));
        assert!(!r.connected(0), "everything was unsubscribed meanwhile");
    }

    #[tokio::test(start_paused = true)]
    async fn a_shared_connection_waits_for_the_gate_at_most_its_bound() {
        let gate = std::sync::Arc::new(ResubGate::default());
        assert_eq!(gate.wait_open(RESUB_WAIT_MAX).await, Duration::ZERO);
        gate.set(true);
        assert!(gate.is_closed());
        let g = gate.clone();
        let opener = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(400)).await;
            g.set(false);
        });
        assert_eq!(
            gate.wait_open(RESUB_WAIT_MAX).await,
            Duration::from_millis(400)
        );
        opener.await.unwrap();
        // Closed a whole gap before the wait: waited for all the same.
        gate.set(true);
        tokio::time::sleep(Duration::from_secs(10)).await;
        let g = gate.clone();
        let opener = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            g.set(false);
        });
        assert_eq!(
            gate.wait_open(RESUB_WAIT_MAX).await,
            Duration::from_millis(300)
        );
        opener.await.unwrap();
        // Stuck closed: taken as open after RESUB_WAIT_MAX.
        gate.set(true);
        assert_eq!(gate.wait_open(RESUB_WAIT_MAX).await, RESUB_WAIT_MAX);
    }
}
