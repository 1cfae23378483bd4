//! A RESP3 client's own messages of its PUBLISH, which Redis writes before
//! the PUBLISH's reply: how the reply waits for them.

use super::Out;
use crate::upstream::UpstreamError;
use bytes::Bytes;
use std::collections::VecDeque;

/// How long the reply of a PUBLISH waits for the client's own messages
/// before it is written anyway (the hub's connection may be down: then
/// they are lost, as messages published in a gap are).
const OWN_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// A RESP3 client's PUBLISH (or SPUBLISH) to a channel it is subscribed to,
/// by name or by pattern: Redis writes the client its own `message` and
/// `pmessage` pushes before the reply, in the same event. Through the proxy
/// they come over the hub's connection, the reply over another; the reply
/// is held until the hub has delivered them (issue 19, finding 6).
pub(in crate::downstream) struct OwnMessages {
    channel: Bytes,
    payload: Bytes,
    /// Own messages still to come (one per name and matching pattern).
    pub(super) left: usize,
    /// The reply, once it arrived.
    pub(super) reply: Option<Result<Bytes, UpstreamError>>,
    pub(super) deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl OwnMessages {
    pub(in crate::downstream) fn new(channel: Bytes, payload: Bytes, expect: usize) -> Box<Self> {
        Box::new(OwnMessages {
            channel,
            payload,
            left: expect,
            reply: None,
            deadline: Box::pin(tokio::time::sleep(OWN_WAIT)),
        })
    }

    /// Whether the hub frame is one of the messages waited for.
    pub(super) fn is_own(&self, frame: &[u8]) -> bool {
        is_message_of(frame, &self.channel, &self.payload)
    }

    /// The reply said the message reached at least one receiver (an error,
    /// or 0 receivers: nothing to wait for).
    pub(super) fn delivered(&self) -> bool {
        match &self.reply {
            Some(Ok(b)) => b.len() > 3 && b[0] == b':' && b[1] != b'0' && b[1] != b'-',
            _ => false,
        }
    }
}

/// A message taken for writing: the first reply still waiting for such a
/// message of its client's own counts it.
pub(super) fn count_own(owed: &mut VecDeque<Out>, frame: &[u8]) {
    for o in owed.iter_mut() {
        if let Out::Wait { own: Some(own), .. } = o {
            if own.left > 0 && own.is_own(frame) {
                own.left -= 1;
                return;
            }
        }
    }
}

/// A pub/sub message frame (`message`, `pmessage`, `smessage`, RESP2 or
/// RESP3) carrying `payload` on `channel`: its last element is the payload,
/// and the channel is one of its elements.
fn is_message_of(frame: &[u8], channel: &[u8], payload: &[u8]) -> bool {
    let bulk = |b: &[u8]| {
        let mut v = format!("${}\r\n", b.len()).into_bytes();
        v.extend_from_slice(b);
        v.extend_from_slice(b"\r\n");
        v
    };
    let (ch, pl) = (bulk(channel), bulk(payload));
    frame.len() >= pl.len() + ch.len()
        && frame.ends_with(&pl)
        && frame[..frame.len() - pl.len()]
            .windows(ch.len())
            .any(|w| w == &ch[..])
}

#[cfg(test)]
mod tests {
    use super::is_message_of;

    #[test]
    fn own_messages_are_recognised() {
        let m3 = b">3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$2\r\nhi\r\n";
        let m2 = b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$2\r\nhi\r\n";
        let pm = b">4\r\n$8\r\npmessage\r\n$2\r\nc*\r\n$2\r\nch\r\n$2\r\nhi\r\n";
        for f in [&m3[..], m2, pm] {
            assert!(is_message_of(f, b"ch", b"hi"));
            assert!(!is_message_of(f, b"ch", b"h"));
            assert!(!is_message_of(f, b"c", b"hi"));
            assert!(!is_message_of(f, b"other", b"hi"));
        }
        assert!(!is_message_of(b"", b"ch", b"hi"));
        assert!(is_message_of(
            b">3\r\n$7\r\nmessage\r\n$0\r\n\r\n$0\r\n\r\n",
            b"",
            b""
        ));
    }
}
