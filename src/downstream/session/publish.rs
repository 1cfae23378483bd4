//! A RESP3 client that publishes to a channel it listens to itself gets its
//! own messages before the reply, as Redis sends them (issue 19, finding 6):
//! the session keeps the names of the client's subscriptions (as the hub
//! confirmed them) to know how many of its own messages to wait for; the
//! waiting is in [`super::super::replies::OwnMessages`].

use super::*;
use std::collections::HashSet;

/// The names a client is subscribed to, by kind.
#[derive(Default)]
pub(super) struct Names {
    channels: HashSet<Bytes>,
    patterns: HashSet<Bytes>,
    shard: HashSet<Bytes>,
}

impl Names {
    /// After the hub confirmed a (P|S)(UN)SUBSCRIBE of `names` (none: all of
    /// that kind).
    pub(super) fn apply(&mut self, kind: Kind, subscribe: bool, names: &[Bytes]) {
        let set = match kind {
            Kind::Channel => &mut self.channels,
            Kind::Pattern => &mut self.patterns,
            Kind::Shard => &mut self.shard,
        };
        if subscribe {
            set.extend(names.iter().cloned());
        } else if names.is_empty() {
            set.clear();
        } else {
            for n in names {
                set.remove(n);
            }
        }
    }

    pub(super) fn clear(&mut self) {
        *self = Names::default();
    }

    /// How many messages a PUBLISH (`shard`: SPUBLISH) to `channel` sends
    /// this client: one if it is subscribed to the name, one per matching
    /// pattern.
    pub(super) fn receives(&self, shard: bool, channel: &[u8]) -> usize {
        if shard {
            return usize::from(self.shard.contains(channel));
        }
        usize::from(self.channels.contains(channel))
            + self
                .patterns
                .iter()
                .filter(|p| glob_match(p, channel))
                .count()
    }
}

impl Session {
    /// A PUBLISH or SPUBLISH that sends this RESP3 client messages of its
    /// own: (channel, payload, how many). Not inside MULTI (the messages
    /// come at EXEC).
    pub(super) fn own_publish(&self, args: &[&[u8]]) -> Option<(usize, bool)> {
        if self.st.proto != Proto::Resp3 || !self.st.subscribed() || self.st.in_multi {
            return None;
        }
        let [name, channel, _payload] = args else {
            return None;
        };
        let shard = if name.eq_ignore_ascii_case(b"PUBLISH") {
            false
        } else if name.eq_ignore_ascii_case(b"SPUBLISH") {
            true
        } else {
            return None;
        };
        let n = self.st.names.receives(shard, channel);
        (n > 0).then_some((n, shard))
    }

    /// [`Self::own_publish`] for a command as scanned.
    pub(super) fn publishes_to_itself(&self, frame: &[u8], cmd: &scan::Command) -> bool {
        if cmd.argc != 3 {
            return false;
        }
        let args: Vec<&[u8]> = (0..3).filter_map(|i| cmd.arg(frame, i)).collect();
        self.own_publish(&args).is_some()
    }

    /// The reply just queued (the last owed) waits for the client's own
    /// messages of this PUBLISH.
    pub(super) fn await_own_messages(&mut self, args: &[Bytes]) {
        let refs: Vec<&[u8]> = args.iter().map(|a| &a[..]).collect();
        let Some((n, _)) = self.own_publish(&refs) else {
            return;
        };
        if let Some(Out::Wait {
            own, silent: false, ..
        }) = self.client.owed.back_mut()
        {
            *own = Some(OwnMessages::new(args[1].clone(), args[2].clone(), n));
            self.client.owns += 1;
        }
    }
}

/// Redis's glob (`stringmatchlen`): `*`, `?`, `[...]` with ranges and `^`,
/// `\` escaping the next byte; case-sensitive.
pub(super) fn glob_match(pattern: &[u8], s: &[u8]) -> bool {
    let (mut p, mut i) = (0, 0);
    // Where to resume after the last `*`: (pattern, string).
    let mut star: Option<(usize, usize)> = None;
    while i < s.len() {
        if p < pattern.len() {
            match pattern[p] {
                b'*' => {
                    star = Some((p + 1, i));
                    p += 1;
                    continue;
                }
                b'?' => {
                    p += 1;
                    i += 1;
                    continue;
                }
                b'[' => {
                    if let Some((ok, next)) = class(pattern, p + 1, s[i]) {
                        if ok {
                            p = next;
                            i += 1;
                            continue;
                        }
                    }
                }
                b'\\' if p + 1 < pattern.len() => {
                    if pattern[p + 1] == s[i] {
                        p += 2;
                        i += 1;
                        continue;
                    }
                }
                c => {
                    if c == s[i] {
                        p += 1;
                        i += 1;
                        continue;
                    }
                }
            }
        }
        match star {
            Some((sp, si)) => {
                p = sp;
                i = si + 1;
                star = Some((sp, si + 1));
            }
            None => return false,
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// A `[...]` class starting at `p` (after the `[`): whether `c` is in it,
/// and where the pattern goes on. An unclosed class runs to the end (as in
/// Redis).
fn class(pattern: &[u8], mut p: usize, c: u8) -> Option<(bool, usize)> {
    let not = pattern.get(p) == Some(&b'^');
    if not {
        p += 1;
    }
    let mut hit = false;
    while p < pattern.len() && pattern[p] != b']' {
        if pattern[p] == b'\\' && p + 1 < pattern.len() {
            hit |= pattern[p + 1] == c;
            p += 2;
        } else if p + 2 < pattern.len() && pattern[p + 1] == b'-' && pattern[p + 2] != b']' {
            let (a, b) = (
                pattern[p].min(pattern[p + 2]),
                pattern[p].max(pattern[p + 2]),
            );
            hit |= (a..=b).contains(&c);
            p += 3;
        } else {
            hit |= pattern[p] == c;
            p += 1;
        }
    }
    let next = if p < pattern.len() { p + 1 } else { p };
    Some((hit != not, next))
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn globs_as_redis_matches_them() {
        for (p, s, want) in [
            ("c*", "ch", true),
            ("c*", "c", true),
            ("c*", "xc", false),
            ("*", "", true),
            ("a?c", "abc", true),
            ("a?c", "ac", false),
            ("h[ae]llo", "hello", true),
            ("h[^e]llo", "hello", false),
            ("h[^e]llo", "hallo", true),
            ("h[a-c]llo", "hbllo", true),
            ("h[a-c]llo", "hdllo", false),
            ("a\\*b", "a*b", true),
            ("a\\*b", "axb", false),
            ("*news*", "the.news.today", true),
            ("a*b*c", "aXbYc", true),
            ("a*b*c", "aXbY", false),
            ("ch", "ch", true),
            ("ch", "ch2", false),
        ] {
            assert_eq!(glob_match(p.as_bytes(), s.as_bytes()), want, "{p} {s}");
        }
    }
}
