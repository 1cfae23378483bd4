//! The cluster's node pools and the grace a node that left the topology
//! gets before its connections close: commands in flight there (answered
//! by `MOVED`, say) finish first; then nothing redials it. A node that is
//! named again within the grace keeps its pool: slot maps read from nodes
//! that have not yet heard of a failover can flap (seen under `CLUSTER
//! FAILOVER`: the new primary "left" for one map read from a node with the
//! old view, and its connections, carrying the commands that had followed
//! `MOVED` there, closed 5 s later under them).

use super::topology::Node;
use std::collections::HashMap;
use tokio_util::sync::CancellationToken;

struct Entry<P> {
    pool: P,
    stop: CancellationToken,
    /// The ticket of the grace under way, if the node is leaving.
    leaving: Option<u64>,
}

pub(crate) struct Nodes<P> {
    entries: HashMap<Node, Entry<P>>,
    tickets: u64,
}

impl<P: Clone> Nodes<P> {
    pub(crate) fn new() -> Self {
        Nodes {
            entries: HashMap::new(),
            tickets: 0,
        }
    }

    /// The pool of `node` (also while it is leaving: still usable then).
    pub(crate) fn get(&self, node: &Node) -> Option<P> {
        self.entries.get(node).map(|e| e.pool.clone())
    }

    pub(crate) fn insert(&mut self, node: Node, pool: P, stop: CancellationToken) {
        self.entries.insert(
            node,
            Entry {
                pool,
                stop,
                leaving: None,
            },
        );
    }

    /// A new slot map names `present`: those stay (one that was leaving is
    /// kept: it came back within the grace); every other node starts
    /// leaving, unless it already is (its grace runs from when it left).
    /// Returns the nodes that started leaving now, each with its ticket for
    /// [`Nodes::expire`].
    pub(crate) fn update(&mut self, present: &[Node]) -> Vec<(Node, u64)> {
        let mut started = Vec::new();
        for (node, e) in self.entries.iter_mut() {
            if present.contains(node) {
                e.leaving = None;
            } else if e.leaving.is_none() {
                self.tickets += 1;
                e.leaving = Some(self.tickets);
                started.push((node.clone(), self.tickets));
            }
        }
        started
    }

    /// The grace of `ticket` is over: the node goes if it is still leaving
    /// under that ticket; the returned token is to be cancelled (its
    /// connections close and nothing redials it).
    pub(crate) fn expire(&mut self, node: &Node, ticket: u64) -> Option<CancellationToken> {
        if self.entries.get(node)?.leaving != Some(ticket) {
            return None;
        }
        self.entries.remove(node).map(|e| e.stop)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(port: u16) -> Node {
        Node {
            host: "127.0.0.1".into(),
            port,
        }
    }

    fn with(ports: &[u16]) -> (Nodes<u16>, Vec<CancellationToken>) {
        let mut nodes = Nodes::new();
        let mut stops = Vec::new();
        for &p in ports {
            let stop = CancellationToken::new();
            nodes.insert(n(p), p, stop.clone());
            stops.push(stop);
        }
        (nodes, stops)
    }

    #[test]
    fn a_node_that_left_goes_after_its_grace() {
        let (mut nodes, stops) = with(&[1, 2]);
        let leaving = nodes.update(&[n(1)]);
        assert_eq!(leaving.len(), 1);
        let (node, ticket) = leaving[0].clone();
        assert_eq!(node, n(2));
        // Still usable during the grace.
        assert_eq!(nodes.get(&n(2)), Some(2));
        let stop = nodes.expire(&node, ticket).expect("goes");
        stop.cancel();
        assert!(stops[1].is_cancelled());
        assert_eq!(nodes.get(&n(2)), None);
        assert_eq!(nodes.len(), 1);
    }

    /// The flap seen under CLUSTER FAILOVER: a map without the new primary,
    /// then one with it again, within the grace: same pool, never closed.
    #[test]
    fn a_node_named_again_within_the_grace_keeps_its_pool() {
        let (mut nodes, stops) = with(&[1, 6]);
        let leaving = nodes.update(&[n(1)]);
        let (node, ticket) = leaving[0].clone();
        assert!(nodes.update(&[n(1), n(6)]).is_empty());
        assert_eq!(nodes.expire(&node, ticket), None);
        assert_eq!(nodes.get(&n(6)), Some(6));
        assert!(!stops[1].is_cancelled());
        // Leaving again later gets a new grace of its own.
        let again = nodes.update(&[n(1)]);
        assert_eq!(again.len(), 1);
        assert_ne!(again[0].1, ticket);
        assert!(nodes.expire(&n(6), again[0].1).is_some());
    }

    #[test]
    fn the_grace_runs_from_the_first_map_without_the_node() {
        let (mut nodes, _stops) = with(&[1, 2]);
        let first = nodes.update(&[n(1)]);
        // A second map without it starts no new grace.
        assert!(nodes.update(&[n(1)]).is_empty());
        assert!(nodes.expire(&n(2), first[0].1).is_some());
    }
}
