//! (P|S)SUBSCRIBE and (P|S)UNSUBSCRIBE: the session's side of the pub/sub
//! hub ([`crate::upstream::pubsub`]), confirmations in the command's place.

use super::*;

impl Session {
    /// (P|S)SUBSCRIBE and (P|S)UNSUBSCRIBE, answered with the hub: the
    /// confirmations come as Redis sends them, in this command's place.
    pub(super) async fn pubsub(&mut self, cmd: PubSub, args: &[Bytes]) -> bool {
        self.ctx.metrics.command(Route::PubSub);
        let (kind, subscribe) = match cmd {
            PubSub::Subscribe => (Kind::Channel, true),
            PubSub::PSubscribe => (Kind::Pattern, true),
            PubSub::SSubscribe => (Kind::Shard, true),
            PubSub::Unsubscribe => (Kind::Channel, false),
            PubSub::PUnsubscribe => (Kind::Pattern, false),
            PubSub::SUnsubscribe => (Kind::Shard, false),
        };
        if subscribe && args.len() < 2 {
            let reply = resp::error(&format!(
                "ERR wrong number of arguments for '{}' command",
                String::from_utf8_lossy(&args[0]).to_lowercase()
            ));
            // An error, not a push: silenced by CLIENT REPLY OFF as Redis's is.
            self.reply(reply).await;
            return true;
        }
        if self.st.in_multi {
            // Refused at queue time: EXEC discards the transaction.
            self.st.tx.abort = true;
            let reply = resp::error(&format!(
                "ERR '{}' inside MULTI is not supported by redis-entra-proxy",
                String::from_utf8_lossy(&args[0]).to_lowercase()
            ));
            self.reply(reply).await;
            return true;
        }
        // Commands run in order: replies still due come before these
        // confirmations (which may be written as soon as they are queued).
        self.settle(false).await;
        self.st.hub_seq += 1;
        let seq = self.st.hub_seq;
        let names = args[1..].to_vec();
        let link = self.link();
        let hub = &self.ctx.hub;
        let res = if subscribe {
            hub.subscribe(&link, self.st.proto, kind, names.clone(), seq)
                .await
        } else {
            hub.unsubscribe(&link, self.st.proto, kind, names.clone(), seq)
                .await
        };
        let item = match res {
            Ok(counts) => {
                self.st.names.apply(kind, subscribe, &names);
                if counts.total() == 0 {
                    self.st.names.clear();
                }
                self.st.subs = counts.subs;
                self.st.shard_subs = counts.shard;
                Out::Hub(seq)
            }
            Err(e) => Out::Now(e),
        };
        self.client.owed.push_back(item);
        true
    }

    /// The hub's way to this client, made on its first pub/sub command.
    pub(super) fn link(&mut self) -> Arc<Link> {
        if let Some(link) = &self.st.link {
            return link.clone();
        }
        let (link, rx) = Link::new(self.st.id, self.peer.to_string());
        self.client.hub = Some(HubFeed::new(&link, rx));
        self.st.link = Some(link.clone());
        link
    }
}
