//! The hold queue: commands not yet sent wait, bounded in count, bytes and
//! time (`upstream.hold`), while a shared connection is re-established, then
//! go out in order on the new one.

use crate::upstream::UpstreamError;
use std::collections::VecDeque;
use std::time::Duration;
use tokio::time::Instant;

/// Commands one shared connection slot holds at most while it reconnects
/// (each costs about 100 bytes besides its own: see bench/FAILOVER.md).
pub const HOLD_MAX_COMMANDS: usize = 50_000;
/// Bytes of commands one shared connection slot holds at most while it
/// reconnects. With the default `upstream.pool_size` (2 per protocol, RESP2
/// and RESP3, 4 slots) a proxy holds at most 4 x 32 MiB of commands.
pub const HOLD_MAX_BYTES: usize = 32 << 20;
/// While commands are held, dial again at least this often: the gap of an
/// Azure failover ends at a moment nobody announces, and every wasted
/// fraction of a second is a stall for every held client.
pub const HOLD_RETRY: Duration = Duration::from_millis(250);

/// Why a command left the hold queue without being sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// Held for `upstream.hold` and the connection is still not back.
    Expired,
    /// The queue was at its bound (count or bytes) when it arrived.
    Full,
}

impl Dropped {
    pub fn label(self) -> &'static str {
        match self {
            Dropped::Expired => "expired",
            Dropped::Full => "full",
        }
    }
}

/// Commands waiting for a connection, oldest first, each with when it began
/// waiting. Bounded by count and bytes; nothing here waits or times out by
/// itself: the driver calls [`HoldQueue::expire`] with the time.
#[derive(Debug)]
pub struct HoldQueue<T> {
    items: VecDeque<(Instant, usize, T)>,
    bytes: usize,
    max_count: usize,
    max_bytes: usize,
    hold: Duration,
}

impl<T> HoldQueue<T> {
    pub fn new(hold: Duration, max_count: usize, max_bytes: usize) -> HoldQueue<T> {
        HoldQueue {
            items: VecDeque::new(),
            bytes: 0,
            max_count,
            max_bytes,
            hold,
        }
    }

    /// Hold `item` of `size` bytes from `now`; `Err` gives it back when the
    /// queue is at its bound. One command larger than the byte bound is
    /// still taken when the queue is empty, so that no command is refused
    /// for its size alone.
    pub fn push(&mut self, now: Instant, size: usize, item: T) -> Result<(), T> {
        let over_bytes = self.bytes + size > self.max_bytes && !self.items.is_empty();
        if self.items.len() >= self.max_count || over_bytes {
            return Err(item);
        }
        self.bytes += size;
        self.items.push_back((now, size, item));
        Ok(())
    }

    /// When the oldest held command runs out of time.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.items.front().map(|(at, _, _)| *at + self.hold)
    }

    /// Take the commands held `upstream.hold` or longer at `now`, oldest first.
    pub fn expire(&mut self, now: Instant) -> Vec<T> {
        let mut out = Vec::new();
        while let Some((at, _, _)) = self.items.front() {
            if *at + self.hold > now {
                break;
            }
            let (_, size, item) = self.items.pop_front().expect("checked above");
            self.bytes -= size;
            out.push(item);
        }
        out
    }

    /// Everything held, oldest first, with how long each waited by `now`.
    pub fn drain(&mut self, now: Instant) -> Vec<(Duration, T)> {
        self.bytes = 0;
        self.items
            .drain(..)
            .map(|(at, _, item)| (now.saturating_duration_since(at), item))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// Whether commands should keep waiting after a dial failed with `e`: yes for
/// what a failover, restart or network blip looks like (refused, reset, timed
/// out, TLS cut short); no when waiting cannot help (the credential is
/// refused or missing, the server speaks nonsense, shutdown): those fail at
/// once, as before the hold existed.
pub fn hold_through(e: &UpstreamError) -> bool {
    matches!(
        e,
        UpstreamError::Connect { .. }
            | UpstreamError::Tls { .. }
            | UpstreamError::Timeout { .. }
            | UpstreamError::Lost { .. }
    )
}

/// The error a command gets when it was held as long as allowed.
pub fn expired_error(addr: &str, hold: Duration, last: Option<&UpstreamError>) -> UpstreamError {
    UpstreamError::Connect {
        addr: addr.to_string(),
        reason: format!(
            "no connection after holding the command for {:.1}s (upstream.hold){}; it was not sent",
            hold.as_secs_f64(),
            last.map(|e| format!("; last error: {e}"))
                .unwrap_or_default()
        ),
    }
}

/// The error a command gets when the hold queue is full.
pub fn full_error(addr: &str, last: Option<&UpstreamError>) -> UpstreamError {
    UpstreamError::Connect {
        addr: addr.to_string(),
        reason: format!(
            "reconnecting, and {HOLD_MAX_COMMANDS} commands or {} MiB already wait for it; it was not sent{}",
            HOLD_MAX_BYTES >> 20,
            last.map(|e| format!("; last error: {e}")).unwrap_or_default()
        ),
    }
}

#[cfg(test)]
#[path = "hold_tests.rs"]
mod tests;
