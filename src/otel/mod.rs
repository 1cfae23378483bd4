//! OpenTelemetry export over OTLP/HTTP with the JSON encoding, on the proxy's own
//! rustls (ring) reqwest client: the metrics `/metrics` shows, the
//! `db.client.operation.duration` histogram by command name, and spans for token
//! refreshes, upstream connections (open, re-AUTH) and a sample of commands.
//!
//! Hand-written rather than the `opentelemetry-otlp` crates: their HTTP exporter
//! brings its own reqwest (and TLS provider) line, while the OTLP JSON mapping is
//! a stable, documented format that takes a few hundred lines over the client
//! and `serde_json` the proxy already has.
//!
//! Nothing here can slow a command: recording is atomic adds and a `try_send` into
//! a bounded queue (spans beyond it are dropped and counted); the export runs in
//! its own task with a timeout ([`export`]).

pub mod encode;
pub mod export;
pub mod ops;
pub mod settings;

pub use settings::{OtelEnv, Settings};

use encode::{attr_str, SpanRecord};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

/// Spans waiting for export at most; more are dropped.
pub const SPAN_QUEUE: usize = 2048;

/// The recording side, reached through [`crate::metrics::Metrics::otel`].
pub struct Telemetry {
    pub durations: ops::Durations,
    spans: mpsc::Sender<SpanRecord>,
    sample_ratio: f64,
    /// Spans dropped because the queue was full.
    pub dropped_spans: AtomicU64,
}

impl Telemetry {
    /// The recorder and the receiving end of its span queue (for [`export`]).
    pub fn new(sample_ratio: f64) -> (Telemetry, mpsc::Receiver<SpanRecord>) {
        let (tx, rx) = mpsc::channel(SPAN_QUEUE);
        (
            Telemetry {
                durations: ops::Durations::default(),
                spans: tx,
                sample_ratio,
                dropped_spans: AtomicU64::new(0),
            },
            rx,
        )
    }

    /// Queue a finished span, or drop it when the queue is full.
    pub fn span(&self, span: SpanRecord) {
        if self.spans.try_send(span).is_err() {
            self.dropped_spans.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A span of `name` that ran from `start` to now.
    pub fn finished(
        &self,
        name: &'static str,
        kind: u8,
        start: SystemTime,
        attributes: Vec<serde_json::Value>,
        error: Option<String>,
    ) {
        self.span(span_record(
            name,
            kind,
            start,
            SystemTime::now(),
            attributes,
            error,
        ));
    }

    /// `n` commands of `op` answered after `elapsed` (one batch): recorded in
    /// the duration histogram, and a client span when sampled.
    pub fn command_done(&self, op: ops::Op, n: usize, elapsed: Duration, failed: bool) {
        self.durations.record(op, elapsed.as_secs_f64(), n as u64);
        if self.sample_ratio > 0.0 && fastrand::f64() < self.sample_ratio {
            let end = SystemTime::now();
            let start = end.checked_sub(elapsed).unwrap_or(end);
            let mut attributes = vec![
                attr_str("db.system.name", "redis"),
                attr_str("db.operation.name", ops::name(op)),
            ];
            if n > 1 {
                attributes.push(encode::attr_int("db.operation.batch.size", n as i64));
            }
            let error = failed.then(|| "the command failed".to_string());
            self.span(span_record(ops::name(op), 3, start, end, attributes, error));
        }
    }
}

/// Nanoseconds since the Unix epoch.
pub fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// A span with fresh random (non-zero) ids: each is a trace of its own.
pub fn span_record(
    name: &'static str,
    kind: u8,
    start: SystemTime,
    end: SystemTime,
    attributes: Vec<serde_json::Value>,
    error: Option<String>,
) -> SpanRecord {
    SpanRecord {
        trace_id: fastrand::u128(1..).to_be_bytes(),
        span_id: fastrand::u64(1..).to_be_bytes(),
        name,
        kind,
        start_nanos: unix_nanos(start),
        end_nanos: unix_nanos(end),
        attributes,
        error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_sampled_by_ratio() {
        let (all, mut rx) = Telemetry::new(1.0);
        all.command_done(ops::lookup(b"GET"), 3, Duration::from_millis(2), false);
        let s = rx.try_recv().unwrap();
        assert_eq!(s.name, "GET");
        assert_eq!(s.kind, 3);
        assert!(s.end_nanos >= s.start_nanos + 1_000_000);
        assert_eq!(all.durations.snapshot()[0].count, 3);
        let (none, mut rx) = Telemetry::new(0.0);
        for _ in 0..100 {
            none.command_done(ops::OTHER, 1, Duration::ZERO, true);
        }
        assert!(rx.try_recv().is_err());
        assert_eq!(none.durations.snapshot()[0].count, 100);
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let (t, _rx) = Telemetry::new(1.0);
        for _ in 0..SPAN_QUEUE + 5 {
            t.finished("x", 1, SystemTime::now(), vec![], None);
        }
        assert_eq!(t.dropped_spans.load(Ordering::Relaxed), 5);
    }
}
