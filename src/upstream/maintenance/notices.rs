//! Azure Cache for Redis maintenance notices (`AzureRedisEvents`) and what
//! the proxy does about each. Pure: a message and the time in, an action out.
//!
//! Azure publishes, per node, `NodeMaintenanceScheduled` (10-15 min ahead),
//! `NodeMaintenanceStarting` (about 20 s ahead), `NodeMaintenanceStart`
//! (under 5 s ahead), then closes every connection through the endpoint and
//! reaches the new primary about 9-10 s later;
//! `NodeMaintenanceFailoverComplete`, `NodeMaintenanceEnded` and
//! `NodeMaintenanceScaleComplete` follow. Format:
//! `NotificationType|<type>|StartTimeInUTC|<ISO8601>|IsReplica|<bool>|IPAddress|<ip>|SSLPort|<p>|NonSSLPort|<p>`.

use std::time::{Duration, SystemTime};

/// The channel Azure Cache for Redis publishes its notices on.
pub const CHANNEL: &str = "AzureRedisEvents";
/// Connections stop taking new commands this long before the announced
/// start: what is in flight then has its replies by the time the server
/// closes the connection, and the commands after it wait (held) instead of
/// being lost in flight.
pub const DRAIN_LEAD: Duration = Duration::from_secs(1);
/// If the connections are still open this long after the announced start,
/// they take commands again (the close did not come, or came elsewhere).
pub const DRAIN_AFTER: Duration = Duration::from_secs(3);
/// A start further ahead than this is not acted on (a wrong clock or a
/// misread notice must not stop traffic); `Starting` is logged instead.
pub const MAX_AHEAD: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Scheduled,
    Starting,
    Start,
    FailoverComplete,
    Ended,
    ScaleComplete,
    Other(String),
}

impl Kind {
    fn parse(s: &str) -> Kind {
        match s {
            "NodeMaintenanceScheduled" => Kind::Scheduled,
            "NodeMaintenanceStarting" => Kind::Starting,
            "NodeMaintenanceStart" => Kind::Start,
            "NodeMaintenanceFailoverComplete" => Kind::FailoverComplete,
            "NodeMaintenanceEnded" => Kind::Ended,
            "NodeMaintenanceScaleComplete" => Kind::ScaleComplete,
            other => Kind::Other(other.chars().take(64).collect()),
        }
    }

    /// The notice's name, for logs and metrics (bounded set of labels).
    pub fn label(&self) -> &'static str {
        match self {
            Kind::Scheduled => "NodeMaintenanceScheduled",
            Kind::Starting => "NodeMaintenanceStarting",
            Kind::Start => "NodeMaintenanceStart",
            Kind::FailoverComplete => "NodeMaintenanceFailoverComplete",
            Kind::Ended => "NodeMaintenanceEnded",
            Kind::ScaleComplete => "NodeMaintenanceScaleComplete",
            Kind::Other(_) => "other",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub kind: Kind,
    /// `StartTimeInUTC`, when it could be read.
    pub start: Option<SystemTime>,
    /// The notice is about a replica: connections to the primary stay.
    pub is_replica: bool,
    pub ip: Option<String>,
    pub ssl_port: Option<u16>,
}

/// Read one `AzureRedisEvents` message; `None` when it is not one.
pub fn parse(msg: &[u8]) -> Option<Notice> {
    let text = std::str::from_utf8(msg).ok()?;
    let fields: Vec<&str> = text.split('|').collect();
    let get = |key: &str| {
        fields
            .chunks(2)
            .find(|p| p.len() == 2 && p[0].eq_ignore_ascii_case(key))
            .map(|p| p[1].trim())
    };
    let kind = Kind::parse(get("NotificationType")?);
    Some(Notice {
        kind,
        start: get("StartTimeInUTC").and_then(parse_utc),
        is_replica: get("IsReplica").is_some_and(|v| v.eq_ignore_ascii_case("true")),
        ip: get("IPAddress").map(|s| s.chars().take(64).collect()),
        ssl_port: get("SSLPort").and_then(|p| p.parse().ok()),
    })
}

/// `2026-12-07T05:26:11` (optionally with fractions and `Z`), in UTC.
fn parse_utc(s: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(s.trim_end_matches('Z')).ok()
}

/// What to do about a notice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Only log it.
    Note,
    /// Connections open now stop taking new commands from `from` (and let
    /// the replies in flight come in) until they close or `until` passes;
    /// meanwhile commands wait, then go out on the next connection.
    Drain { from: SystemTime, until: SystemTime },
    /// Any drain ends now.
    Resume,
    /// Replace connections opened before now once their replies are in
    /// (make sure none still stands on the old primary).
    Refresh,
}

impl Action {
    pub fn label(&self) -> &'static str {
        match self {
            Action::Note => "none",
            Action::Drain { .. } => "drain",
            Action::Resume => "resume",
            Action::Refresh => "refresh",
        }
    }
}

/// What the proxy does about `n` at `now`.
///
/// - A replica's maintenance leaves the primary's connections alone: noted.
/// - `Scheduled`, `Starting`: noted. Dialling spare connections now would
///   not help: the endpoint closes every connection at the start, spares
///   included, and the held commands go out on the first connection made
///   after the gap.
/// - `Start`: drain from [`DRAIN_LEAD`] before the announced start (at once
///   if that has passed or the time is unreadable) until [`DRAIN_AFTER`]
///   after it (Azure announces under 5 s ahead: without a time, 5 s).
/// - `FailoverComplete`, `ScaleComplete`: refresh.
/// - `Ended`: resume (a drain whose close never came ends).
pub fn decide(n: &Notice, now: SystemTime) -> Action {
    if n.is_replica {
        return Action::Note;
    }
    match n.kind {
        Kind::Start => {
            let Some(start) = n.start else {
                return Action::Drain {
                    from: now,
                    until: now + Duration::from_secs(5) + DRAIN_AFTER,
                };
            };
            if start.duration_since(now).is_ok_and(|d| d > MAX_AHEAD) {
                return Action::Note;
            }
            let from = start
                .checked_sub(DRAIN_LEAD)
                .filter(|f| *f > now)
                .unwrap_or(now);
            let until = start.max(now) + DRAIN_AFTER;
            Action::Drain { from, until }
        }
        Kind::FailoverComplete | Kind::ScaleComplete => Action::Refresh,
        Kind::Ended => Action::Resume,
        Kind::Scheduled | Kind::Starting | Kind::Other(_) => Action::Note,
    }
}

#[cfg(test)]
#[path = "notices_tests.rs"]
mod tests;
