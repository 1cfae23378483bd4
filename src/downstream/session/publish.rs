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
                .filter(|p| crate::upstream::pubsub::place::glob(p, channel))
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
