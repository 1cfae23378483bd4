//! Load generator for the workloads redis-benchmark cannot express: run by
//! `bench/run.sh` (a Cargo example, `cargo run --release --example bench_load`).
//!
//! - `tx` / `mixed`: several clients each loop over a transaction
//!   (`MULTI; INCR; SET; EXEC` in one write, as client libraries pipeline it)
//!   and, in `mixed`, one plain `GET` after each; prints transactions/s.
//!   `get` loops over the `GET` alone (loops/s), the plain path to compare with.
//!   `watch` is optimistic locking: `WATCH k`, `GET k`, then
//!   `MULTI; SET k; EXEC` in one write (transactions/s; one whose EXEC
//!   answers anything but a one-element array counts as an error);
//!   `watch-mixed` adds a plain `GET` after each, as a pooled connection
//!   serves both.
//! - `idle`: opens many connections (each answers one `PING`), keeps them open
//!   with a light load (one `GET` every 10 ms on one of them in turn), prints
//!   `ready` once all are open and `done` after they are closed.
//! - `fanout`: many subscribers of one channel and one publisher; prints
//!   deliveries/s (messages received by all subscribers per second).
//!
//! Every loop is bounded by a count and by `--seconds`. Loopback only: the
//! address must be 127.0.0.1 or [::1]. With `--tls CA` it speaks TLS (server name
//! `localhost`); `--user U` with the password in `$BENCH_PASS` sends
//! `AUTH` first (the password is never printed).

mod client;

use client::{tls, Client, Res};
use redis_entra_proxy::resp::command;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Opts {
    mode: String,
    addr: SocketAddr,
    tls: Option<Arc<tokio_rustls::TlsConnector>>,
    user: Option<String>,
    clients: usize,
    seconds: f64,
    max_ops: u64,
    value: usize,
}

fn parse() -> Result<Opts, String> {
    let mut it = std::env::args().skip(1);
    let mode = it
        .next()
        .ok_or("usage: bench_load tx|mixed|get|watch|watch-mixed|idle|fanout --addr H:P ...")?;
    let mut o = Opts {
        mode,
        addr: "127.0.0.1:6379".parse().expect("literal"),
        tls: None,
        user: None,
        clients: 8,
        seconds: 5.0,
        max_ops: 1_000_000,
        value: 16,
    };
    while let Some(flag) = it.next() {
        let mut v = || it.next().ok_or(format!("{flag} wants a value"));
        match flag.as_str() {
            "--addr" => o.addr = v()?.parse().map_err(|e| format!("--addr: {e}"))?,
            "--tls" => o.tls = Some(Arc::new(tls(&v()?)?)),
            "--user" => o.user = Some(v()?),
            "--clients" => o.clients = v()?.parse().map_err(|e| format!("--clients: {e}"))?,
            "--seconds" => o.seconds = v()?.parse().map_err(|e| format!("--seconds: {e}"))?,
            "--max-ops" => o.max_ops = v()?.parse().map_err(|e| format!("--max-ops: {e}"))?,
            "--value" => o.value = v()?.parse().map_err(|e| format!("--value: {e}"))?,
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if !o.addr.ip().is_loopback() {
        return Err("loopback addresses only".into());
    }
    Ok(o)
}

/// What one loop of [`transactions`] sends.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Loop {
    /// `MULTI; INCR; SET; EXEC` in one write.
    Tx,
    /// The same, then a `GET`.
    Mixed,
    /// A `GET` alone (the plain path, for comparison).
    Get,
    /// Optimistic locking: `WATCH k`, `GET k`, then `MULTI; SET k; EXEC`
    /// in one write, each step waiting for its replies.
    Watch,
    /// The same, then a plain `GET` (no WATCH before it).
    WatchMixed,
}

async fn transactions(o: Arc<Opts>, kind: Loop) -> Res<()> {
    let deadline = Instant::now() + Duration::from_secs_f64(o.seconds);
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..o.clients {
        let (o, done, errors) = (o.clone(), done.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = Client::open(o.addr, o.tls.as_ref(), o.user.as_deref()).await?;
            let key = format!("bench:tx:{i}");
            let value = vec![b'x'; o.value];
            let mut tx = Vec::new();
            tx.extend_from_slice(&command(&[b"MULTI"]));
            tx.extend_from_slice(&command(&[b"INCR", format!("{key}:n").as_bytes()]));
            tx.extend_from_slice(&command(&[b"SET", key.as_bytes(), &value]));
            tx.extend_from_slice(&command(&[b"EXEC"]));
            let get = command(&[b"GET", key.as_bytes()]);
            let watch = command(&[b"WATCH", key.as_bytes()]);
            let mut set_tx = Vec::new();
            set_tx.extend_from_slice(&command(&[b"MULTI"]));
            set_tx.extend_from_slice(&command(&[b"SET", key.as_bytes(), &value]));
            set_tx.extend_from_slice(&command(&[b"EXEC"]));
            while Instant::now() < deadline && done.load(Ordering::Relaxed) < o.max_ops {
                if matches!(kind, Loop::Watch | Loop::WatchMixed) {
                    let ok = c.call(&watch, 1).await?.starts_with(b"+OK")
                        && !c.call(&get, 1).await?.starts_with(b"-")
                        && c.call(&set_tx, 3).await?.starts_with(b"*1");
                    let ok =
                        ok && (kind == Loop::Watch || !c.call(&get, 1).await?.starts_with(b"-"));
                    if !ok {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if kind != Loop::Get {
                    let exec = c.call(&tx, 4).await?;
                    if !exec.starts_with(b"*2") {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                if kind != Loop::Tx {
                    let r = c.call(&get, 1).await?;
                    if r.starts_with(b"-") {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            Res::Ok(())
        }));
    }
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    let secs = start.elapsed().as_secs_f64();
    let n = done.load(Ordering::Relaxed);
    println!(
        "transactions={n} seconds={secs:.3} tx_per_s={:.0} errors={}",
        n as f64 / secs,
        errors.load(Ordering::Relaxed)
    );
    Ok(())
}

async fn idle(o: Arc<Opts>) -> Res<()> {
    let mut conns = Vec::with_capacity(o.clients);
    let ping = command(&[b"PING"]);
    // Opened a few hundred at a time: a burst of that many at once is what
    // an app fleet restarting looks like, and it keeps the accept queue short.
    for chunk in (0..o.clients).collect::<Vec<_>>().chunks(200) {
        let opened = futures_join(chunk.iter().map(|_| {
            let o = o.clone();
            let ping = ping.clone();
            async move {
                let mut c = Client::open(o.addr, o.tls.as_ref(), o.user.as_deref()).await?;
                c.call(&ping, 1).await?;
                Res::Ok(c)
            }
        }))
        .await;
        for c in opened {
            conns.push(c?);
        }
    }
    println!("ready clients={}", conns.len());
    let deadline = Instant::now() + Duration::from_secs_f64(o.seconds);
    let get = command(&[b"GET", b"bench:idle"]);
    let (mut i, mut ops, mut errors) = (0usize, 0u64, 0u64);
    while Instant::now() < deadline && ops < o.max_ops {
        let c = &mut conns[i % o.clients];
        if c.call(&get, 1).await?.starts_with(b"-") {
            errors += 1;
        }
        i += 7919; // a prime: visits the clients in a scattered order
        ops += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(conns);
    println!("done ops={ops} errors={errors}");
    Ok(())
}

/// Await futures concurrently (spawned, so TLS handshakes overlap).
async fn futures_join<F, T>(futs: impl Iterator<Item = F>) -> Vec<T>
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.expect("task panicked"));
    }
    out
}

async fn fanout(o: Arc<Opts>) -> Res<()> {
    let messages = o.max_ops;
    let channel = b"bench:fanout";
    let sub = command(&[b"SUBSCRIBE", channel]);
    let received = Arc::new(AtomicU64::new(0));
    let mut subs = Vec::new();
    for chunk in (0..o.clients).collect::<Vec<_>>().chunks(200) {
        let opened = futures_join(chunk.iter().map(|_| {
            let o = o.clone();
            let sub = sub.clone();
            async move {
                let mut c = Client::open(o.addr, o.tls.as_ref(), o.user.as_deref()).await?;
                c.call(&sub, 1).await?;
                Res::Ok(c)
            }
        }))
        .await;
        for c in opened {
            subs.push(c?);
        }
    }
    let deadline = Instant::now() + Duration::from_secs_f64(o.seconds);
    let mut tasks = Vec::new();
    for mut c in subs {
        let received = received.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = 0;
            while got < messages {
                match tokio::time::timeout_at(deadline.into(), c.replies(1)).await {
                    Ok(Ok(_)) => {
                        got += 1;
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => break,
                }
            }
        }));
    }
    let mut publisher = Client::open(o.addr, o.tls.as_ref(), o.user.as_deref()).await?;
    let payload = vec![b'm'; o.value];
    let publish = command(&[b"PUBLISH", channel, &payload]);
    let start = Instant::now();
    // Batches of 10 published messages, each batch waiting for its replies.
    let mut batch = Vec::new();
    for _ in 0..10 {
        batch.extend_from_slice(&publish);
    }
    let mut sent = 0;
    while sent < messages && Instant::now() < deadline {
        let n = (messages - sent).min(10);
        publisher
            .call(&batch[..publish.len() * n as usize], n as usize)
            .await?;
        sent += n;
    }
    for t in tasks {
        let _ = t.await;
    }
    let secs = start.elapsed().as_secs_f64();
    let got = received.load(Ordering::Relaxed);
    println!(
        "published={sent} subscribers={} delivered={got} expected={} seconds={secs:.3} deliveries_per_s={:.0}",
        o.clients,
        sent * o.clients as u64,
        got as f64 / secs
    );
    Ok(())
}

#[tokio::main]
async fn main() {
    let o = match parse() {
        Ok(o) => Arc::new(o),
        Err(e) => {
            eprintln!("bench_load: {e}");
            std::process::exit(64);
        }
    };
    let r = match o.mode.as_str() {
        "tx" => transactions(o, Loop::Tx).await,
        "mixed" => transactions(o, Loop::Mixed).await,
        "get" => transactions(o, Loop::Get).await,
        "watch" => transactions(o, Loop::Watch).await,
        "watch-mixed" => transactions(o, Loop::WatchMixed).await,
        "idle" => idle(o).await,
        "fanout" => fanout(o).await,
        m => Err(format!("unknown mode {m}")),
    };
    if let Err(e) = r {
        eprintln!("bench_load: {e}");
        std::process::exit(1);
    }
}
