//! What the registry tells the counting of PUBLISH and PUBSUB replies
//! ([`crate::upstream::pubsub::count`]): who hears a channel here, and what the hub
//! holds upstream.

use super::*;

/// The registry's figures for the counts one Redis would give.
impl crate::upstream::pubsub::count::Held for Actor {
    /// A subscription's local clients get a message only through the hub's
    /// confirmed subscription: counted only while there is one. The server
    /// counted the hub's subscriptions on `node` (a shard channel's one is
    /// on its owner, where SPUBLISH went after any redirection).
    fn receivers(
        &self,
        kind: Kind,
        channel: &[u8],
        node: Option<&str>,
    ) -> crate::upstream::pubsub::Receivers {
        let on_node: Vec<usize> = match node {
            None => vec![HOME],
            Some(node) => (0..self.conns.len())
                .filter(|&c| self.addr(c) == node)
                .collect(),
        };
        let mut r = crate::upstream::pubsub::Receivers::default();
        let mut add = |e: &Entry| {
            if e.active() == 0 {
                return;
            }
            r.local += e.subs.len();
            r.upstream += match kind {
                Kind::Shard => e.active(),
                _ => on_node
                    .iter()
                    .filter(|&&c| e.state(c) == Some(Up::Active))
                    .count(),
            };
        };
        if let Some(e) = self.entries[kind.idx()].get(channel) {
            add(e);
        }
        if kind == Kind::Channel {
            for (pattern, e) in &self.entries[Kind::Pattern.idx()] {
                if crate::upstream::pubsub::place::glob(pattern, channel) {
                    add(e);
                }
            }
        }
        r
    }

    fn subscribers(&self, kind: Kind, name: &[u8]) -> crate::upstream::pubsub::Receivers {
        self.entries[kind.idx()]
            .get(name)
            .map(|e| crate::upstream::pubsub::Receivers {
                local: e.subs.len(),
                upstream: e.active(),
            })
            .unwrap_or_default()
    }

    /// A server counts each pattern once however many of its clients hold
    /// it (the home connection and a primary's can be on one node).
    fn patterns(&self) -> crate::upstream::pubsub::Receivers {
        let entries = self.entries[Kind::Pattern.idx()].values();
        let mut held = 0;
        for e in entries.clone() {
            let mut nodes: Vec<String> = e
                .ups
                .iter()
                .filter(|(_, u)| *u == Up::Active)
                .map(|(c, _)| self.addr(*c))
                .collect();
            nodes.sort();
            nodes.dedup();
            held += nodes.len();
        }
        crate::upstream::pubsub::Receivers {
            local: entries.filter(|e| !e.subs.is_empty()).count(),
            upstream: held,
        }
    }
}
