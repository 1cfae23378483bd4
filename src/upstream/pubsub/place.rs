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
        Kind::Shard => Place::Slot(crate::command::keys::slot(name)),
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

/// Whether `channel` matches the glob `pattern` as Redis matches
/// PSUBSCRIBE patterns (`*`, `?`, `[...]` with `^` and ranges, `\` escapes).
pub fn glob(pattern: &[u8], channel: &[u8]) -> bool {
    let (mut p, mut s) = (0, 0);
    // Where to go back to after a `*` that matched too little.
    let mut star: Option<(usize, usize)> = None;
    loop {
        if p < pattern.len() {
            match pattern[p] {
                b'*' => {
                    star = Some((p, s));
                    p += 1;
                    continue;
                }
                b'?' if s < channel.len() => {
                    p += 1;
                    s += 1;
                    continue;
                }
                b'[' if s < channel.len() => {
                    if let Some((hit, next)) = class(pattern, p + 1, channel[s]) {
                        if hit {
                            p = next;
                            s += 1;
                            continue;
                        }
                    }
                }
                b'\\'
                    if p + 1 < pattern.len()
                        && s < channel.len()
                        && pattern[p + 1] == channel[s] =>
                {
                    p += 2;
                    s += 1;
                    continue;
                }
                c if c != b'?'
                    && c != b'['
                    && c != b'\\'
                    && s < channel.len()
                    && c == channel[s] =>
                {
                    p += 1;
                    s += 1;
                    continue;
                }
                _ => {}
            }
        } else if s == channel.len() {
            return true;
        }
        // Mismatch: let the last `*` take one more byte.
        match star {
            Some((sp, ss)) if ss < channel.len() => {
                star = Some((sp, ss + 1));
                p = sp + 1;
                s = ss + 1;
            }
            _ => return false,
        }
    }
}

/// A `[...]` class from `at` (after the `[`): whether `c` is in it, and
/// where the pattern goes on. `None`: no closing `]` (Redis then takes the
/// class to the end of the pattern).
fn class(pattern: &[u8], mut at: usize, c: u8) -> Option<(bool, usize)> {
    let not = pattern.get(at) == Some(&b'^');
    if not {
        at += 1;
    }
    let mut hit = false;
    while at < pattern.len() && pattern[at] != b']' {
        if pattern[at] == b'\\' && at + 1 < pattern.len() {
            hit |= pattern[at + 1] == c;
            at += 2;
        } else if at + 2 < pattern.len() && pattern[at + 1] == b'-' && pattern[at + 2] != b']' {
            let (a, b) = (
                pattern[at].min(pattern[at + 2]),
                pattern[at].max(pattern[at + 2]),
            );
            hit |= (a..=b).contains(&c);
            at += 3;
        } else {
            hit |= pattern[at] == c;
            at += 1;
        }
    }
    Some((hit != not, (at + 1).min(pattern.len())))
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
            Place::Slot(crate::command::keys::slot(b"user:1"))
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

    #[test]
    fn glob_matches_as_redis_does() {
        for (p, c, want) in [
            ("*", "news", true),
            ("n*s", "news", true),
            ("n*s", "newz", false),
            ("n?ws", "news", true),
            ("n?ws", "nws", false),
            ("h[ae]llo", "hallo", true),
            ("h[^e]llo", "hello", false),
            ("h[^e]llo", "hallo", true),
            ("h[a-c]llo", "hbllo", true),
            ("h[a-c]llo", "hdllo", false),
            ("a\\*b", "a*b", true),
            ("a\\*b", "axb", false),
            ("a\\*b", "a\\xb", false),
            ("__key*__:*", "__keyspace@0__:k", true),
            ("*a*b*", "xxaxxbxx", true),
            ("*a*b*", "xxbxxaxx", false),
            ("", "", true),
            ("", "a", false),
            ("[", "a", false),
            ("c*", "c", true),
            ("c*", "xc", false),
            ("*", "", true),
            ("a?c", "ac", false),
            ("*news*", "the.news.today", true),
            ("a*b*c", "aXbYc", true),
            ("a*b*c", "aXbY", false),
            ("ch", "ch2", false),
        ] {
            assert_eq!(glob(p.as_bytes(), c.as_bytes()), want, "{p} ~ {c}");
        }
    }
}
