//! `MOVING <seq> <ttl> <host:port>`: the endpoint moves. Until `ttl` runs
//! out, new connections dial the named endpoint (the configured name may
//! still lead to the old node); after it, the configured name again (it
//! leads to the new place by then). TLS is verified against the configured
//! cache name either way: the push names where to connect, never whom to
//! trust. Pure: the driver is the connector ([`crate::upstream::tls`]) and
//! the push follower ([`crate::upstream::conn`]'s `pushes`).

use tokio::time::Instant;

/// Where the endpoint moved, and until when that holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Moved {
    pub host: String,
    pub port: u16,
    pub until: Instant,
}

/// `host:port` or `[v6]:port` from a `MOVING` push; `None` for anything
/// else (no port, port 0, an empty or odd host).
pub fn parse_endpoint(s: &str) -> Option<(String, u16)> {
    let (host, port) = s.rsplit_once(':')?;
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    let host = match host.strip_prefix('[') {
        Some(v6) => v6.strip_suffix(']')?,
        None if host.contains(':') => return None,
        None => host,
    };
    let ok = !host.is_empty()
        && host.len() <= 253
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':'));
    ok.then(|| (host.to_string(), port))
}

/// Where a new connection goes: the moved endpoint while its ttl lasts,
/// else the configured one (`None`).
pub fn dial_target(moved: Option<&Moved>, now: Instant) -> Option<(&str, u16)> {
    moved
        .filter(|m| now < m.until)
        .map(|m| (m.host.as_str(), m.port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn endpoints_are_read_strictly() {
        assert_eq!(
            parse_endpoint("node-2.cache.example:10000"),
            Some(("node-2.cache.example".into(), 10000))
        );
        assert_eq!(
            parse_endpoint("10.0.0.7:6380"),
            Some(("10.0.0.7".into(), 6380))
        );
        assert_eq!(parse_endpoint("[::1]:6380"), Some(("::1".into(), 6380)));
        for bad in [
            "",
            "node",
            "node:",
            ":6380",
            "node:0",
            "node:99999",
            "::1:6380",
            "no de:6380",
            "node/x:6380",
            "[::1:6380",
        ] {
            assert_eq!(parse_endpoint(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_moved_endpoint_is_dialled_until_its_ttl_then_the_configured_one() {
        let now = Instant::now();
        let m = Moved {
            host: "node-2".into(),
            port: 10000,
            until: now + Duration::from_secs(15),
        };
        assert_eq!(dial_target(Some(&m), now), Some(("node-2", 10000)));
        assert_eq!(
            dial_target(Some(&m), now + Duration::from_secs(14)),
            Some(("node-2", 10000))
        );
        assert_eq!(dial_target(Some(&m), now + Duration::from_secs(15)), None);
        assert_eq!(dial_target(None, now), None);
    }
}
