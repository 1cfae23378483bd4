//! RESP framing and the frames the proxy writes itself.
//!
//! [`scan`] finds frame boundaries in client input and upstream replies without a
//! recursive decoder; the hot path forwards the raw bytes it delimits. The
//! functions here encode what the proxy says on its own behalf (its AUTH and
//! HELLO upstream, local replies to clients) with `redis-protocol`, and decode
//! single trusted replies from the upstream.

pub mod scan;

use bytes::{Bytes, BytesMut};
use redis_protocol::resp2::types::BytesFrame as Frame2;
use redis_protocol::resp3::types::BytesFrame as Frame3;

/// Make room for the next socket read. Bytes handed out with `split_to` still
/// share the old allocation, so without this a drained buffer would grow again
/// by a few dozen bytes at a time and reads would shrink to match. A buffer
/// that grew for one large frame is let go once drained, so that a single
/// big reply or command does not hold its size for the connection's life.
pub fn reserve_for_read(buf: &mut BytesMut) {
    const READ_CHUNK: usize = 64 * 1024;
    const KEEP_AT_MOST: usize = 4 * READ_CHUNK;
    if buf.capacity() > KEEP_AT_MOST && buf.len() < READ_CHUNK {
        // Copy what is left (less than a read) into a fresh buffer; the old
        // allocation goes once the frames split from it are dropped.
        let mut fresh = BytesMut::with_capacity(READ_CHUNK);
        fresh.extend_from_slice(buf);
        *buf = fresh;
    }
    if buf.capacity() - buf.len() < READ_CHUNK / 4 {
        buf.reserve(READ_CHUNK);
    }
}

/// RESP version a client or connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    Resp2,
    Resp3,
}

fn encode2(frame: &Frame2) -> Bytes {
    let mut buf = BytesMut::new();
    redis_protocol::resp2::encode::extend_encode(&mut buf, frame, false)
        .expect("encoding into a growable buffer cannot fail");
    buf.freeze()
}

fn encode3(frame: &Frame3) -> Bytes {
    let mut buf = BytesMut::new();
    redis_protocol::resp3::encode::complete::extend_encode(&mut buf, frame, false)
        .expect("encoding into a growable buffer cannot fail");
    buf.freeze()
}

/// A command as an array of bulk strings.
pub fn command(args: &[&[u8]]) -> Bytes {
    encode2(&Frame2::Array(
        args.iter()
            .map(|a| Frame2::BulkString(Bytes::copy_from_slice(a)))
            .collect(),
    ))
}

/// `-<message>`; the message should start with an error code such as `ERR`.
pub fn error(message: &str) -> Bytes {
    // A CR or LF inside would end the frame early.
    let clean: String = message
        .chars()
        .map(|c| if c == '\r' || c == '\n' { ' ' } else { c })
        .collect();
    encode2(&Frame2::Error(clean.into()))
}

pub fn ok() -> Bytes {
    Bytes::from_static(b"+OK\r\n")
}

pub fn simple(s: &str) -> Bytes {
    encode2(&Frame2::SimpleString(Bytes::copy_from_slice(s.as_bytes())))
}

pub fn bulk(b: &[u8]) -> Bytes {
    encode2(&Frame2::BulkString(Bytes::copy_from_slice(b)))
}

pub fn integer(i: i64) -> Bytes {
    encode2(&Frame2::Integer(i))
}

/// Text as Redis sends CLIENT LIST and INFO: a bulk string in RESP2, a
/// verbatim string (`=`, format `txt`) in RESP3.
pub fn verbatim(proto: Proto, text: &[u8]) -> Bytes {
    match proto {
        Proto::Resp2 => bulk(text),
        Proto::Resp3 => {
            let mut b = BytesMut::with_capacity(text.len() + 16);
            b.extend_from_slice(format!("={}\r\ntxt:", text.len() + 4).as_bytes());
            b.extend_from_slice(text);
            b.extend_from_slice(b"\r\n");
            b.freeze()
        }
    }
}

/// A null reply in the client's protocol.
pub fn null(proto: Proto) -> Bytes {
    match proto {
        Proto::Resp2 => Bytes::from_static(b"$-1\r\n"),
        Proto::Resp3 => Bytes::from_static(b"_\r\n"),
    }
}

/// A value in a map reply (HELLO).
#[derive(Debug, Clone)]
pub enum Value {
    Str(Bytes),
    Int(i64),
    List(Vec<Value>),
}

/// A map reply: a RESP3 map, or a flat array for RESP2 (as Redis does).
pub fn map(proto: Proto, pairs: &[(&str, Value)]) -> Bytes {
    match proto {
        Proto::Resp2 => {
            fn conv(v: &Value) -> Frame2 {
                match v {
                    Value::Str(s) => Frame2::BulkString(s.clone()),
                    Value::Int(i) => Frame2::Integer(*i),
                    Value::List(l) => Frame2::Array(l.iter().map(conv).collect()),
                }
            }
            let mut items = Vec::with_capacity(pairs.len() * 2);
            for (k, v) in pairs {
                items.push(Frame2::BulkString(Bytes::copy_from_slice(k.as_bytes())));
                items.push(conv(v));
            }
            encode2(&Frame2::Array(items))
        }
        Proto::Resp3 => {
            // Encoded pair by pair so the order is the one given (HELLO's order).
            let mut out = BytesMut::from(format!("%{}\r\n", pairs.len()).as_bytes());
            fn conv(v: &Value) -> Frame3 {
                match v {
                    Value::Str(s) => Frame3::BlobString {
                        data: s.clone(),
                        attributes: None,
                    },
                    Value::Int(i) => Frame3::Number {
                        data: *i,
                        attributes: None,
                    },
                    Value::List(l) => Frame3::Array {
                        data: l.iter().map(conv).collect(),
                        attributes: None,
                    },
                }
            }
            for (k, v) in pairs {
                out.extend_from_slice(&encode3(&Frame3::BlobString {
                    data: Bytes::copy_from_slice(k.as_bytes()),
                    attributes: None,
                }));
                out.extend_from_slice(&encode3(&conv(v)));
            }
            out.freeze()
        }
    }
}

/// Decode one complete, trusted upstream reply (AUTH, HELLO, a push frame).
pub fn decode_reply(buf: &[u8]) -> Option<redis_protocol::resp3::types::OwnedFrame> {
    redis_protocol::resp3::decode::complete::decode(buf)
        .ok()
        .flatten()
        .map(|(f, _)| f)
}

/// The text of an error reply (`-ERR x` -> `ERR x`), if it is one.
pub fn error_text(reply: &[u8]) -> Option<String> {
    match reply.first() {
        Some(b'-') => Some(String::from_utf8_lossy(&reply[1..]).trim_end().to_string()),
        Some(b'!') => decode_reply(reply).map(|f| match f {
            redis_protocol::resp3::types::OwnedFrame::BlobError { data, .. } => {
                String::from_utf8_lossy(&data).into_owned()
            }
            other => format!("{other:?}"),
        }),
        _ => None,
    }
}

/// The first two elements of a push frame (`>N` followed by bulk strings):
/// its kind (`message`, `subscribe`, ...) and the channel or pattern after it
/// (`None` when that element is a null, or there is none). `None` for anything
/// that is not such a frame. The frame comes from the upstream, already framed
/// by [`scan::ReplyScanner`]; this only reads its head.
pub fn push_head(frame: &[u8]) -> Option<(&[u8], Option<&[u8]>)> {
    let mut it = push_bulks(frame)?;
    let kind = it.next()??;
    let second = it.next().flatten();
    Some((kind, second))
}

/// The channel of a `pmessage` push (its third element: pattern, channel,
/// payload follow the kind).
pub fn pmessage_channel(frame: &[u8]) -> Option<&[u8]> {
    push_bulks(frame)?.nth(2).flatten()
}

/// The leading bulk strings (or nulls) of a push frame, in order; the
/// iterator ends at the first element that is neither or is cut short.
fn push_bulks(frame: &[u8]) -> Option<impl Iterator<Item = Option<&[u8]>>> {
    if frame.first() != Some(&b'>') {
        return None;
    }
    let mut pos = memchr::memchr(b'\n', frame)? + 1;
    Some(std::iter::from_fn(move || {
        let rest = frame.get(pos..)?;
        match rest.first()? {
            b'$' => {
                let nl = memchr::memchr(b'\n', rest)?;
                let len: usize = std::str::from_utf8(rest.get(1..nl.checked_sub(1)?)?)
                    .ok()?
                    .parse()
                    .ok()?;
                let start = pos + nl + 1;
                let body = frame.get(start..start.checked_add(len)?)?;
                pos = start + len + 2;
                Some(Some(body))
            }
            b'_' => {
                pos += 3;
                Some(None)
            }
            _ => None,
        }
    }))
}

/// One pub/sub confirmation frame as Redis sends it: `subscribe`, `unsubscribe`,
/// ... with the channel (or a null when there is none) and the client's count
/// of subscriptions after it. An array for RESP2, a push frame for RESP3.
pub fn pubsub_confirmation(
    out: &mut BytesMut,
    proto: Proto,
    kind: &[u8],
    channel: Option<&[u8]>,
    count: usize,
) {
    out.extend_from_slice(match proto {
        Proto::Resp2 => b"*3\r\n",
        Proto::Resp3 => b">3\r\n",
    });
    out.extend_from_slice(&bulk(kind));
    match channel {
        Some(c) => out.extend_from_slice(&bulk(c)),
        None => out.extend_from_slice(&null(proto)),
    }
    out.extend_from_slice(format!(":{count}\r\n").as_bytes());
}

/// The element count of a reply that is an array (`*N`, N >= 0).
pub fn array_len(reply: &[u8]) -> Option<usize> {
    let rest = reply.strip_prefix(b"*")?;
    let end = memchr::memchr(b'\r', rest)?;
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

/// `array` (one whole `*N` reply) with the replies in `inserts` put at their
/// positions (ascending, each an index in the result): EXEC's array with the
/// replies of the commands the proxy answered itself. `None` if `array` is
/// not a whole array.
pub fn splice_array(array: &[u8], inserts: &[(usize, Bytes)]) -> Option<Bytes> {
    let n = array_len(array)?;
    let mut pos = memchr::memchr(b'\n', array)? + 1;
    let total = n + inserts.len();
    let mut out = BytesMut::with_capacity(
        array.len() + 16 + inserts.iter().map(|(_, b)| b.len()).sum::<usize>(),
    );
    out.extend_from_slice(format!("*{total}\r\n").as_bytes());
    let mut inserts = inserts.iter().peekable();
    for i in 0..total {
        if let Some((_, b)) = inserts.next_if(|(at, _)| *at == i) {
            out.extend_from_slice(b);
            continue;
        }
        let elem = scan::ReplyScanner::new().scan(array.get(pos..)?).ok()??;
        out.extend_from_slice(&array[pos..pos + elem.len]);
        pos += elem.len;
    }
    (pos == array.len() && inserts.next().is_none()).then(|| out.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: one large pipelined read left each upstream connection
    /// with a read buffer of its size (about 256 MB seen) for life.
    #[test]
    fn a_read_buffer_shrinks_back_after_a_large_frame() {
        let mut buf = BytesMut::new();
        reserve_for_read(&mut buf);
        buf.extend_from_slice(&vec![b'x'; 32 << 20]);
        reserve_for_read(&mut buf);
        let frame = buf.split_to(buf.len() - 10);
        drop(frame);
        reserve_for_read(&mut buf);
        assert!(buf.capacity() <= 256 * 1024, "{}", buf.capacity());
        assert_eq!(&buf[..], b"xxxxxxxxxx");
    }

    #[test]
    fn splice_exec_arrays() {
        let b = |s: &'static [u8]| Bytes::from_static(s);
        let exec = b"*2\r\n+OK\r\n*2\r\n:1\r\n:2\r\n";
        assert_eq!(array_len(exec), Some(2));
        let got = splice_array(
            exec,
            &[(0, b(b"+A\r\n")), (2, b(b"$1\r\nx\r\n")), (4, b(b":9\r\n"))],
        )
        .unwrap();
        assert_eq!(
            &got[..],
            b"*5\r\n+A\r\n+OK\r\n$1\r\nx\r\n*2\r\n:1\r\n:2\r\n:9\r\n"
        );
        assert_eq!(
            &splice_array(b"*0\r\n", &[(0, b(b"+A\r\n"))]).unwrap()[..],
            b"*1\r\n+A\r\n"
        );
        // Not an array, a short one, or an insert past the end: None.
        assert!(splice_array(b"*-1\r\n", &[]).is_none());
        assert!(splice_array(b"-EXECABORT x\r\n", &[]).is_none());
        assert!(splice_array(b"*2\r\n+OK\r\n", &[]).is_none());
        assert!(splice_array(b"*1\r\n+OK\r\n", &[(5, b(b"+A\r\n"))]).is_none());
    }

    #[test]
    fn encodes_what_the_proxy_says() {
        assert_eq!(
            &command(&[b"AUTH", b"u", b"p"])[..],
            b"*3\r\n$4\r\nAUTH\r\n$1\r\nu\r\n$1\r\np\r\n"
        );
        assert_eq!(&error("ERR a\r\nb")[..], b"-ERR a  b\r\n");
        assert_eq!(&integer(-3)[..], b":-3\r\n");
        assert_eq!(&bulk(b"x")[..], b"$1\r\nx\r\n");
        let m = map(Proto::Resp3, &[("proto", Value::Int(3))]);
        assert_eq!(&m[..], b"%1\r\n$5\r\nproto\r\n:3\r\n");
        let m = map(Proto::Resp2, &[("proto", Value::Int(2))]);
        assert_eq!(&m[..], b"*2\r\n$5\r\nproto\r\n:2\r\n");
        assert_eq!(error_text(b"-WRONGPASS bad\r\n").unwrap(), "WRONGPASS bad");
    }

    #[test]
    fn push_heads_and_confirmations() {
        let m = b">3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$5\r\nhello\r\n";
        assert_eq!(push_head(m), Some((&b"message"[..], Some(&b"news"[..]))));
        let u = b">3\r\n$11\r\nunsubscribe\r\n_\r\n:0\r\n";
        assert_eq!(push_head(u), Some((&b"unsubscribe"[..], None)));
        let empty = b">3\r\n$9\r\nsubscribe\r\n$0\r\n\r\n:1\r\n";
        assert_eq!(push_head(empty), Some((&b"subscribe"[..], Some(&b""[..]))));
        assert_eq!(push_head(b"*3\r\n$7\r\nmessage\r\n"), None);
        assert_eq!(push_head(b">2\r\n:1\r\n:2\r\n"), None);
        // Truncated or lying lengths never read out of bounds.
        assert_eq!(push_head(b">3\r\n$70\r\nmessage\r\n"), None);
        assert_eq!(push_head(b">3\r\n$"), None);
        let pm = b">4\r\n$8\r\npmessage\r\n$1\r\n*\r\n$2\r\nch\r\n$1\r\nx\r\n";
        assert_eq!(pmessage_channel(pm), Some(&b"ch"[..]));
        assert_eq!(
            pmessage_channel(b">4\r\n$8\r\npmessage\r\n$1\r\n*\r\n$9\r\nch"),
            None
        );
        let mut out = BytesMut::new();
        pubsub_confirmation(&mut out, Proto::Resp2, b"subscribe", Some(b"a"), 2);
        pubsub_confirmation(&mut out, Proto::Resp3, b"unsubscribe", None, 0);
        pubsub_confirmation(&mut out, Proto::Resp2, b"punsubscribe", None, 1);
        assert_eq!(
            &out[..],
            &b"*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:2\r\n>3\r\n$11\r\nunsubscribe\r\n_\r\n:0\r\n*3\r\n$12\r\npunsubscribe\r\n$-1\r\n:1\r\n"[..]
        );
    }
}
