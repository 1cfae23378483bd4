//! The export task: metrics every `otel.metrics_interval`, spans in batches,
//! each POST bounded by `otel.export_timeout`, failures logged at most once a
//! minute. It never holds anything the proxy waits for, and it stops at once on
//! shutdown (what is queued then is dropped).

use super::encode::{self, Origin, SpanRecord};
use super::{unix_nanos, Settings, Telemetry};
use reqwest::Client;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Spans are sent at least this often while any wait.
const SPAN_FLUSH: Duration = Duration::from_secs(2);
/// Or as soon as this many wait.
const SPAN_BATCH: usize = 512;
/// After a failed span export, spans are dropped unencoded for this long at
/// first, doubling up to [`PAUSE_MAX`].
const PAUSE_MIN: Duration = Duration::from_secs(2);
const PAUSE_MAX: Duration = Duration::from_secs(60);
/// At most one warning per this long.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// The HTTP client: rustls with the ring provider and the system roots, no
/// redirects, no proxy variables, every request bounded by `timeout`.
pub fn client(timeout: Duration) -> Result<Client, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup for the OTLP endpoint: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Client::builder()
        .use_preconfigured_tls(tls)
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(timeout.min(Duration::from_secs(5)))
        .timeout(timeout)
        .user_agent(concat!("redis-entra-proxy/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("HTTP client for the OTLP endpoint: {e}"))
}

/// One signal's failures, reported at most once per [`WARN_EVERY`].
#[derive(Default)]
struct Failures {
    last_warn: Option<Instant>,
    since_warn: u64,
    ok_once: bool,
}

impl Failures {
    fn failed(&mut self, what: &str, url: &str, reason: &str) {
        self.since_warn += 1;
        let now = Instant::now();
        if self
            .last_warn
            .is_none_or(|t| now.duration_since(t) >= WARN_EVERY)
        {
            warn!(
                failures = self.since_warn,
                "OpenTelemetry export of {what} to {url} failed: {reason} (next report in a minute at most)"
            );
            self.last_warn = Some(now);
            self.since_warn = 0;
        }
    }

    fn ok(&mut self, what: &str, url: &str) {
        if !self.ok_once {
            self.ok_once = true;
            info!("OpenTelemetry: exporting {what} to {url}");
        }
    }
}

async fn post(
    client: &Client,
    url: &str,
    headers: &[(String, String)],
    body: Vec<u8>,
) -> Result<(), String> {
    let mut req = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json");
    for (k, v) in headers {
        req = req.header(k.as_str(), v.as_str());
    }
    let resp = req.body(body).send().await.map_err(|e| {
        if e.is_timeout() {
            "timed out".to_string()
        } else if e.is_connect() {
            "cannot connect".to_string()
        } else {
            "request failed".to_string()
        }
    })?;
    let status = resp.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("the collector answered HTTP {}", status.as_u16()))
    }
}

/// Run the exporter until `shutdown`. `render` gives the Prometheus text of
/// `/metrics`. Metrics and spans go out independently: a collector that hangs
/// on one does not hold up the other.
pub async fn run(
    settings: Settings,
    telemetry: Arc<Telemetry>,
    spans: mpsc::Receiver<SpanRecord>,
    render: Box<dyn Fn() -> String + Send + Sync>,
    shutdown: CancellationToken,
) {
    let client = match client(settings.export_timeout) {
        Ok(c) => c,
        Err(e) => {
            warn!("OpenTelemetry export is off: {e}");
            return;
        }
    };
    let origin = Origin {
        service_name: settings.service_name.clone(),
        service_version: env!("CARGO_PKG_VERSION"),
        instance_id: format!("{:032x}", fastrand::u128(..)),
    };
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = async {
            tokio::join!(
                metrics_loop(&settings, &client, &origin, &telemetry, &*render),
                spans_loop(&settings, &client, &origin, &telemetry, spans),
            )
        } => {}
    }
}

async fn metrics_loop(
    settings: &Settings,
    client: &Client,
    origin: &Origin,
    telemetry: &Telemetry,
    render: &(dyn Fn() -> String + Send + Sync),
) {
    let start = unix_nanos(SystemTime::now());
    let mut failures = Failures::default();
    let mut tick = tokio::time::interval(settings.metrics_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let now = unix_nanos(SystemTime::now());
        let mut metrics: Vec<_> = encode::parse_exposition(&render())
            .iter()
            .filter_map(|f| encode::family_metric(f, start, now))
            .collect();
        metrics.extend(encode::operation_duration(
            &telemetry.durations.snapshot(),
            start,
            now,
        ));
        let body =
            serde_json::to_vec(&encode::metrics_request(origin, metrics)).unwrap_or_default();
        let url = &settings.metrics_url;
        match post(client, url, &settings.metrics_headers, body).await {
            Ok(()) => failures.ok("metrics", url),
            Err(e) => failures.failed("metrics", url, &e),
        }
    }
}

async fn spans_loop(
    settings: &Settings,
    client: &Client,
    origin: &Origin,
    telemetry: &Telemetry,
    mut spans: mpsc::Receiver<SpanRecord>,
) {
    let mut failures = Failures::default();
    // After a failed export, spans are dropped without being encoded until
    // this time (the pause doubling up to a minute): a dead collector costs
    // no encoding.
    let mut down_until: Option<Instant> = None;
    let mut pause = PAUSE_MIN;
    let mut flush = tokio::time::interval(SPAN_FLUSH);
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch: Vec<SpanRecord> = Vec::new();
    loop {
        let send = tokio::select! {
            n = spans.recv_many(&mut batch, SPAN_BATCH) => {
                if n == 0 {
                    // The sender lives in the telemetry the exporter holds: not reached.
                    return;
                }
                batch.len() >= SPAN_BATCH
            }
            _ = flush.tick() => !batch.is_empty(),
        };
        if send && down_until.is_some_and(|t| Instant::now() < t) {
            telemetry
                .dropped_spans
                .fetch_add(batch.len() as u64, std::sync::atomic::Ordering::Relaxed);
            batch.clear();
        } else if send {
            let body =
                serde_json::to_vec(&encode::traces_request(origin, &batch)).unwrap_or_default();
            batch.clear();
            let url = &settings.traces_url;
            match post(client, url, &settings.traces_headers, body).await {
                Ok(()) => {
                    failures.ok("traces", url);
                    down_until = None;
                    pause = PAUSE_MIN;
                }
                Err(e) => {
                    failures.failed("traces", url, &e);
                    down_until = Some(Instant::now() + pause);
                    pause = (pause * 2).min(PAUSE_MAX);
                }
            }
        }
    }
}
