//! The commands of one read, in order: stateless ones gathered into batches
//! for the shared connection (a whole transaction as one piece), the rest
//! handled one by one, inline commands made RESP arrays, and the reading
//! stopped while the client does not take its replies.

use super::*;

impl Session {
    /// Take the whole commands at the front of `buf` (read at `arrived`);
    /// what is left is an incomplete one. False ends the session.
    pub(super) async fn take_commands(
        &mut self,
        buf: &mut BytesMut,
        scanner: &mut CommandScanner,
        arrived: Instant,
    ) -> bool {
        // Stateless commands at the front of `buf` not yet sent: (bytes, count).
        let mut batch_len = 0usize;
        let mut batch_count = 0usize;
        loop {
            if !self.client.may_send(batch_count + 1) {
                // The client is not taking its replies: send nothing more for
                // it until it does (bounded by command, not by read).
                self.flush_batch(buf, &mut batch_len, &mut batch_count, arrived)
                    .await;
                if !self.backpressure().await {
                    return false;
                }
            }
            let cmd = match scanner.scan(&buf[batch_len..]) {
                Ok(Some(cmd)) => cmd,
                Ok(None) => break,
                Err(e) => {
                    self.flush_batch(buf, &mut batch_len, &mut batch_count, arrived)
                        .await;
                    self.protocol_error(e).await;
                    return false;
                }
            };
            let frame = &buf[batch_len..batch_len + cmd.len];
            if cmd.argc == 0 {
                // An empty command: Redis ignores it, so do we.
                if batch_count == 0 {
                    let _ = buf.split_to(cmd.len);
                } else {
                    self.flush_batch(buf, &mut batch_len, &mut batch_count, arrived)
                        .await;
                    let _ = buf.split_to(cmd.len);
                }
                continue;
            }
            if cmd.inline {
                // Telnet and redis-cli's inline form: made a RESP array (its
                // quoted words unescaped as Redis does) and handled as one.
                self.flush_batch(buf, &mut batch_len, &mut batch_count, arrived)
                    .await;
                let line = buf.split_to(cmd.len);
                let line = line.strip_suffix(b"\n").unwrap_or(&line);
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                let converted = scan::inline_args(line).and_then(|words| {
                    let refs: Vec<&[u8]> = words.iter().map(|w| &w[..]).collect();
                    let frame = resp::command(&refs);
                    let cmd = CommandScanner::new(self.ctx.limits).scan(&frame)?;
                    Ok(cmd.map(|cmd| (frame, cmd)))
                });
                match converted {
                    Ok(Some((frame, cmd))) => {
                        if !self.dispatch(frame, &cmd, arrived).await {
                            return false;
                        }
                        self.take_inbox(buf);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        self.protocol_error(e).await;
                        return false;
                    }
                }
                continue;
            }
            let class = self.classify(frame, &cmd);
            let shared_ok = self.st.authed
                && self.st.pinned.is_none()
                && self.st.last_target == Target::Shared
                && self.st.reply_mode == ReplyMode::On
                && self.st.tx.doomed.is_none()
                // RESP2 subscribed mode refuses most commands: see `handle`.
                && !(self.st.proto == Proto::Resp2 && self.st.subscribed());
            // A RESP3 client's PUBLISH to its own channel goes alone: its
            // reply waits for the client's own messages.
            let batchable = class == Class::Shared
                && shared_ok
                && !(self.st.subscribed() && self.publishes_to_itself(frame, &cmd));
            let block = if class == Class::Pin(Pin::Transaction) && shared_ok {
                self.whole_tx(&buf[batch_len..])
            } else {
                None
            };
            if let Some((len, count, census)) = block {
                // One piece on the shared connection, never split.
                if batch_count + count > MAX_BATCH {
                    self.flush_batch(buf, &mut batch_len, &mut batch_count, arrived)
                        .await;
                }
                // Counts inside: in EXEC's array, the block's last reply.
                for (element, question) in census {
                    self.census.push(crate::upstream::pubsub::count::Fix {
                        at: batch_count + count - 1,
                        element: Some(element),
                        question,
                    });
                }
                if self.ctx.metrics.otel().is_some() {
                    self.batch_op = Some(ops::merge(self.batch_op, ops::lookup(b"EXEC")));
                }
                batch_len += len;
                batch_count += count;
                if batch_count >= MAX_BATCH {
                    self.flush_batch(buf, &mut batch_len, &mut batch_count, arrived)
                        .await;
                }
                continue;
            }
            if batchable {
                if let Some(question) = self.census_question(frame, &cmd) {
                    self.census.push(crate::upstream::pubsub::count::Fix {
                        at: batch_count,
                        element: None,
                        question,
                    });
                }
                if self.ctx.metrics.otel().is_some() {
                    let op = ops::lookup(cmd.arg(frame, 0).unwrap_or_default());
                    self.batch_op = Some(ops::merge(self.batch_op, op));
                }
                batch_len += cmd.len;
                batch_count += 1;
                if batch_count >= MAX_BATCH {
                    // Its replies come back as one piece: a bounded one.
                    self.flush_batch(buf, &mut batch_len, &mut batch_count, arrived)
                        .await;
                }
                continue;
            }
            self.flush_batch(buf, &mut batch_len, &mut batch_count, arrived)
                .await;
            let frame = buf.split_to(cmd.len).freeze();
            if !self.dispatch(frame, &cmd, arrived).await {
                return false;
            }
            self.take_inbox(buf);
        }
        self.flush_batch(buf, &mut batch_len, &mut batch_count, arrived)
            .await;
        true
    }
}
