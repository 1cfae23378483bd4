//! The pure half of `redis-entra-proxy check`: what each step's outcome means and
//! what to do about it. No I/O: the driver (`check`) feeds in what it saw.

use crate::acceptance::Refusal;
use std::fmt::Write as _;

/// How one step ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ok(String),
    /// Failed: what happened, and what to do about it.
    Fail {
        what: String,
        hint: String,
    },
    /// Not run (a step it needs failed) or not allowed; not a failure.
    Skip(String),
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub name: &'static str,
    pub outcome: Outcome,
}

impl Step {
    pub fn ok(name: &'static str, what: impl Into<String>) -> Step {
        Step {
            name,
            outcome: Outcome::Ok(what.into()),
        }
    }

    pub fn fail(name: &'static str, what: impl Into<String>, hint: impl Into<String>) -> Step {
        Step {
            name,
            outcome: Outcome::Fail {
                what: what.into(),
                hint: hint.into(),
            },
        }
    }

    pub fn skip(name: &'static str, why: impl Into<String>) -> Step {
        Step {
            name,
            outcome: Outcome::Skip(why.into()),
        }
    }

    pub fn failed(&self) -> bool {
        matches!(self.outcome, Outcome::Fail { .. })
    }
}

/// The report's text: a line per step (and a hint line under each failure), then
/// the verdict.
pub fn render(steps: &[Step]) -> String {
    let mut out = String::new();
    for s in steps {
        match &s.outcome {
            Outcome::Ok(what) => {
                let _ = writeln!(out, "ok    {:<8} {what}", s.name);
            }
            Outcome::Skip(why) => {
                let _ = writeln!(out, "skip  {:<8} {why}", s.name);
            }
            Outcome::Fail { what, hint } => {
                let _ = writeln!(out, "FAIL  {:<8} {what}", s.name);
                let _ = writeln!(out, "      {:<8} hint: {hint}", "");
            }
        }
    }
    let failed = steps.iter().filter(|s| s.failed()).count();
    if failed == 0 {
        out.push_str("all checks passed\n");
    } else {
        let _ = writeln!(
            out,
            "{failed} check{} failed",
            if failed == 1 { "" } else { "s" }
        );
    }
    out
}

/// The audience a token for `scope` must carry: the scope without `/.default`.
pub fn expected_audience(scope: &str) -> String {
    scope
        .trim()
        .trim_end_matches("/.default")
        .trim_end_matches('/')
        .to_string()
}

pub use crate::auth::jwt::{is_redis_audience, REDIS_APP_ID};

/// Whether a token's `aud` (one or several) suits `scope`.
pub fn audience_matches(aud: &[String], scope: &str) -> bool {
    let want = expected_audience(scope);
    aud.iter().any(|a| {
        let a = a.trim_end_matches('/');
        a.eq_ignore_ascii_case(&want)
            || (want.eq_ignore_ascii_case("https://redis.azure.com") && a == REDIS_APP_ID)
    })
}

/// The hint for an AUTH the server refused, as `user`.
pub fn auth_hint(reason: &str, user: &str) -> String {
    match Refusal::of(reason) {
        Refusal::WrongPass => format!(
            "WRONGPASS: the identity `{user}` has no access policy on this cache (assign one: \
             Data Owner, Contributor or Reader, to this object id), or the token is for another \
             audience (auth.entra.scope) or another cache"
        ),
        Refusal::NoPerm => format!(
            "NOPERM: the access policy of `{user}` is too narrow for the proxy: it needs at least \
             HELLO, AUTH and PING"
        ),
        Refusal::Other => "the server refused AUTH; see its message".into(),
    }
}

/// The hint for a TLS handshake that failed with `error` (rustls's words).
pub fn tls_hint(error: &str) -> String {
    let e = error.to_ascii_lowercase();
    if e.contains("did not speak tls")
        || e.contains("invalidcontenttype")
        || e.contains("corrupt message")
    {
        "the port does not speak TLS (plaintext port?): Azure Cache for Redis uses 6380, Azure \
         Managed Redis 10000 (upstream.port)"
            .into()
    } else if e.contains("expired") {
        "a certificate in the chain has expired (or the clock is wrong): renew it, or check the \
         time on this machine"
            .into()
    } else if e.contains("notvalidyet") || e.contains("not valid yet") {
        "a certificate in the chain is not valid yet: check the time on this machine".into()
    } else if e.contains("unknownissuer") || e.contains("unknown issuer") {
        "the server's certificate is not signed by a CA this machine trusts: install the CA, or \
         set upstream.ca_file"
            .into()
    } else if e.contains("notvalidforname") || e.contains("not valid for name") {
        "the certificate does not carry the name the proxy checks: set upstream.server_name to \
         the cache's real host name (connecting through an IP or another name)"
            .into()
    } else {
        "the TLS handshake failed: check upstream.host, upstream.port and upstream.ca_file".into()
    }
}

/// The hint for a TCP connect that failed with `error`.
pub fn connect_hint(error: &str) -> String {
    let e = error.to_ascii_lowercase();
    if e.contains("refused") {
        "nothing listens there: check upstream.port (6380 for Azure Cache for Redis, 10000 for \
         Azure Managed Redis) and that the cache is running"
            .into()
    } else if e.contains("timed out") {
        "no answer: a firewall, a private endpoint without its DNS, or a wrong address".into()
    } else {
        "check upstream.host and upstream.port and the network path to the cache".into()
    }
}

/// The DNS names and IP addresses in an X.509 certificate's subjectAltName
/// (DER). Best effort: an empty list when it cannot be read.
pub fn certificate_names(der: &[u8]) -> Vec<String> {
    // subjectAltName's OID 2.5.29.17, then (optionally a BOOLEAN) an OCTET STRING
    // holding a SEQUENCE of GeneralName: [2] dNSName, [7] iPAddress.
    const SAN_OID: &[u8] = &[0x06, 0x03, 0x55, 0x1d, 0x11];
    let Some(at) = der.windows(SAN_OID.len()).position(|w| w == SAN_OID) else {
        return Vec::new();
    };
    let mut rest = &der[at + SAN_OID.len()..];
    if rest.first() == Some(&0x01) {
        let Some((_, after)) = tlv(rest) else {
            return Vec::new();
        };
        rest = after;
    }
    let Some((0x04, octets, _)) = tlv(rest).map(|(v, after)| (rest[0], v, after)) else {
        return Vec::new();
    };
    let Some((seq, _)) = tlv(octets) else {
        return Vec::new();
    };
    let mut names = Vec::new();
    let mut items = seq;
    while !items.is_empty() {
        let tag = items[0];
        let Some((value, after)) = tlv(items) else {
            break;
        };
        match tag {
            0x82 => names.push(String::from_utf8_lossy(value).into_owned()),
            0x87 if value.len() == 4 => names
                .push(std::net::Ipv4Addr::new(value[0], value[1], value[2], value[3]).to_string()),
            0x87 if value.len() == 16 => {
                let mut b = [0u8; 16];
                b.copy_from_slice(value);
                names.push(std::net::Ipv6Addr::from(b).to_string());
            }
            _ => {}
        }
        items = after;
    }
    names
}

/// One DER TLV at the start of `b`: (value, what follows).
fn tlv(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let first_len = *b.get(1)?;
    let (len, head) = if first_len < 0x80 {
        (first_len as usize, 2)
    } else {
        let n = (first_len & 0x7f) as usize;
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | *b.get(2 + i)? as usize;
        }
        (len, 2 + n)
    };
    let end = head.checked_add(len)?;
    if end > b.len() {
        return None;
    }
    Some((&b[head..end], &b[end..]))
}

/// Shards of a `CLUSTER SHARDS`-less cluster from `CLUSTER SLOTS`'s ranges: the
/// distinct primaries (host:port).
pub fn shard_summary(primaries: &[String]) -> String {
    let mut p: Vec<&String> = primaries.iter().collect();
    p.sort();
    p.dedup();
    format!(
        "clustered: {} shard{} ({})",
        p.len(),
        if p.len() == 1 { "" } else { "s" },
        p.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audiences() {
        let scope = "https://redis.azure.com/.default";
        assert_eq!(expected_audience(scope), "https://redis.azure.com");
        assert!(audience_matches(&["https://redis.azure.com".into()], scope));
        assert!(audience_matches(
            &["https://redis.azure.com/".into()],
            scope
        ));
        assert!(audience_matches(&[REDIS_APP_ID.into()], scope));
        assert!(!audience_matches(
            &["https://management.azure.com".into()],
            scope
        ));
        assert!(!audience_matches(&[], scope));
        assert!(is_redis_audience("https://redis.azure.com/"));
        assert!(is_redis_audience(REDIS_APP_ID));
        assert!(!is_redis_audience("https://management.azure.com"));
    }

    #[test]
    fn hints_name_the_cause() {
        assert!(
            auth_hint("WRONGPASS invalid username-password pair", "oid-1")
                .contains("no access policy")
        );
        assert!(auth_hint(
            "NOPERM User oid-1 has no permissions to run the 'hello' command",
            "oid-1"
        )
        .contains("too narrow"));
        assert!(
            tls_hint("received corrupt message of type InvalidContentType")
                .contains("plaintext port?")
        );
        assert!(tls_hint("invalid peer certificate: Expired").contains("expired"));
        assert!(tls_hint("invalid peer certificate: UnknownIssuer").contains("upstream.ca_file"));
        assert!(
            tls_hint("invalid peer certificate: NotValidForName").contains("upstream.server_name")
        );
        assert!(connect_hint("Connection refused (os error 111)").contains("upstream.port"));
    }

    #[test]
    fn report_lines_and_verdict() {
        let steps = vec![
            Step::ok("token", "aud x"),
            Step::fail("auth", "WRONGPASS", "no access policy"),
            Step::skip("hello", "needs auth"),
        ];
        let text = render(&steps);
        assert!(text.contains("ok    token    aud x\n"), "{text}");
        assert!(text.contains("FAIL  auth     WRONGPASS\n"), "{text}");
        assert!(text.contains("hint: no access policy"), "{text}");
        assert!(text.ends_with("1 check failed\n"), "{text}");
        assert!(render(&steps[..1]).ends_with("all checks passed\n"));
    }

    #[test]
    fn reads_certificate_names() {
        // A SAN extension: OID, OCTET STRING { SEQUENCE { [2] "localhost", [7] 127.0.0.1 } }.
        let mut der = vec![
            0x30, 0x00, 0x06, 0x03, 0x55, 0x1d, 0x11, 0x04, 0x13, 0x30, 0x11,
        ];
        der.extend_from_slice(&[0x82, 0x09]);
        der.extend_from_slice(b"localhost");
        der.extend_from_slice(&[0x87, 0x04, 127, 0, 0, 1]);
        assert_eq!(certificate_names(&der), vec!["localhost", "127.0.0.1"]);
        assert!(certificate_names(&[0x30, 0x01]).is_empty());
        // Truncated: no panic.
        assert!(certificate_names(&der[..der.len() - 3]).len() <= 1);
    }
}
