//! Micro-benchmarks of what every command crosses, so that a regression shows
//! without a load run (`cargo bench --bench hot_path`): the client-command
//! scanner over a pipelined burst (what `redis-benchmark -P 16` sends), the
//! routing table, and the reply path (the reply scanner over a burst of
//! replies, each split off as the connection task hands it out, and the
//! write queue that gathers them into one socket write).

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use redis_entra_proxy::command::classify;
use redis_entra_proxy::resp::command;
use redis_entra_proxy::resp::scan::{CommandScanner, Limits, ReplyScanner};
use redis_entra_proxy::write_queue::WriteQueue;
use std::hint::black_box;
use std::pin::Pin;
use std::task::{Context, Waker};

const LIMITS: Limits = Limits {
    max_bulk_bytes: 512 * 1024 * 1024,
    max_line_bytes: 64 * 1024,
    max_elements: 1024 * 1024,
};

fn burst(one: &[u8], n: usize) -> Vec<u8> {
    one.repeat(n)
}

fn scanner(c: &mut Criterion) {
    let mut g = c.benchmark_group("scan_commands");
    for (name, one) in [
        ("set_3b", command(&[b"SET", b"key:000000000042", b"xxx"])),
        ("get", command(&[b"GET", b"key:000000000042"])),
        (
            "set_1kb",
            command(&[b"SET", b"key:000000000042", &[b'x'; 1024]]),
        ),
    ] {
        let buf = burst(&one, 16);
        g.throughput(Throughput::Elements(16));
        g.bench_with_input(BenchmarkId::new("burst_of_16", name), &buf, |b, buf| {
            let mut s = CommandScanner::new(LIMITS);
            b.iter(|| {
                let mut at = 0;
                while let Some(cmd) = s.scan(&buf[at..]).expect("valid") {
                    black_box(cmd.args.len());
                    at += cmd.len;
                }
                at
            })
        });
    }
    g.finish();
}

fn routing(c: &mut Criterion) {
    let mut g = c.benchmark_group("classify");
    let cases: [(&str, &[&[u8]]); 5] = [
        ("set", &[b"SET", b"k", b"v"]),
        ("get_lower", &[b"get", b"k"]),
        ("multi", &[b"MULTI"]),
        ("client_setname", &[b"CLIENT", b"SETNAME", b"app"]),
        (
            "xread_block",
            &[b"XREAD", b"BLOCK", b"0", b"STREAMS", b"s", b"$"],
        ),
    ];
    for (name, args) in cases {
        g.bench_function(name, |b| b.iter(|| classify(black_box(args))));
    }
    g.finish();
}

/// A writer that takes everything at once, like a socket with room.
struct Sink;
impl tokio::io::AsyncWrite for Sink {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::task::Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

fn replies(c: &mut Criterion) {
    let mut g = c.benchmark_group("reply_path");
    for (name, one) in [
        ("ok", b"+OK\r\n".to_vec()),
        ("bulk_3b", b"$3\r\nxxx\r\n".to_vec()),
        (
            "bulk_1kb",
            [b"$1024\r\n".as_slice(), &[b'x'; 1024], b"\r\n"].concat(),
        ),
    ] {
        let input = burst(&one, 16);
        g.throughput(Throughput::Elements(16));
        // The connection's side: scan the read buffer, split each reply off.
        g.bench_with_input(
            BenchmarkId::new("scan_and_split_16", name),
            &input,
            |b, input| {
                let mut s = ReplyScanner::new();
                let mut rbuf = BytesMut::with_capacity(64 * 1024);
                b.iter(|| {
                    rbuf.extend_from_slice(input);
                    let mut n = 0;
                    while let Some(r) = s.scan(&rbuf).expect("valid") {
                        let reply: Bytes = rbuf.split_to(r.len).freeze();
                        n += black_box(reply).len();
                    }
                    n
                })
            },
        );
        // The client's side: queue each reply, write them in one go.
        let parts: Vec<Bytes> = (0..16).map(|_| Bytes::from(one.clone())).collect();
        g.bench_with_input(
            BenchmarkId::new("queue_and_write_16", name),
            &parts,
            |b, parts| {
                let mut q = WriteQueue::new(64 * 1024);
                let mut cx = Context::from_waker(Waker::noop());
                b.iter(|| {
                    for p in parts {
                        q.push(p.clone());
                    }
                    let r = q.poll_write(Pin::new(&mut Sink), &mut cx);
                    assert!(r.is_ready());
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, scanner, routing, replies);
criterion_main!(benches);
