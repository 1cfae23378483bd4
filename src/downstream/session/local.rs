//! The commands a session answers or tracks itself, never forwarded with the
//! client's arguments: AUTH, HELLO, QUIT, RESET, SELECT bookkeeping, CLIENT
//! SETNAME/GETNAME/SETINFO/ID/INFO/REPLY, EXEC/DISCARD/UNWATCH, and the
//! replies of those queued inside MULTI (put into EXEC's array).

use super::*;

impl Session {
    /// CLIENT UNBLOCK <id> [TIMEOUT|ERROR]: for a client of the proxy blocked
    /// on its pinned connection, the server is asked to unblock that
    /// connection, and the client's session takes the result as final (no
    /// re-issue). `:0` for a client that is not blocked.
    async fn client_unblock(&mut self, args: &[Bytes], since: Instant) {
        use super::super::clients::{UNBLOCK_ERROR, UNBLOCK_TIMEOUT};
        if !(3..=4).contains(&args.len()) {
            self.reply(resp::error(
                "ERR wrong number of arguments for 'client|unblock' command",
            ))
            .await;
            return;
        }
        let mode = args.get(3).map(|m| m.to_ascii_uppercase());
        let (flag, word): (u8, &[u8]) = match mode.as_deref() {
            None | Some(b"TIMEOUT") => (UNBLOCK_TIMEOUT, b"TIMEOUT"),
            Some(b"ERROR") => (UNBLOCK_ERROR, b"ERROR"),
            Some(_) => {
                self.reply(resp::error(
                    "ERR CLIENT UNBLOCK reason should be TIMEOUT or ERROR",
                ))
                .await;
                return;
            }
        };
        let Some(id) = std::str::from_utf8(&args[2])
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
        else {
            self.reply(resp::error("ERR value is not an integer or out of range"))
                .await;
            return;
        };
        // Read now: a cluster's pinned connection binds to its node as it
        // sends the blocking command.
        let target = self.ctx.clients.get(id).and_then(|e| {
            let up = e.shown.lock().expect("not poisoned").blocked_on.clone()?;
            Some((e, up.get()?))
        });
        let Some((entry, upstream)) = target else {
            self.reply(resp::integer(0)).await;
            return;
        };
        entry
            .unblock
            .store(flag, std::sync::atomic::Ordering::Release);
        let up = upstream.id.to_string();
        let frame = resp::command(&[b"CLIENT", b"UNBLOCK", up.as_bytes(), word]);
        // A policy without +client|unblock (Data Contributor): the server's
        // refusal goes to the client, and to the log once.
        let note = crate::upstream::policy::note_client_unblock;
        match &upstream.node {
            // On a cluster, on the node of the blocked connection.
            Some(node) => match self.ctx.pool.node_shared(node, self.st.proto) {
                Some(handle) => {
                    self.switch_to(Target::Shared).await;
                    self.ctx.metrics.command(Route::Shared);
                    self.send_mapped(&handle.tx, frame, since, note).await
                }
                None => self.reply(resp::integer(0)).await,
            },
            None => {
                self.switch_to(Target::Shared).await;
                self.ctx.metrics.command(Route::Shared);
                let handle = self.shared_handle();
                self.send_mapped(&handle.tx, frame, since, note).await
            }
        }
    }

    pub(super) async fn local(
        &mut self,
        local: Local,
        name: &[u8],
        frame: Bytes,
        args: &[Bytes],
        since: Instant,
    ) -> bool {
        match local {
            Local::Auth
            | Local::ClientSetName
            | Local::ClientGetName
            | Local::ClientSetInfo
            | Local::ClientId
            | Local::ClientInfo
            | Local::ClientList
            | Local::ClientKill => {
                let reply = self.local_reply(local, args);
                if local == Local::ClientKill {
                    self.ctx
                        .clients
                        .killed_closed(self.st.id, std::time::Duration::from_secs(1))
                        .await;
                }
                self.reply(reply).await;
                if self.kill.is_cancelled() {
                    // CLIENT KILL ... SKIPME no: this client too, once its
                    // reply is written.
                    return false;
                }
            }
            Local::ClientUnblock => self.client_unblock(args, since).await,
            Local::Face => return self.face(frame, args, since).await,
            Local::ClientReply => self.client_reply(args).await,
            Local::Hello => self.hello(args).await,
            Local::Quit => {
                self.reply(resp::ok()).await;
                return false;
            }
            Local::Reset => {
                if self.st.pinned.is_some() || self.st.subscribed() {
                    self.settle(false).await;
                }
                if self.st.link.is_some() {
                    // No message of the old subscriptions after `+RESET`,
                    // and the hub's frames for it in RESP2 again.
                    self.st.hub_seq += 1;
                    let seq = self.st.hub_seq;
                    let link = self.link();
                    if self.ctx.hub.reset(&link, seq).await.is_ok() {
                        self.client.owed.push_back(Out::Hub(seq));
                    }
                    self.st.subs = 0;
                    self.st.shard_subs = 0;
                    self.st.names.clear();
                }
                self.st.pinned = None;
                self.st.in_multi = false;
                self.st.watching = false;
                self.st.sticky = false;
                self.st.tx = Tx::default();
                self.st.reply_mode = ReplyMode::On;
                self.st.redirect_lost = None;
                self.st.db = 0;
                self.st.name = None;
                if self.st.proto != Proto::Resp2 {
                    self.st.proto = Proto::Resp2;
                    self.st.shared = None;
                }
                self.st.authed = self.ctx.password.read().expect("not poisoned").is_none();
                self.st.last_target = Target::Shared;
                self.reply(resp::simple("RESET")).await;
            }
            Local::Select if self.st.in_multi => {
                // Queued by the server, run at EXEC if the transaction runs
                // (and the index is good). Only a move away from database 0
                // is believed now: it keeps the pinned connection, which is
                // harmless if the SELECT never runs; a move back to 0 is
                // believed once the client selects 0 outside a transaction.
                if let Some(db) = args.get(1).and_then(|a| redis_int(a)) {
                    if db != 0 {
                        self.st.db = db;
                    }
                }
                self.ctx.metrics.command(Route::Pinned);
                self.forward_pinned(frame, 1, since).await;
            }
            Local::Select => {
                let Some(db) = args.get(1).and_then(|a| redis_int(a)) else {
                    self.reply(resp::error("ERR value is not an integer or out of range"))
                        .await;
                    return true;
                };
                if self.st.pinned.is_none() && db == 0 {
                    self.st.db = 0;
                    self.reply(resp::ok()).await;
                    return true;
                }
                if let Err(e) = self.ensure_pinned().await {
                    self.reply(e.to_reply()).await;
                    return true;
                }
                // Optimistic: a failing SELECT (bad index) leaves db as it was on
                // the server; the client sees the server's error either way.
                self.st.db = db;
                self.ctx.metrics.command(Route::Pinned);
                self.forward_pinned(frame, 1, since).await;
            }
            Local::TxEnd => {
                if self.st.pinned.is_some() {
                    self.ctx.metrics.command(Route::Pinned);
                    if self.st.in_multi && (name == b"EXEC" || name == b"DISCARD") {
                        let tx = std::mem::take(&mut self.st.tx);
                        self.st.in_multi = false;
                        self.st.watching = false;
                        if name == b"DISCARD" {
                            self.forward_pinned(frame, 1, since).await;
                        } else if tx.abort {
                            // What Redis does with a transaction one of
                            // whose commands it refused.
                            self.forward_silently(resp::command(&[b"DISCARD"]), since)
                                .await;
                            self.reply(resp::error(
                                "EXECABORT Transaction discarded because of previous errors.",
                            ))
                            .await;
                        } else if tx.locals.is_empty() {
                            self.forward_pinned(frame, 1, since).await;
                            self.census_exec(tx.census, None).await;
                        } else {
                            self.exec_with_locals(frame, tx).await;
                        }
                    } else {
                        if name == b"UNWATCH" {
                            self.st.watching = false;
                            self.st.tx.watch_failed = false;
                        }
                        self.forward_pinned(frame, 1, since).await;
                    }
                } else {
                    self.st.tx.watch_failed = false;
                    let reply = match name {
                        b"EXEC" => resp::error("ERR EXEC without MULTI"),
                        b"DISCARD" => resp::error("ERR DISCARD without MULTI"),
                        _ => resp::ok(),
                    };
                    self.reply(reply).await;
                }
            }
        }
        true
    }

    /// The reply of a command the proxy answers from the client's own state
    /// (now, or at EXEC when it was queued in a transaction).
    fn local_reply(&mut self, local: Local, args: &[Bytes]) -> Bytes {
        let wrong_args = |cmd: &str| {
            resp::error(&format!(
                "ERR wrong number of arguments for '{cmd}' command"
            ))
        };
        match local {
            Local::Auth => match args.len() {
                2 => self.check_password(&args[1]),
                3 => self.check_password(&args[2]),
                _ => resp::error("ERR syntax error"),
            },
            Local::ClientSetName => match args.get(2) {
                Some(n) if args.len() == 3 && !n.iter().any(|&c| c == b' ' || c == b'\n') => {
                    self.st.name = (!n.is_empty()).then(|| n.clone());
                    resp::ok()
                }
                Some(_) if args.len() == 3 => resp::error(
                    "ERR Client names cannot contain spaces, newlines or special characters.",
                ),
                _ => wrong_args("client|setname"),
            },
            Local::ClientGetName => match &self.st.name {
                Some(n) => resp::bulk(n),
                None => resp::null(self.st.proto),
            },
            Local::ClientSetInfo if args.len() == 4 => resp::ok(),
            Local::ClientSetInfo => wrong_args("client|setinfo"),
            Local::ClientId => resp::integer(self.st.id as i64),
            Local::ClientInfo => {
                self.publish();
                let line = self.reg.entry.line() + "\n";
                resp::verbatim(self.st.proto, line.as_bytes())
            }
            Local::ClientList => {
                self.publish();
                let refs: Vec<&[u8]> = args.iter().skip(2).map(|a| &a[..]).collect();
                match self.ctx.clients.list(&refs) {
                    Ok(text) => resp::verbatim(self.st.proto, text.as_bytes()),
                    Err(e) => resp::error(e),
                }
            }
            Local::ClientKill => {
                let refs: Vec<&[u8]> = args.iter().skip(2).map(|a| &a[..]).collect();
                match super::super::clients::KillFilter::parse(&refs) {
                    Ok(f) => {
                        let n = self.ctx.clients.kill(&f, self.st.id);
                        if refs.len() == 1 {
                            // The old form: one address, OK or an error.
                            if n > 0 {
                                resp::ok()
                            } else {
                                resp::error("ERR No such client")
                            }
                        } else {
                            resp::integer(n as i64)
                        }
                    }
                    Err(e) => resp::error(e),
                }
            }
            Local::Face => self.face_reply(args),
            _ => resp::error("ERR internal: not a locally answered command"),
        }
    }

    /// CLIENT REPLY ON|OFF|SKIP, kept by the proxy: OFF and SKIP have no
    /// reply, ON answers +OK.
    pub(super) async fn client_reply(&mut self, args: &[Bytes]) {
        let mode = args.get(2).map(|a| a.to_ascii_uppercase());
        match (args.len(), mode.as_deref()) {
            (3, Some(b"ON")) => {
                self.st.reply_mode = ReplyMode::On;
                self.reply(resp::ok()).await;
            }
            (3, Some(b"OFF")) => self.st.reply_mode = ReplyMode::Off,
            (3, Some(b"SKIP")) => {
                if self.st.reply_mode == ReplyMode::On {
                    self.st.reply_mode = ReplyMode::Skip;
                }
            }
            (3, _) => self.reply(resp::error("ERR syntax error")).await,
            _ => {
                self.reply(resp::error(
                    "ERR wrong number of arguments for 'client|reply' command",
                ))
                .await
            }
        }
    }

    fn check_password(&mut self, given: &[u8]) -> Bytes {
        let password = self.ctx.password.read().expect("not poisoned").clone();
        match &password {
            None => {
                // No local password: accept and drop whatever the app sends
                // (often an old access key). It never goes upstream.
                self.st.authed = true;
                resp::ok()
            }
            Some(p) if constant_time_eq(p.expose().as_bytes(), given) => {
                self.st.authed = true;
                resp::ok()
            }
            Some(_) => {
                self.ctx.metrics.error(ErrorKind::ClientAuth);
                resp::error("WRONGPASS invalid username-password pair or user is disabled.")
            }
        }
    }

    async fn hello(&mut self, args: &[Bytes]) {
        let mut proto = self.st.proto;
        if let Some(v) = args.get(1) {
            match redis_int(v) {
                Some(2) => proto = Proto::Resp2,
                Some(3) => proto = Proto::Resp3,
                Some(_) => {
                    self.reply(resp::error("NOPROTO unsupported protocol version"))
                        .await;
                    return;
                }
                None => {
                    self.reply(resp::error(
                        "ERR Protocol version is not an integer or out of range",
                    ))
                    .await;
                    return;
                }
            }
        }
        let mut i = 2;
        let mut new_name = None;
        while i < args.len() {
            let opt = args[i].to_ascii_uppercase();
            if opt == b"AUTH" && i + 2 < args.len() {
                let r = self.check_password(&args[i + 2]);
                if r.first() == Some(&b'-') {
                    self.reply(r).await;
                    return;
                }
                i += 3;
            } else if opt == b"SETNAME" && i + 1 < args.len() {
                new_name = Some(args[i + 1].clone());
                i += 2;
            } else {
                self.reply(resp::error(&format!(
                    "ERR Syntax error in HELLO option '{}'",
                    String::from_utf8_lossy(&args[i])
                )))
                .await;
                return;
            }
        }
        if !self.st.authed {
            self.reply(resp::error("NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time")).await;
            return;
        }
        if proto != self.st.proto {
            if self.st.in_multi {
                self.reply(resp::error("ERR the proxy cannot change the protocol of a client that is in a transaction; EXEC or DISCARD first")).await;
                return;
            }
            // Replies already due come in the old protocol; wait for them.
            self.settle(false).await;
            // The hub's frames for it (messages of its subscriptions, and
            // invalidations as a tracking redirect target, which a RESP3
            // client gets as pushes subscribed or not) switch here too.
            if self.st.link.is_some() || proto == Proto::Resp3 {
                self.st.hub_seq += 1;
                let seq = self.st.hub_seq;
                let link = self.link();
                match self.ctx.hub.protocol(&link, proto, seq).await {
                    Ok(_) => self.client.owed.push_back(Out::Hub(seq)),
                    Err(e) => {
                        self.reply(e).await;
                        return;
                    }
                }
            }
            if self.st.pinned.is_some() && self.st.needs_pin() {
                // Its state (database, tracking, ...) lives on its pinned
                // connection: that connection changes protocol with it.
                let v: &[u8] = if proto == Proto::Resp3 { b"3" } else { b"2" };
                if let Err(e) = self.pinned_call(resp::command(&[b"HELLO", v])).await {
                    self.reply(e).await;
                    return;
                }
            } else {
                self.st.pinned = None;
            }
            self.st.proto = proto;
            self.st.shared = None;
        }
        if let Some(n) = new_name {
            self.st.name = (!n.is_empty()).then_some(n);
        }
        let fields = self.ctx.pool.hello_fields();
        let get = |k: &str, default: resp::Value| {
            fields
                .iter()
                .find(|(f, _)| f == k)
                .map(|(_, v)| v.clone())
                .unwrap_or(default)
        };
        let s = |v: &'static str| resp::Value::Str(Bytes::from_static(v.as_bytes()));
        let map = resp::map(
            proto,
            &[
                ("server", get("server", s("redis"))),
                ("version", get("version", s("7.0.0"))),
                (
                    "proto",
                    resp::Value::Int(if proto == Proto::Resp3 { 3 } else { 2 }),
                ),
                ("id", resp::Value::Int(self.st.id as i64)),
                ("mode", get("mode", s("standalone"))),
                ("role", get("role", s("master"))),
                ("modules", get("modules", resp::Value::List(vec![]))),
            ],
        );
        self.reply(map).await;
    }

    /// A command while the client's MULTI has no connection: nothing runs
    /// until EXEC (EXECABORT) or DISCARD ends it.
    pub(super) async fn doomed(&mut self, name: &[u8], reason: String) -> bool {
        let reply = match name {
            b"EXEC" => {
                self.st.tx = Tx::default();
                resp::error("EXECABORT Transaction discarded because of previous errors.")
            }
            b"DISCARD" => {
                self.st.tx = Tx::default();
                resp::ok()
            }
            b"QUIT" => {
                self.reply(resp::ok()).await;
                return false;
            }
            b"MULTI" => resp::error("ERR MULTI calls can not be nested"),
            _ => {
                let reply = resp::error(&format!(
                    "ERR not queued: this transaction's MULTI failed ({reason}); EXEC will discard it"
                ));
                self.st.tx.doomed = Some(reason);
                reply
            }
        };
        self.reply(reply).await;
        true
    }

    /// EXEC of a transaction with commands the proxy answers itself: once
    /// the server's array is in, run them and put their replies in their
    /// places. A transaction that did not run (nil: a WATCH conflict, or an
    /// error) runs none of them.
    async fn exec_with_locals(&mut self, frame: Bytes, tx: Tx) {
        self.settle(false).await;
        let reply = match self.pinned_call(frame).await {
            Ok(b) if resp::array_len(&b).is_some() => {
                let mut locals = Vec::with_capacity(tx.locals.len());
                for (at, local, args) in &tx.locals {
                    locals.push((*at, self.local_reply(*local, args)));
                }
                let b = resp::splice_array(&b, &locals).unwrap_or(b);
                let census = tx.census.clone();
                self.census_exec(census, Some(b)).await.unwrap_or_default()
            }
            Ok(b) | Err(b) => b,
        };
        self.reply(reply).await;
    }
}

/// An integer as Redis reads one (`string2ll`): an optional `-`, digits, no
/// `+`, no leading zero, no spaces, within i64.
fn redis_int(s: &[u8]) -> Option<i64> {
    let digits = s.strip_prefix(b"-").unwrap_or(s);
    let plain = digits.iter().all(u8::is_ascii_digit)
        && !digits.is_empty()
        && (digits[0] != b'0' || s == b"0");
    if !plain {
        return None;
    }
    std::str::from_utf8(s).ok()?.parse().ok()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    #[test]
    fn integers_as_redis_reads_them() {
        use super::redis_int;
        assert_eq!(redis_int(b"3"), Some(3));
        assert_eq!(redis_int(b"0"), Some(0));
        assert_eq!(redis_int(b"-12"), Some(-12));
        for bad in [
            &b"03"[..],
            b"+3",
            b" 3",
            b"3 ",
            b"",
            b"-",
            b"-0",
            b"x",
            b"99999999999999999999",
        ] {
            assert_eq!(redis_int(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
