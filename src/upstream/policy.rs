//! What the proxy sends on its own behalf, and what an Azure data access
//! policy must allow for it (Data Owner `+@all`; Data Contributor `+@all
//! -@dangerous +cluster|info|nodes|slots`; Data Reader `+@read +@connection
//! +cluster|info|nodes|slots`; custom policies narrower still). Pure: the
//! callers ask the server; this module decides what a refusal means and
//! words the one log line that says so.
//!
//! | command | rule | in |
//! |---|---|---|
//! | `HELLO`, `AUTH`, `PING` (keepalive), `RESET` | `@connection` | all three |
//! | `COMMAND` (key positions, blocking flags) | `@connection` | all three |
//! | `CLUSTER SLOTS` (detection, slot map) | `+cluster\|slots` | all three |
//! | `CLUSTER SHARDS` (slot map, preferred) | `@slow` | Owner, Contributor |
//! | `ASKING` | `@connection` | all three |
//! | `CLIENT UNBLOCK` (for a client that asks) | `@dangerous` | Owner, Reader |
//!
//! `INFO` is `@dangerous` in Redis 7 (refused under Contributor and Reader):
//! the proxy never needs it.

use std::collections::HashSet;
use std::sync::Mutex;

/// The ACL rule a command of the proxy's own needs, and the built-in
/// policies that include it.
pub fn needs(command: &str) -> (&'static str, &'static str) {
    match command.to_ascii_uppercase().as_str() {
        "COMMAND" => ("+command", "Data Owner, Data Contributor and Data Reader"),
        "CLUSTER SLOTS" => (
            "+cluster|slots",
            "Data Owner, Data Contributor and Data Reader",
        ),
        "CLUSTER SHARDS" => ("+cluster|shards", "Data Owner and Data Contributor"),
        "INFO" => ("+info", "Data Owner only"),
        "CLIENT UNBLOCK" => ("+client|unblock", "Data Owner and Data Reader"),
        _ => (
            "+@connection",
            "Data Owner, Data Contributor and Data Reader",
        ),
    }
}

/// Whether a reply is the server's refusal on ACL grounds.
pub fn is_noperm(reply: &[u8]) -> bool {
    reply.starts_with(b"-NOPERM")
}

/// What the cache is, from what every policy lets the proxy see: HELLO's
/// `mode` field (`Some(true)`: "cluster") and the reply to `CLUSTER SLOTS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    Cluster,
    Standalone,
    /// HELLO says cluster but `CLUSTER SLOTS` is refused: the proxy cannot
    /// read the slot map, so it cannot route by slot.
    ClusterUnreadable,
}

/// Decide cluster or not. HELLO's `mode` decides when the server gave one
/// (Redis 6+ does); a `CLUSTER SLOTS` array with slots says cluster too
/// (for a front that leaves `mode` out); a refusal or "cluster support
/// disabled" says nothing more.
pub fn detect(hello_mode: Option<bool>, slots_reply: &[u8]) -> Detected {
    let slots_refused = is_noperm(slots_reply);
    let slots_listed = slots_reply.first() == Some(&b'*') && !slots_reply.starts_with(b"*0\r\n");
    match hello_mode {
        Some(true) if slots_refused => Detected::ClusterUnreadable,
        Some(true) => Detected::Cluster,
        _ if slots_listed => Detected::Cluster,
        _ => Detected::Standalone,
    }
}

/// The log line for a refused command of the proxy's own: what was refused,
/// the rule it needs, the built-in policies with it, and what the proxy does
/// instead.
pub fn refusal_line(command: &str, reply: &[u8], instead: &str) -> String {
    let (rule, policies) = needs(command);
    let text = String::from_utf8_lossy(reply.strip_prefix(b"-").unwrap_or(reply));
    format!(
        "the cache's access policy refused {command} ({}); it needs {rule} (in {policies}); {instead}",
        text.trim_end()
    )
}

/// The server's reply to a CLIENT UNBLOCK the proxy sent for a client,
/// passed on unchanged; a refusal is logged once per process.
pub fn note_client_unblock(reply: bytes::Bytes) -> bytes::Bytes {
    static LOGGED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if is_noperm(&reply) && !LOGGED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::warn!(
            "{}",
            refusal_line(
                "CLIENT UNBLOCK",
                &reply,
                "the client that asked gets this refusal; the blocked client waits for its own timeout"
            )
        );
    }
    reply
}

/// Refusals already logged: each command once per process, however often
/// the proxy asks again (a slot map is re-read every 30 s).
#[derive(Default)]
pub struct Refusals {
    seen: Mutex<HashSet<&'static str>>,
}

impl Refusals {
    /// True the first time `command` is noted.
    pub fn first(&self, command: &'static str) -> bool {
        self.seen.lock().expect("not poisoned").insert(command)
    }

    /// Whether `command` was refused before (ask something else instead).
    pub fn refused(&self, command: &'static str) -> bool {
        self.seen.lock().expect("not poisoned").contains(command)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SLOTS: &[u8] = b"*1\r\n*3\r\n:0\r\n:16383\r\n*2\r\n$9\r\n127.0.0.1\r\n:7000\r\n";
    const NOPERM: &[u8] =
        b"-NOPERM this user has no permissions to run the 'cluster|slots' command\r\n";
    const DISABLED: &[u8] = b"-ERR This instance has cluster support disabled\r\n";

    #[test]
    fn detection_needs_no_info() {
        assert_eq!(detect(Some(true), SLOTS), Detected::Cluster);
        assert_eq!(detect(Some(true), NOPERM), Detected::ClusterUnreadable);
        assert_eq!(detect(Some(false), DISABLED), Detected::Standalone);
        assert_eq!(detect(Some(false), NOPERM), Detected::Standalone);
        // No mode field (a front that leaves it out): the slot map decides.
        assert_eq!(detect(None, SLOTS), Detected::Cluster);
        assert_eq!(detect(None, b"*0\r\n"), Detected::Standalone);
        assert_eq!(detect(None, DISABLED), Detected::Standalone);
        assert_eq!(detect(None, b""), Detected::Standalone);
        // HELLO said standalone but the server lists slots: believe the map.
        assert_eq!(detect(Some(false), SLOTS), Detected::Cluster);
    }

    #[test]
    fn refusal_lines_name_the_command_and_the_policy() {
        let line = refusal_line(
            "CLUSTER SHARDS",
            b"-NOPERM this user has no permissions to run the 'cluster|shards' command\r\n",
            "reading CLUSTER SLOTS instead",
        );
        assert!(
            line.contains("refused CLUSTER SHARDS (NOPERM this user"),
            "{line}"
        );
        assert!(line.contains("+cluster|shards (in Data Owner and Data Contributor)"));
        assert!(line.ends_with("reading CLUSTER SLOTS instead"));
        assert_eq!(needs("command").0, "+command");
        assert_eq!(needs("PING").0, "+@connection");
        let r = Refusals::default();
        assert!(!r.refused("COMMAND"));
        assert!(r.first("COMMAND"));
        assert!(!r.first("COMMAND"));
        assert!(r.refused("COMMAND"));
    }
}
