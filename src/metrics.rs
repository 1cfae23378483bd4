//! Prometheus metrics. One [`Metrics`] is created at start-up and shared (`Arc`) by
//! the listener, sessions, upstream connections and the rotator; `admin` renders it
//! on `/metrics`. Hot-path counters are resolved once here, so recording is one
//! atomic add with no label lookup.

use crate::acceptance::{Acceptance, Refusal};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

type Labels = Vec<(&'static str, &'static str)>;

/// Where a command went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Local,
    Shared,
    Pinned,
    PubSub,
}

/// What went wrong, for `redis_entra_proxy_errors_total{kind}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Malformed client input.
    Protocol,
    /// A client exceeded a configured limit.
    Limit,
    /// A client gave the wrong local password.
    ClientAuth,
    /// No usable upstream credential (waiting for the first token, or expired).
    NoCredential,
    /// Could not connect or authenticate upstream.
    UpstreamConnect,
    /// An upstream connection dropped with commands in flight.
    UpstreamLost,
    /// Too many pinned sessions.
    PinnedLimit,
}

pub struct Metrics {
    registry: Registry,
    pub clients_current: Gauge,
    pub clients_total: Counter,
    pub clients_rejected: Counter,
    commands: [Counter; 4],
    errors: Family<Labels, Counter>,
    pub upstream_connections: Family<Labels, Gauge>,
    pub upstream_reconnects: Counter,
    pub pinned_sessions: Gauge,
    pub pubsub_channels: Gauge,
    pub bytes_in: Counter,
    pub bytes_out: Counter,
    pub command_latency: Histogram,
    /// Time each token fetch took, whatever its outcome.
    pub token_refresh_latency: Histogram,
    token_expiry: Arc<TokenExpiry>,
    /// 1 while `/readyz` would answer 200, set by `admin` at each scrape.
    pub ready: Gauge,
    pub token_refreshes: Family<Labels, Counter>,
    pub reauths: Family<Labels, Counter>,
    /// What the cache answered to the proxy's own AUTHs (rendered from it).
    pub acceptance: Arc<Acceptance>,
    /// 1 when `upstream.tls_insecure_skip_verify` is on.
    pub tls_insecure: Gauge,
    /// Commands that waited for a shared connection being re-established
    /// and then went out on it.
    pub upstream_held: Counter,
    /// How long each of those waited.
    pub upstream_hold_seconds: Histogram,
    /// Commands that left the hold without being sent, by reason.
    pub upstream_hold_dropped: Family<Labels, Counter>,
    /// Read-only commands in flight on a lost connection, sent again.
    pub upstream_resent: Counter,
    /// Dials to a cluster node (of a dedicated connection, or of a shared
    /// one with commands waiting for it) given up because the map named
    /// another owner of the commands' slots (a frozen node).
    pub cluster_dials_abandoned: Counter,
    /// Azure maintenance notices by notice and the action taken.
    pub maintenance_notices: Family<Labels, Counter>,
    /// OpenTelemetry recording, when export is on (`otel.enabled`).
    otel: std::sync::OnceLock<Arc<crate::otel::Telemetry>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("redis_entra_proxy");
        let clients_current = Gauge::default();
        registry.register(
            "client_connections",
            "Client connections open now",
            clients_current.clone(),
        );
        let clients_total = Counter::default();
        registry.register(
            "client_connections_accepted",
            "Client connections accepted",
            clients_total.clone(),
        );
        let clients_rejected = Counter::default();
        registry.register(
            "client_connections_rejected",
            "Client connections refused (max_clients, shutdown)",
            clients_rejected.clone(),
        );
        let commands_family = Family::<Labels, Counter>::default();
        registry.register(
            "commands",
            "Client commands by routing class",
            commands_family.clone(),
        );
        let commands = ["local", "shared", "pinned", "pubsub"]
            .map(|r| commands_family.get_or_create(&vec![("route", r)]).clone());
        let errors = Family::<Labels, Counter>::default();
        registry.register("errors", "Errors by kind", errors.clone());
        let upstream_connections = Family::<Labels, Gauge>::default();
        registry.register(
            "upstream_connections",
            "Upstream connections by kind and state",
            upstream_connections.clone(),
        );
        let upstream_reconnects = Counter::default();
        registry.register(
            "upstream_reconnects",
            "Upstream connections re-established after a failure",
            upstream_reconnects.clone(),
        );
        let pinned_sessions = Gauge::default();
        registry.register(
            "pinned_sessions",
            "Clients pinned to a dedicated upstream connection",
            pinned_sessions.clone(),
        );
        let pubsub_channels = Gauge::default();
        registry.register(
            "pubsub_channels",
            "Channels and patterns subscribed upstream",
            pubsub_channels.clone(),
        );
        let bytes_in = Counter::default();
        registry.register(
            "client_received_bytes",
            "Bytes received from clients",
            bytes_in.clone(),
        );
        let bytes_out = Counter::default();
        registry.register(
            "client_sent_bytes",
            "Bytes sent to clients",
            bytes_out.clone(),
        );
        let command_latency = Histogram::new([
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            5.0,
        ]);
        registry.register(
            "command_duration_seconds",
            "Time from a client command's arrival to its reply being queued for the client",
            command_latency.clone(),
        );
        let token_refresh_latency = Histogram::new([
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        ]);
        registry.register(
            "token_refresh_duration_seconds",
            "Time each token fetch took (one request or one CLI run), whatever its outcome",
            token_refresh_latency.clone(),
        );
        let token_expiry = Arc::new(TokenExpiry::default());
        registry.register_collector(Box::new(token_expiry.clone()));
        let ready = Gauge::default();
        registry.register(
            "ready",
            "1 while the proxy is ready (what /readyz answers at scrape time), else 0",
            ready.clone(),
        );
        let build_info = Family::<Labels, Gauge>::default();
        registry.register(
            "build_info",
            "Always 1; the version label says which build is running",
            build_info.clone(),
        );
        build_info
            .get_or_create(&vec![("version", env!("CARGO_PKG_VERSION"))])
            .set(1);
        let token_refreshes = Family::<Labels, Counter>::default();
        registry.register(
            "token_refreshes",
            "Token fetches by outcome and reason",
            token_refreshes.clone(),
        );
        let reauths = Family::<Labels, Counter>::default();
        registry.register(
            "reauths",
            "Re-AUTHs of live upstream connections by outcome",
            reauths.clone(),
        );
        let tls_insecure = Gauge::default();
        registry.register(
            "upstream_tls_insecure",
            "1 when the upstream certificate is not verified (upstream.tls_insecure_skip_verify), else 0",
            tls_insecure.clone(),
        );
        let acceptance = Arc::new(Acceptance::new());
        registry.register_collector(Box::new(AcceptanceMetrics(acceptance.clone())));
        let upstream_held = Counter::default();
        registry.register(
            "upstream_held",
            "Commands that waited for a shared upstream connection being re-established, then were sent on it",
            upstream_held.clone(),
        );
        let upstream_hold_seconds =
            Histogram::new([0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0]);
        registry.register(
            "upstream_hold_seconds",
            "How long each held command waited for its connection",
            upstream_hold_seconds.clone(),
        );
        let upstream_hold_dropped = Family::<Labels, Counter>::default();
        registry.register(
            "upstream_hold_dropped",
            "Held commands failed without being sent: expired (upstream.hold passed) or full (the hold queue's bound)",
            upstream_hold_dropped.clone(),
        );
        let upstream_resent = Counter::default();
        registry.register(
            "upstream_resent",
            "Read-only commands in flight on a lost upstream connection, sent again on the next one",
            upstream_resent.clone(),
        );
        let cluster_dials_abandoned = Counter::default();
        registry.register(
            "cluster_dials_abandoned",
            "Dials to a cluster node (dedicated or shared connection) given up because the slot map named another owner of the commands' slots",
            cluster_dials_abandoned.clone(),
        );
        let maintenance_notices = Family::<Labels, Counter>::default();
        registry.register(
            "maintenance_notices",
            "Azure maintenance notices (AzureRedisEvents) by notice and the action taken",
            maintenance_notices.clone(),
        );
        Metrics {
            tls_insecure,
            acceptance,
            registry,
            clients_current,
            clients_total,
            clients_rejected,
            commands,
            errors,
            upstream_connections,
            upstream_reconnects,
            pinned_sessions,
            pubsub_channels,
            bytes_in,
            bytes_out,
            command_latency,
            token_refresh_latency,
            token_expiry,
            ready,
            token_refreshes,
            reauths,
            upstream_held,
            upstream_hold_seconds,
            upstream_hold_dropped,
            upstream_resent,
            cluster_dials_abandoned,
            maintenance_notices,
            otel: std::sync::OnceLock::new(),
        }
    }

    /// Turn OpenTelemetry recording on (once, at start-up).
    pub fn set_otel(&self, t: Arc<crate::otel::Telemetry>) {
        let _ = self.otel.set(t);
    }

    /// The OpenTelemetry recorder to hand to others, when export is on.
    pub fn otel_handle(&self) -> Option<Arc<crate::otel::Telemetry>> {
        self.otel.get().cloned()
    }

    /// The OpenTelemetry recorder, when export is on.
    #[inline]
    pub fn otel(&self) -> Option<&crate::otel::Telemetry> {
        self.otel.get().map(|t| &**t)
    }

    pub fn command(&self, route: Route) {
        self.commands[route as usize].inc();
    }

    pub fn error(&self, kind: ErrorKind) {
        let k = match kind {
            ErrorKind::Protocol => "protocol",
            ErrorKind::Limit => "limit",
            ErrorKind::ClientAuth => "client_auth",
            ErrorKind::NoCredential => "no_credential",
            ErrorKind::UpstreamConnect => "upstream_connect",
            ErrorKind::UpstreamLost => "upstream_lost",
            ErrorKind::PinnedLimit => "pinned_limit",
        };
        self.errors.get_or_create(&vec![("kind", k)]).inc();
    }

    /// Gauge of upstream connections of `kind` (shared, pinned, pubsub) in `state`.
    pub fn upstream(&self, kind: &'static str, state: &'static str) -> Gauge {
        self.upstream_connections
            .get_or_create(&vec![("kind", kind), ("state", state)])
            .clone()
    }

    pub fn token_refresh(&self, outcome: &'static str, reason: &'static str) {
        self.token_refreshes
            .get_or_create(&vec![("outcome", outcome), ("reason", reason)])
            .inc();
    }

    pub fn reauth(&self, outcome: &'static str) {
        self.reauths
            .get_or_create(&vec![("outcome", outcome)])
            .inc();
    }

    /// Set `token_expiry_seconds`: `Some(seconds)` (0 when there is no usable
    /// credential) or `None` to leave the metric out (a static credential never expires).
    pub fn set_token_expiry_seconds(&self, seconds: Option<f64>) {
        match seconds {
            Some(s) => {
                self.token_expiry.seconds.set(s);
                self.token_expiry.present.store(true, Ordering::Relaxed);
            }
            None => self.token_expiry.present.store(false, Ordering::Relaxed),
        }
    }

    /// Set `token_expiry_timestamp_seconds`: when the held credential expires (Unix seconds).
    pub fn set_token_expires_at(&self, unix_seconds: f64) {
        self.token_expiry.expires_at.set(unix_seconds);
    }

    /// Set `token_last_refresh_success_timestamp_seconds` (Unix seconds).
    pub fn set_token_refreshed_at(&self, unix_seconds: f64) {
        self.token_expiry.refreshed_at.set(unix_seconds);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// `token_expiry_seconds`, rendered only while it means something: a gauge cannot
/// be absent, so it is registered as a collector.
#[derive(Debug, Default)]
struct TokenExpiry {
    seconds: Gauge<f64, AtomicU64>,
    present: AtomicBool,
    /// Unix seconds; rendered once set (non-zero) and while `present`.
    expires_at: Gauge<f64, AtomicU64>,
    refreshed_at: Gauge<f64, AtomicU64>,
}

impl Collector for TokenExpiry {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if !self.present.load(Ordering::Relaxed) {
            return Ok(());
        }
        let metric = encoder.encode_descriptor(
            "token_expiry_seconds",
            "Seconds until the current upstream credential expires (0: none usable; absent for static credentials).",
            None,
            self.seconds.metric_type(),
        )?;
        self.seconds.encode(metric)?;
        for (name, help, gauge) in [
            (
                "token_expiry_timestamp_seconds",
                "When the current upstream credential expires, Unix seconds.",
                &self.expires_at,
            ),
            (
                "token_last_refresh_success_timestamp_seconds",
                "When a token fetch last succeeded, Unix seconds.",
                &self.refreshed_at,
            ),
        ] {
            if gauge.get() > 0.0 {
                let metric = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
                gauge.encode(metric)?;
            }
        }
        Ok(())
    }
}

/// `upstream_auth_refused_total{reason}` and `upstream_auth_accepted`, read
/// from the shared [`Acceptance`] at each scrape.
#[derive(Debug)]
struct AcceptanceMetrics(Arc<Acceptance>);

impl Collector for AcceptanceMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let refused = Family::<Labels, Counter>::default();
        for kind in [Refusal::WrongPass, Refusal::NoPerm, Refusal::Other] {
            refused
                .get_or_create(&vec![("reason", kind.label())])
                .inc_by(self.0.refused_total(kind));
        }
        let metric = encoder.encode_descriptor(
            "upstream_auth_refused",
            "The proxy's own AUTHs the cache refused, by reason (wrongpass: identity without access policy or wrong audience; noperm: policy too narrow)",
            None,
            refused.metric_type(),
        )?;
        refused.encode(metric)?;
        let accepted: Gauge = Gauge::default();
        accepted.set(i64::from(self.0.accepted_now()));
        let metric = encoder.encode_descriptor(
            "upstream_auth_accepted",
            "1 while the cache's latest answer to the proxy's own AUTH is an acceptance, else 0",
            None,
            accepted.metric_type(),
        )?;
        accepted.encode(metric)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::new();
        m.command(Route::Shared);
        m.error(ErrorKind::Protocol);
        m.clients_total.inc();
        let text = m.render();
        assert!(
            text.contains("redis_entra_proxy_commands_total{route=\"shared\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("redis_entra_proxy_errors_total{kind=\"protocol\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("redis_entra_proxy_client_connections_accepted_total 1"),
            "{text}"
        );
        assert!(
            text.contains("redis_entra_proxy_build_info{version=\""),
            "{text}"
        );
    }

    #[test]
    fn auth_refusals_by_reason() {
        let m = Metrics::new();
        let text = m.render();
        assert!(
            text.contains("\nredis_entra_proxy_upstream_auth_accepted 0\n"),
            "{text}"
        );
        m.acceptance
            .refused(1, "u", "WRONGPASS x", std::time::Instant::now());
        let text = m.render();
        assert!(
            text.contains("redis_entra_proxy_upstream_auth_refused_total{reason=\"wrongpass\"} 1"),
            "{text}"
        );
        m.acceptance.accepted(1, "u");
        assert!(m
            .render()
            .contains("\nredis_entra_proxy_upstream_auth_accepted 1\n"));
    }

    #[test]
    fn token_expiry_is_absent_until_set_and_for_static_credentials() {
        let m = Metrics::new();
        assert!(!m.render().contains("token_expiry_seconds"));
        m.set_token_expiry_seconds(Some(42.5));
        let text = m.render();
        assert!(
            text.contains("# TYPE redis_entra_proxy_token_expiry_seconds gauge"),
            "{text}"
        );
        assert!(
            text.contains("\nredis_entra_proxy_token_expiry_seconds 42.5\n"),
            "{text}"
        );
        m.set_token_expiry_seconds(None);
        assert!(!m.render().contains("token_expiry_seconds"));
    }

    #[test]
    fn token_timestamps_and_refresh_latency() {
        let m = Metrics::new();
        m.set_token_expiry_seconds(Some(10.0));
        let text = m.render();
        assert!(!text.contains("token_expiry_timestamp_seconds"), "{text}");
        assert!(
            text.contains("# TYPE redis_entra_proxy_token_refresh_duration_seconds histogram"),
            "{text}"
        );
        m.set_token_expires_at(1_700_003_600.0);
        m.set_token_refreshed_at(1_700_000_000.0);
        m.token_refresh_latency.observe(0.02);
        let text = m.render();
        assert!(
            text.contains("\nredis_entra_proxy_token_expiry_timestamp_seconds 1700003600.0\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "\nredis_entra_proxy_token_last_refresh_success_timestamp_seconds 1700000000.0\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("redis_entra_proxy_token_refresh_duration_seconds_count 1"),
            "{text}"
        );
        m.set_token_expiry_seconds(None);
        assert!(!m.render().contains("timestamp_seconds"));
    }
}
