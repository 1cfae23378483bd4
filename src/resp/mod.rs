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
/// by a few dozen bytes at a time and reads would shrink to match.
pub fn reserve_for_read(buf: &mut BytesMut) {
    const READ_CHUNK: usize = 64 * 1024;
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
