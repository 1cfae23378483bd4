//! Logging: tracing's fmt layer (text or JSON) on stderr, set up so that nothing
//! the log output does can stop the proxy, and so that no kind of line can flood it.
//!
//! - [`LogSink`]: lines go to a writer thread through a queue bounded in bytes. A
//!   closed pipe (the log shipper died) makes writes fail, and the failure is
//!   ignored; a pipe nobody reads makes the writer thread wait, and lines past the
//!   bound are dropped and counted instead of blocking the runtime's threads. The
//!   fmt layer's own error report (an `eprintln!`, which panics on a closed stderr)
//!   is turned off.
//! - [`RateLimit`]: a layer that lets through at most `log.max_per_minute` lines of
//!   each kind (each `tracing` call site) per minute, with that many in a burst, and
//!   says how many it dropped: before the next line of that kind, or within a minute
//!   when the kind has gone quiet. An outage's reconnect warnings therefore cost a
//!   few lines a minute per pod, not two a second. Debug and trace lines, asked for
//!   explicitly, are never dropped.

use crate::config::LogFormat;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::callsite::Identifier;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;

/// Bytes of log lines waiting for the writer thread beyond which lines are dropped.
pub const MAX_QUEUED_BYTES: usize = 1024 * 1024;
/// Target of the lines this module writes about itself (never rate-limited).
const TARGET: &str = "redis_entra_proxy::logging";
/// Longest message quoted in a "dropped" line.
const MAX_QUOTED_CHARS: usize = 160;

/// Install the global subscriber: `level` (a tracing filter), `format`, and at most
/// `max_per_minute` lines of one kind per minute (0: no limit). Keep the returned
/// sink to [`LogSink::flush`] it before the process exits.
pub fn init(format: LogFormat, level: &str, max_per_minute: u32) -> LogSink {
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let sink = LogSink::spawn(std::io::stderr());
    // Colours only on a terminal: a log file or journal gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(sink.clone())
        .with_ansi(ansi)
        .log_internal_errors(false);
    let limit = RateLimit::new(max_per_minute);
    limit.spawn_reporter();
    let registry = tracing_subscriber::registry().with(filter).with(limit);
    match format {
        LogFormat::Json => registry.with(fmt.json().flatten_event(true)).init(),
        LogFormat::Text => registry.with(fmt).init(),
    }
    sink
}

/// Write one line to stderr, ignoring failure (a closed stderr must not panic, as
/// `eprintln!` does). For messages before logging is set up.
pub fn stderr_line(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

enum Msg {
    Line(Vec<u8>),
    Flush(mpsc::Sender<()>),
}

/// A `MakeWriter` whose writes never block and never fail: each formatted line is
/// queued for a writer thread (see the module docs). Cheap to clone.
#[derive(Clone)]
pub struct LogSink {
    tx: mpsc::Sender<Msg>,
    queued: Arc<AtomicUsize>,
    dropped: Arc<AtomicU64>,
}

impl LogSink {
    /// Start the writer thread over `out`.
    pub fn spawn<W: Write + Send + 'static>(mut out: W) -> LogSink {
        let (tx, rx) = mpsc::channel::<Msg>();
        let queued = Arc::new(AtomicUsize::new(0));
        let dropped = Arc::new(AtomicU64::new(0));
        let (q, d) = (queued.clone(), dropped.clone());
        let spawned = std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || {
                while let Ok(msg) = rx.recv() {
                    match msg {
                        Msg::Line(line) => {
                            // A closed pipe fails every write: ignored, the lines
                            // are lost, the proxy carries on.
                            let _ = out.write_all(&line);
                            q.fetch_sub(line.len(), Ordering::AcqRel);
                            let n = d.swap(0, Ordering::AcqRel);
                            if n > 0 {
                                tracing::warn!(
                                    target: TARGET,
                                    dropped = n,
                                    "{n} log lines dropped: the log output did not keep up"
                                );
                            }
                        }
                        Msg::Flush(done) => {
                            let _ = out.flush();
                            let _ = done.send(());
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            stderr_line(&format!(
                "redis-entra-proxy: cannot start the log writer thread: {e}"
            ));
        }
        LogSink {
            tx,
            queued,
            dropped,
        }
    }

    fn push(&self, line: &[u8]) {
        let len = line.len();
        let before = self.queued.fetch_add(len, Ordering::AcqRel);
        if before + len > MAX_QUEUED_BYTES || self.tx.send(Msg::Line(line.to_vec())).is_err() {
            self.queued.fetch_sub(len, Ordering::AcqRel);
            self.dropped.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Wait up to `limit` for the lines queued so far to be written. Returns whether
    /// they were.
    pub fn flush(&self, limit: Duration) -> bool {
        let (done, wait) = mpsc::channel();
        if self.tx.send(Msg::Flush(done)).is_err() {
            return false;
        }
        wait.recv_timeout(limit).is_ok()
    }

    /// Lines dropped since the writer thread last reported (for tests).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Acquire)
    }
}

impl Write for &LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for LogSink {
    type Writer = &'a LogSink;

    fn make_writer(&'a self) -> Self::Writer {
        self
    }
}

/// Per-kind token buckets: see the module docs. Cheap to clone (shared state).
#[derive(Clone)]
pub struct RateLimit {
    inner: Arc<Limiter>,
}

/// The decision for one line.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    /// Write it; first say that `dropped` lines of its kind were dropped (quoting
    /// the first of them), if any were.
    Pass(Option<Dropped>),
    /// Drop it (counted).
    Drop,
}

/// Lines of one kind that were dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    pub count: u64,
    /// Where the kind is logged from (`module:line`).
    pub kind: String,
    /// The first dropped line's message.
    pub first: String,
    pub level: Level,
}

struct Limiter {
    per_minute: u32,
    kinds: Mutex<HashMap<Identifier, Bucket>>,
}

struct Bucket {
    tokens: f64,
    refilled: Instant,
    dropped: u64,
    first: String,
    kind: String,
    level: Level,
}

impl RateLimit {
    /// At most `per_minute` lines of one kind per minute; 0 turns the limit off.
    pub fn new(per_minute: u32) -> RateLimit {
        RateLimit {
            inner: Arc::new(Limiter {
                per_minute,
                kinds: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Decide on one line of kind `id` at `now`. `describe` gives (kind, message,
    /// level) and is called only when the line is the first one dropped since the
    /// kind last passed.
    pub fn admit(
        &self,
        id: Identifier,
        now: Instant,
        describe: impl FnOnce() -> (String, String, Level),
    ) -> Admit {
        let limit = self.inner.per_minute;
        if limit == 0 {
            return Admit::Pass(None);
        }
        let burst = f64::from(limit);
        let mut kinds = self.inner.kinds.lock().unwrap_or_else(|e| e.into_inner());
        let bucket = kinds.entry(id).or_insert_with(|| Bucket {
            tokens: burst,
            refilled: now,
            dropped: 0,
            first: String::new(),
            kind: String::new(),
            level: Level::INFO,
        });
        let elapsed = now.saturating_duration_since(bucket.refilled);
        bucket.tokens = (bucket.tokens + elapsed.as_secs_f64() * burst / 60.0).min(burst);
        bucket.refilled = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Admit::Pass(take_dropped(bucket))
        } else {
            if bucket.dropped == 0 {
                (bucket.kind, bucket.first, bucket.level) = describe();
            }
            bucket.dropped += 1;
            Admit::Drop
        }
    }

    /// Every kind with dropped lines not yet reported: its count, reset to zero.
    pub fn take_pending(&self) -> Vec<Dropped> {
        let mut kinds = self.inner.kinds.lock().unwrap_or_else(|e| e.into_inner());
        kinds.values_mut().filter_map(take_dropped).collect()
    }

    /// Report quiet kinds' dropped lines once a minute, from a thread of its own
    /// (logging works before and after the tokio runtime).
    fn spawn_reporter(&self) {
        if self.inner.per_minute == 0 {
            return;
        }
        let me = self.clone();
        let _ = std::thread::Builder::new()
            .name("log-rate-limit".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_secs(60));
                for d in me.take_pending() {
                    me.report(&d);
                }
            });
    }

    fn report(&self, d: &Dropped) {
        let per_minute = self.inner.per_minute;
        macro_rules! say {
            ($mac:ident) => {
                tracing::$mac!(
                    target: TARGET,
                    dropped = d.count,
                    kind = %d.kind,
                    "{} more log lines like this were dropped (log.max_per_minute = {per_minute}): {}",
                    d.count,
                    d.first
                )
            };
        }
        match d.level {
            Level::ERROR => say!(error),
            Level::WARN => say!(warn),
            _ => say!(info),
        }
    }
}

fn take_dropped(bucket: &mut Bucket) -> Option<Dropped> {
    if bucket.dropped == 0 {
        return None;
    }
    let count = std::mem::take(&mut bucket.dropped);
    Some(Dropped {
        count,
        kind: std::mem::take(&mut bucket.kind),
        first: std::mem::take(&mut bucket.first),
        level: bucket.level,
    })
}

impl<S: Subscriber> Layer<S> for RateLimit {
    fn event_enabled(&self, event: &Event<'_>, _cx: Context<'_, S>) -> bool {
        let meta = event.metadata();
        if *meta.level() > Level::INFO || meta.target() == TARGET {
            return true;
        }
        let describe = || {
            let kind = format!(
                "{}:{}",
                meta.module_path().unwrap_or(meta.target()),
                meta.line().unwrap_or(0)
            );
            let mut visitor = MessageVisitor(String::new());
            event.record(&mut visitor);
            (kind, visitor.0, *meta.level())
        };
        match self.admit(meta.callsite(), Instant::now(), describe) {
            Admit::Drop => false,
            Admit::Pass(None) => true,
            Admit::Pass(Some(d)) => {
                // The lock is released: this line goes through the whole stack.
                self.report(&d);
                true
            }
        }
    }
}

/// Takes an event's message, shortened, on one line.
struct MessageVisitor(String);

impl Visit for MessageVisitor {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let mut text = String::new();
            let _ = write!(text, "{value:?}");
            self.0 = text
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .take(MAX_QUOTED_CHARS)
                .collect();
        }
    }
}

#[cfg(test)]
mod tests;
