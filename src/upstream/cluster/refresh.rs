//! Reading the slot map: a `MOVED` noted at once, a refresh of the whole map
//! soon after (at most one per interval), every 30 s otherwise, and the
//! decision whether the upstream is a cluster at all.

use super::*;

impl Cluster {
    /// A `MOVED`: the slot is `node`'s now; re-read the whole map soon.
    pub(super) fn moved(&self, slot: u16, node: Node) {
        {
            let mut guard = self.map.write().expect("not poisoned");
            if let Some(m) = guard.as_mut() {
                if m.owner(slot) != Some(&node) {
                    Arc::make_mut(m).moved(slot, node);
                }
            }
        }
        self.refresh.notify_one();
    }

    /// Ask for a topology refresh (a connection failed, a shard is down).
    pub(super) fn stale(&self) {
        self.refresh.notify_one();
    }

    pub(super) async fn decide(self: Arc<Self>, forced: bool) {
        let mut attempt = 0u32;
        let is_cluster = loop {
            if forced {
                break true;
            }
            // Watch for a new credential from before asking: one that lands
            // while the question fails must still wake the retry below.
            let mut tokens = self.connector.tokens().clone();
            tokens.mark_unchanged();
            // HELLO's mode and CLUSTER SLOTS: every built-in access policy
            // allows both (INFO is @dangerous: refused under Contributor and
            // Reader), see `policy`.
            let asked = self.ask_seed(&[b"CLUSTER", b"SLOTS"]).await;
            if asked.is_ok() {
                *self.seed_error.lock().expect("not poisoned") = None;
            }
            match asked {
                Ok(reply) => {
                    let fields = self.seed.hello_fields_direct();
                    let hello_mode = fields
                        .iter()
                        .find(|(k, _)| k == "mode")
                        .map(|(_, v)| matches!(v, resp::Value::Str(s) if &s[..] == b"cluster"));
                    let detected = policy::detect(hello_mode, &reply);
                    if detected == policy::Detected::ClusterUnreadable {
                        warn!(
                            "{}",
                            policy::refusal_line(
                                "CLUSTER SLOTS",
                                &reply,
                                "HELLO says the cache is a cluster, but without its slot map the proxy cannot route by slot: clients will see MOVED"
                            )
                        );
                    }
                    let yes = detected == policy::Detected::Cluster;
                    info!(
                        hello_mode = ?hello_mode,
                        cluster_slots = %resp::error_text(&reply).unwrap_or_else(|| "listed".into()),
                        "upstream.cluster = auto: the upstream is {}",
                        if yes { "a Redis Cluster; routing commands by hash slot" } else { "not a cluster" }
                    );
                    break yes;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "cluster detection waits for an upstream connection");
                    *self.seed_error.lock().expect("not poisoned") = Some(e);
                    attempt = attempt.saturating_add(1);
                    tokio::select! {
                        _ = tokio::time::sleep(crate::upstream::conn::backoff(attempt + 3)) => {}
                        // A new credential: ask again now, clients wait meanwhile.
                        Ok(()) = tokens.changed() => {}
                        _ = self.shutdown.cancelled() => return,
                    }
                    *self.seed_error.lock().expect("not poisoned") = None;
                }
            }
        };
        if !is_cluster {
            self.decision.send_replace(Decision::Standalone);
            return;
        }
        // The key positions of every command the server has: the seed
        // connector's first connection asked, unless another one answered
        // before it had.
        if self.connector.learned().is_none() {
            if let Ok(reply) = self.ask_seed(&[b"COMMAND"]).await {
                self.connector.learn(&reply);
            }
        }
        let mut attempt = 0u32;
        while !self.refresh_now().await {
            attempt = attempt.saturating_add(1);
            tokio::select! {
                _ = tokio::time::sleep(crate::upstream::conn::backoff(attempt + 3)) => {}
                _ = self.shutdown.cancelled() => return,
            }
        }
        self.decision.send_replace(Decision::Cluster);
        tokio::spawn(self.clone().refresher());
    }

    /// One command on the seed's own shared connection.
    pub(super) async fn ask_seed(&self, args: &[&[u8]]) -> Result<Bytes, UpstreamError> {
        ask(&self.seed.shared_direct(Proto::Resp2), resp::command(args)).await
    }

    pub(super) async fn refresher(self: Arc<Self>) {
        let mut last = Instant::now();
        loop {
            tokio::select! {
                _ = self.refresh.notified() => {}
                _ = tokio::time::sleep(REFRESH_EVERY) => {}
                _ = self.shutdown.cancelled() => return,
            }
            let since = last.elapsed();
            if since < MIN_REFRESH_INTERVAL {
                tokio::select! {
                    _ = tokio::time::sleep(MIN_REFRESH_INTERVAL - since) => {}
                    _ = self.shutdown.cancelled() => return,
                }
            }
            last = Instant::now();
            self.refresh_now().await;
        }
    }

    /// Read the slot map from a known primary (or the seed); true when read.
    pub(super) async fn refresh_now(&self) -> bool {
        let mut sources: Vec<(Node, Handle)> = Vec::new();
        if let Some(m) = self.map() {
            let start = fastrand::usize(..m.nodes.len().max(1));
            for i in 0..m.nodes.len() {
                let n = &m.nodes[(start + i) % m.nodes.len()];
                sources.push((n.clone(), self.node_pool(n).shared_direct(Proto::Resp2)));
            }
        }
        let seed_node = Node {
            host: self.cfg.upstream.host.clone(),
            port: self.cfg.upstream.port,
        };
        sources.push((seed_node, self.seed.shared_direct(Proto::Resp2)));
        for (node, handle) in sources {
            let shards = if self.refusals.refused("CLUSTER SHARDS") {
                Ok(Bytes::from_static(b"-NOPERM\r\n"))
            } else {
                ask(&handle, resp::command(&[b"CLUSTER", b"SHARDS"])).await
            };
            let map = match shards {
                Ok(r) if r.first() != Some(&b'-') => topology::parse_shards(&r, &node.host, true),
                Ok(r) => {
                    if policy::is_noperm(&r) && self.refusals.first("CLUSTER SHARDS") {
                        warn!(
                            "{}",
                            policy::refusal_line(
                                "CLUSTER SHARDS",
                                &r,
                                "reading CLUSTER SLOTS instead"
                            )
                        );
                    }
                    match ask(&handle, resp::command(&[b"CLUSTER", b"SLOTS"])).await {
                        Ok(r) => topology::parse_slots(&r, &node.host),
                        Err(_) => None,
                    }
                }
                Err(_) => None,
            };
            let Some(map) = map else { continue };
            if map.uncovered() > 0 {
                // A failover in progress: keep what we had for those slots.
                warn!(uncovered = map.uncovered(), from = %node, "cluster topology has slots without a primary");
            }
            let changed = self.map().is_none_or(|old| *old != map);
            if changed {
                info!(
                    shards = map.nodes.len(),
                    primaries = %map.nodes.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(" "),
                    from = %node,
                    "cluster topology"
                );
            }
            for n in &map.nodes {
                self.node_pool(n);
            }
            if changed {
                // A node that left the topology is forgotten after a grace
                // (see `nodes`): its pool (and, with the dispatchers'
                // handles, its connections) goes, and nothing redials it.
                // Named again within the grace, it keeps its pool.
                let started = self.nodes.lock().expect("not poisoned").update(&map.nodes);
                for (n, ticket) in started {
                    info!(node = %n, "cluster node left the topology; its connections close in {}s unless it is back by then", LEFT_GRACE.as_secs());
                    let nodes = self.nodes.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(LEFT_GRACE).await;
                        let stop = nodes.lock().expect("not poisoned").expire(&n, ticket);
                        if let Some(stop) = stop {
                            stop.cancel();
                        }
                    });
                }
                self.version.fetch_add(1, Ordering::Release);
            }
            let map = Arc::new(map);
            *self.map.write().expect("not poisoned") = Some(map.clone());
            if changed {
                self.hub.topology(map, self.refresh.clone());
            }
            return true;
        }
        warn!("cannot read the cluster topology from any node; keeping the last slot map");
        false
    }
}
