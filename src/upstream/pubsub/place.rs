//! Where the hub holds a subscription upstream, and which connection's
//! messages it delivers. Pure: decided from the subscription's kind and name
//! and whether the upstream is a cluster.
//!
//! On a single-endpoint cache everything is on the one connection. On a
//! cluster:
//!
//! - Channels and patterns live on the *home* connection (the configured
//!   host): Redis Cluster broadcasts every `PUBLISH` to all nodes, so one node
//!   sees every message.
//! - Keyspace notifications (`__keyspace@<db>__:<key>`, `__keyevent@<db>__:<event>`)
//!   are local to the shard that holds the key: channels of that form, and
//!   patterns that can match them, are subscribed on every primary as well.
//! - A connection delivers only the messages that are its to deliver, so none
//!   comes twice: home the published ones, the primaries the notifications.
//! - Shard channels live on the owner of their slot (and move with it).

use super::Kind;

/// Where one subscription is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// The home connection only.
    Home,
    /// Every primary (keyspace-notification channels).
    Primaries,
    /// Home for published messages and every primary for notifications (a
    /// pattern that can match both).
    HomeAndPrimaries,
    /// The primary that owns this slot (a shard channel).
    Slot(u16),
}

const NOTIFICATION_PREFIXES: [&[u8]; 2] = [b"__keyspace@", b"__keyevent@"];

/// A keyspace or keyevent notification channel.
pub fn is_notification(channel: &[u8]) -> bool {
    NOTIFICATION_PREFIXES.iter().any(|p| channel.starts_with(p))
}

/// The literal start of a glob pattern: what comes before its first special
/// character (`*`, `?`, `[`, `\`).
fn literal_prefix(pattern: &[u8]) -> &[u8] {
    let end = memchr::memchr3(b'*', b'?', b'[', pattern)
        .into_iter()
        .chain(memchr::memchr(b'\\', pattern))
        .min()
        .unwrap_or(pattern.len());
    &pattern[..end]
}

/// Where a subscription of `kind` to `name` is held (`cluster`: the upstream
/// is a Redis Cluster).
pub fn place(kind: Kind, name: &[u8], cluster: bool) -> Place {
    if !cluster {
        return Place::Home;
    }
    match kind {
        Kind::Shard => Place::Slot(crate::keys::slot(name)),
        Kind::Channel if is_notification(name) => Place::Primaries,
        Kind::Channel => Place::Home,
        Kind::Pattern => {
            let lit = literal_prefix(name);
            if lit.len() == name.len() {
                // No special character: it matches only itself.
                return if is_notification(name) {
                    Place::Primaries
                } else {
                    Place::Home
                };
            }
            if is_notification(lit) {
                // `__keyspace@0__:*`: notifications only.
                Place::Primaries
            } else if NOTIFICATION_PREFIXES.iter().any(|p| p.starts_with(lit)) {
                // `*`, `__key*`: notifications and published messages.
                Place::HomeAndPrimaries
            } else {
                Place::Home
            }
        }
    }
}

/// Whether a `message`/`pmessage` of `channel` that came on the home
/// connection (`home`) or on a primary's is delivered to local subscribers.
/// Shard messages come only from the slot's owner and are always delivered.
pub fn delivers(kind: Kind, channel: &[u8], home: bool, cluster: bool) -> bool {
    if !cluster || kind == Kind::Shard {
        return true;
    }
    is_notification(channel) != home
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_single_endpoint_cache_holds_everything_at_home() {
        for (kind, name) in [
            (Kind::Channel, "__keyspace@0__:k"),
            (Kind::Pattern, "*"),
            (Kind::Shard, "s"),
        ] {
            assert_eq!(place(kind, name.as_bytes(), false), Place::Home);
            assert!(delivers(kind, b"__keyevent@0__:set", true, false));
        }
    }

    #[test]
    fn cluster_places_follow_where_redis_sends_the_messages() {
        let p = |k, n: &str| place(k, n.as_bytes(), true);
        assert_eq!(p(Kind::Channel, "news"), Place::Home);
        assert_eq!(p(Kind::Channel, "__keyspace@0__:user:1"), Place::Primaries);
        assert_eq!(p(Kind::Channel, "__keyevent@0__:expired"), Place::Primaries);
        assert_eq!(p(Kind::Pattern, "news.*"), Place::Home);
        assert_eq!(p(Kind::Pattern, "__keyspace@0__:*"), Place::Primaries);
        assert_eq!(p(Kind::Pattern, "__keyevent@*"), Place::Primaries);
        assert_eq!(p(Kind::Pattern, "__key*@0__:*"), Place::HomeAndPrimaries);
        assert_eq!(p(Kind::Pattern, "*"), Place::HomeAndPrimaries);
        assert_eq!(p(Kind::Pattern, "_?key*"), Place::HomeAndPrimaries);
        assert_eq!(p(Kind::Pattern, "[_n]*"), Place::HomeAndPrimaries);
        assert_eq!(p(Kind::Pattern, "\\*"), Place::HomeAndPrimaries);
        assert_eq!(p(Kind::Pattern, "__keyspace@0__:k"), Place::Primaries);
        assert_eq!(p(Kind::Pattern, "plain"), Place::Home);
        assert_eq!(
            p(Kind::Shard, "{user:1}.feed"),
            Place::Slot(crate::keys::slot(b"user:1"))
        );
    }

    #[test]
    fn each_message_is_delivered_by_one_connection_only() {
        for kind in [Kind::Channel, Kind::Pattern] {
            assert!(delivers(kind, b"news", true, true));
            assert!(!delivers(kind, b"news", false, true));
            assert!(delivers(kind, b"__keyspace@0__:k", false, true));
            assert!(!delivers(kind, b"__keyspace@0__:k", true, true));
        }
        assert!(delivers(Kind::Shard, b"s", false, true));
    }
}
