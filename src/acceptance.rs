//! Whether the cache accepts the proxy's own credential. A token in hand is not
//! enough: a wrong identity, a wrong scope or a missing access policy gives a
//! token the server refuses (`WRONGPASS`), or one whose user may not even say
//! `HELLO` (`NOPERM`). Upstream connections record each AUTH outcome here (the
//! connect handshake and every re-AUTH); readiness (`admin`), the metrics and one
//! log line a minute read it.
//!
//! A leaf module: it knows credential generations and usernames, nothing else.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// At most one log line per this long about refused credentials.
pub const LOG_EVERY: Duration = Duration::from_secs(60);

/// Why the server refused the credential, from its error's first word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `WRONGPASS`: no such user, or not this password (token).
    WrongPass,
    /// `NOPERM`: the user exists but may not run `HELLO`/`AUTH`.
    NoPerm,
    /// Anything else.
    Other,
}

impl Refusal {
    pub fn of(reason: &str) -> Refusal {
        let first = reason.split_whitespace().next().unwrap_or("");
        match first.trim_start_matches('-') {
            "WRONGPASS" => Refusal::WrongPass,
            "NOPERM" => Refusal::NoPerm,
            _ => Refusal::Other,
        }
    }

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::WrongPass => "wrongpass",
            Refusal::NoPerm => "noperm",
            Refusal::Other => "other",
        }
    }

    /// What an operator should look at.
    pub fn hint(self) -> &'static str {
        match self {
            Refusal::WrongPass => {
                "the identity has no access policy on this cache (or the token's audience/scope is wrong): \
                 assign one (Data Owner, Contributor or Reader) to this object id"
            }
            Refusal::NoPerm => {
                "the identity's access policy is too narrow: it must allow HELLO, AUTH and PING"
            }
            Refusal::Other => "the server refused the proxy's AUTH",
        }
    }
}

#[derive(Debug, Default, Clone)]
struct State {
    /// The latest generation the server accepted, and as which user.
    accepted: Option<(u64, String)>,
    /// The latest refusal, if it came after the latest acceptance of its generation.
    refused: Option<Refused>,
    last_log: Option<Instant>,
    /// Refusals not logged since the last line.
    unlogged: u64,
}

#[derive(Debug, Clone)]
struct Refused {
    generation: u64,
    user: String,
    kind: Refusal,
    /// The server's error line (never contains the token).
    reason: String,
}

/// The record shared by every upstream connection.
#[derive(Debug, Default)]
pub struct Acceptance {
    state: Mutex<State>,
    refused_total: [AtomicU64; 3],
    accepted_total: AtomicU64,
}

impl Acceptance {
    pub fn new() -> Self {
        Self::default()
    }

    /// The server accepted generation `generation`'s credential for `user`.
    pub fn accepted(&self, generation: u64, user: &str) {
        self.accepted_total.fetch_add(1, Ordering::Relaxed);
        let mut s = self.lock();
        if s.accepted.as_ref().is_none_or(|(g, _)| *g <= generation) {
            s.accepted = Some((generation, user.to_string()));
        }
        if s.refused
            .as_ref()
            .is_some_and(|r| r.generation <= generation)
        {
            s.refused = None;
        }
    }

    /// The server refused generation `generation`'s credential for `user` with
    /// the error line `reason`. Logs at most one line per [`LOG_EVERY`].
    pub fn refused(&self, generation: u64, user: &str, reason: &str, now: Instant) {
        let kind = Refusal::of(reason);
        self.refused_total[kind as usize].fetch_add(1, Ordering::Relaxed);
        let mut s = self.lock();
        // Only a verdict on the credential moves readiness: `LOADING` or `BUSY`
        // while the cache restarts says nothing about it, and every pod would
        // leave its Service at once.
        if kind != Refusal::Other {
            s.refused = Some(Refused {
                generation,
                user: user.to_string(),
                kind,
                reason: one_line(reason),
            });
        }
        let due = s
            .last_log
            .is_none_or(|at| now.saturating_duration_since(at) >= LOG_EVERY);
        if due {
            let earlier = std::mem::take(&mut s.unlogged);
            s.last_log = Some(now);
            drop(s);
            tracing::warn!(
                user,
                reason = %one_line(reason),
                refused_since_last_line = earlier,
                "the cache refused the proxy's credential: {}",
                kind.hint()
            );
        } else {
            s.unlogged += 1;
        }
    }

    /// Whether the credential of `generation` for `user` is good for readiness:
    /// `Ok` with a line, or `Err` saying why not. Ready when the server accepted
    /// this generation, or accepted an earlier one of the same user and has not
    /// refused this one (a new token not yet presented: a cache outage at refresh
    /// time must not take every pod out of its Service).
    pub fn judge(&self, generation: u64, user: &str) -> Result<String, String> {
        judge(&self.lock(), generation, user)
    }

    /// Refusals so far with this reason.
    pub fn refused_total(&self, kind: Refusal) -> u64 {
        self.refused_total[kind as usize].load(Ordering::Relaxed)
    }

    /// Accepted AUTHs so far.
    pub fn accepted_total(&self) -> u64 {
        self.accepted_total.load(Ordering::Relaxed)
    }

    /// 1 while the latest outcome is an acceptance, 0 otherwise (none yet, or refused).
    pub fn accepted_now(&self) -> bool {
        let s = self.lock();
        s.accepted.is_some() && s.refused.is_none()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn judge(s: &State, generation: u64, user: &str) -> Result<String, String> {
    if let Some(r) = &s.refused {
        if r.generation == generation {
            return Err(format!(
                "the cache refused the credential of user `{}`: {} ({})",
                r.user,
                r.reason,
                r.kind.hint()
            ));
        }
    }
    match &s.accepted {
        Some((g, _)) if *g == generation => Ok("accepted by the cache".into()),
        Some((_, u)) if u == user => {
            Ok("not yet presented to the cache (the previous one was accepted)".into())
        }
        _ => Err(format!(
            "the cache has not accepted the credential of user `{user}` yet (no AUTH answered)"
        )),
    }
}

/// At most 200 characters, control characters as spaces.
fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(200)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_classified() {
        assert_eq!(
            Refusal::of("WRONGPASS invalid username-password pair or user is disabled."),
            Refusal::WrongPass
        );
        assert_eq!(
            Refusal::of("-NOPERM this user has no permissions"),
            Refusal::NoPerm
        );
        assert_eq!(Refusal::of("ERR something"), Refusal::Other);
        assert_eq!(Refusal::of(""), Refusal::Other);
    }

    #[test]
    fn readiness_needs_the_current_generation_accepted_or_not_refused() {
        let a = Acceptance::new();
        let t0 = Instant::now();
        assert!(a.judge(1, "oid-a").unwrap_err().contains("not accepted"));
        a.refused(1, "oid-a", "WRONGPASS invalid username-password pair", t0);
        let e = a.judge(1, "oid-a").unwrap_err();
        assert!(
            e.contains("WRONGPASS") && e.contains("access policy"),
            "{e}"
        );
        assert!(!a.accepted_now());
        a.accepted(1, "oid-a");
        assert!(a.judge(1, "oid-a").is_ok());
        assert!(a.accepted_now());
        // A new token of the same user, not presented yet: still ready.
        assert!(a.judge(2, "oid-a").unwrap().contains("not yet presented"));
        // ... but of another user (identity changed): not until accepted.
        assert!(a.judge(2, "oid-b").is_err());
        // Refused: not ready, even though generation 1 was accepted.
        a.refused(
            2,
            "oid-a",
            "NOPERM no permissions to run the 'hello' command",
            t0,
        );
        assert!(a.judge(2, "oid-a").unwrap_err().contains("too narrow"));
        a.accepted(2, "oid-a");
        assert!(a.judge(2, "oid-a").is_ok());
        // A cache that is loading says nothing about the credential.
        a.refused(
            3,
            "oid-a",
            "LOADING Redis is loading the dataset in memory",
            t0,
        );
        assert!(a.judge(3, "oid-a").is_ok());
        assert_eq!(a.refused_total(Refusal::Other), 1);
        assert_eq!(a.refused_total(Refusal::WrongPass), 1);
        assert_eq!(a.refused_total(Refusal::NoPerm), 1);
        assert_eq!(a.accepted_total(), 2);
    }

    #[test]
    fn one_log_line_a_minute() {
        let a = Acceptance::new();
        let t0 = Instant::now();
        for i in 0..50 {
            a.refused(1, "u", "WRONGPASS x", t0 + Duration::from_millis(i * 100));
        }
        assert_eq!(a.lock().unlogged, 49);
        a.refused(1, "u", "WRONGPASS x", t0 + LOG_EVERY);
        assert_eq!(a.lock().unlogged, 0);
    }
}
