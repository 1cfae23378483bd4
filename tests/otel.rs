//! OpenTelemetry export: a small OTLP/HTTP receiver on loopback sees the proxy's
//! metrics (the `/metrics` families and `db.client.operation.duration` by command
//! name) and spans (token refresh, upstream connect, sampled commands); a dead or
//! silent collector neither fails commands nor holds up shutdown.

mod common;

use common::proxy::{
    acl_user_per_token, enable_admin, entra_imds_env, http, metric_sum, static_env, Proxy, Raw,
};
use common::redis::{free_port, RedisServer};
use common::token_emulator::{EmulatorConfig, TokenEmulator};
use serde_json::Value;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// One request the receiver got.
#[derive(Clone, Debug)]
struct Received {
    path: String,
    headers: Vec<(String, String)>,
    body: Value,
}

/// An OTLP/HTTP receiver: answers every POST 200 `{}` and keeps what came.
struct Receiver {
    port: u16,
    got: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    async fn start() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let got: Arc<Mutex<Vec<Received>>> = Arc::default();
        let store = got.clone();
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let store = store.clone();
                tokio::spawn(async move {
                    let (rd, mut wr) = sock.into_split();
                    let mut rd = BufReader::new(rd);
                    // Keep-alive: one request after another on the connection.
                    loop {
                        let mut line = String::new();
                        if rd.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let path = line.split(' ').nth(1).unwrap_or("").to_string();
                        let mut headers = Vec::new();
                        let mut len = 0usize;
                        loop {
                            let mut h = String::new();
                            if rd.read_line(&mut h).await.unwrap_or(0) == 0 {
                                return;
                            }
                            let h = h.trim_end();
                            if h.is_empty() {
                                break;
                            }
                            if let Some((k, v)) = h.split_once(':') {
                                let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_string());
                                if k == "content-length" {
                                    len = v.parse().unwrap_or(0);
                                }
                                headers.push((k, v));
                            }
                        }
                        let mut body = vec![0u8; len];
                        if rd.read_exact(&mut body).await.is_err() {
                            return;
                        }
                        let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
                        store.lock().unwrap().push(Received {
                            path,
                            headers,
                            body,
                        });
                        let answer = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}";
                        if wr.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Receiver { port, got }
    }

    fn all(&self, path: &str) -> Vec<Received> {
        let got = self.got.lock().unwrap();
        got.iter().filter(|r| r.path == path).cloned().collect()
    }
}

/// Every metric of every metrics request, in order.
fn metrics_of(reqs: &[Received]) -> Vec<Value> {
    reqs.iter()
        .flat_map(|r| {
            r.body["resourceMetrics"][0]["scopeMetrics"][0]["metrics"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .collect()
}

fn spans_of(reqs: &[Received]) -> Vec<Value> {
    reqs.iter()
        .flat_map(|r| {
            r.body["resourceSpans"][0]["scopeSpans"][0]["spans"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .collect()
}

fn attr<'a>(point: &'a Value, key: &str) -> Option<&'a str> {
    point["attributes"]
        .as_array()?
        .iter()
        .find(|a| a["key"] == key)?["value"]["stringValue"]
        .as_str()
}

/// The latest `db.client.operation.duration` count for command `op`.
fn op_count(metrics: &[Value], op: &str) -> u64 {
    metrics
        .iter()
        .filter(|m| m["name"] == "db.client.operation.duration")
        .filter_map(|m| {
            m["histogram"]["dataPoints"]
                .as_array()?
                .iter()
                .find(|p| attr(p, "db.operation.name") == Some(op))
                .and_then(|p| p["count"].as_str()?.parse().ok())
        })
        .next_back()
        .unwrap_or(0)
}

/// The latest `redis_entra_proxy_commands{route}` value.
fn commands_sum(metrics: &[Value], route: &str) -> f64 {
    metrics
        .iter()
        .filter(|m| m["name"] == "redis_entra_proxy_commands")
        .filter_map(|m| {
            m["sum"]["dataPoints"]
                .as_array()?
                .iter()
                .find(|p| attr(p, "route") == Some(route))
                .and_then(|p| p["asDouble"].as_f64())
        })
        .next_back()
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_sees_metrics_and_spans() {
    let redis = RedisServer::start("bootstrap", "bootstrap-unused");
    // Tokens valid 4 s: a refresh about every 3 s, and live connections re-AUTH.
    let emu = TokenEmulator::start(EmulatorConfig {
        oid_prefix: "otel-".into(),
        lifetime: Duration::from_secs(4),
        ..Default::default()
    })
    .await;
    acl_user_per_token(&redis, &emu, Duration::ZERO);
    let rx = Receiver::start().await;
    let mut env = entra_imds_env(&redis, &emu);
    let admin = enable_admin(&mut env);
    env.extend(
        [
            ("REDIS_ENTRA_PROXY_OTEL__ENABLED", "true".to_string()),
            ("REDIS_ENTRA_PROXY_OTEL__METRICS_INTERVAL", "500ms".into()),
            ("REDIS_ENTRA_PROXY_OTEL__TRACE_SAMPLE_RATIO", "1".into()),
            // The standard variables, not the otel.* keys.
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                format!("http://127.0.0.1:{}", rx.port),
            ),
            ("OTEL_SERVICE_NAME", "otel-test-proxy".into()),
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                "x-otlp-key=hdr%2Dvalue-7731".into(),
            ),
        ]
        .map(|(k, v)| (k.to_string(), v)),
    );
    let proxy = Proxy::start(&env);
    let port = proxy.port;
    let sent = 25;
    tokio::task::spawn_blocking(move || {
        let mut c = Raw::connect(port);
        for i in 0..sent {
            assert_eq!(c.call(&["SET", &format!("k{i}"), "v"]), "+OK\r\n");
            assert_eq!(c.call(&["GET", &format!("k{i}")]), "$1\r\nv\r\n");
        }
        // A pipelined batch of GETs: counted per command under GET.
        let mut batch = Vec::new();
        for i in 0..10 {
            batch.extend(redis_entra_proxy::resp::command(&[
                b"GET",
                format!("k{i}").as_bytes(),
            ]));
        }
        std::io::Write::write_all(&mut c.s, &batch).unwrap();
        for _ in 0..10 {
            c.read();
        }
    })
    .await
    .unwrap();

    // Until the receiver has seen all of it, or a generous hang guard.
    let deadline = Instant::now() + Duration::from_secs(60);
    let wanted_spans = [
        "token refresh",
        "redis connect",
        "redis re-AUTH",
        "GET",
        "SET",
    ];
    loop {
        let m = metrics_of(&rx.all("/v1/metrics"));
        let s = spans_of(&rx.all("/v1/traces"));
        let names: Vec<&str> = s.iter().filter_map(|s| s["name"].as_str()).collect();
        let done = op_count(&m, "GET") >= sent + 10
            && op_count(&m, "SET") >= sent
            && commands_sum(&m, "shared") >= (2 * sent + 10) as f64
            && wanted_spans.iter().all(|w| names.contains(w));
        if done || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let metric_reqs = rx.all("/v1/metrics");
    let m = metrics_of(&metric_reqs);
    assert!(!metric_reqs.is_empty(), "no metrics: {}", proxy.log_text());
    assert_eq!(op_count(&m, "GET"), sent + 10);
    assert_eq!(op_count(&m, "SET"), sent);
    let d = m
        .iter()
        .rfind(|m| m["name"] == "db.client.operation.duration")
        .unwrap();
    assert_eq!(d["unit"], "s");
    assert_eq!(
        attr(&d["histogram"]["dataPoints"][0], "db.system.name"),
        Some("redis")
    );
    // Computed at export time as at a scrape (none has happened yet).
    let ready = m
        .iter()
        .rfind(|m| m["name"] == "redis_entra_proxy_ready")
        .expect("the ready gauge");
    assert_eq!(ready["gauge"]["dataPoints"][0]["asDouble"], 1.0, "{ready}");
    // The same counter as /metrics.
    let (_, text) = http(admin, "GET", "/metrics");
    let scraped = metric_sum(&text, "redis_entra_proxy_commands_total{route=\"shared\"}");
    assert_eq!(commands_sum(&m, "shared"), scraped, "{text}");
    assert_eq!(scraped, (2 * sent + 10) as f64);
    assert!(m
        .iter()
        .any(|m| m["name"] == "redis_entra_proxy_token_refresh_duration_seconds"));
    // Resource, content type and the configured header.
    let r = &metric_reqs[0];
    let resource = &r.body["resourceMetrics"][0]["resource"];
    assert_eq!(attr(resource, "service.name"), Some("otel-test-proxy"));
    assert!(r
        .headers
        .iter()
        .any(|(k, v)| k == "content-type" && v == "application/json"));
    assert!(r
        .headers
        .iter()
        .any(|(k, v)| k == "x-otlp-key" && v == "hdr-value-7731"));

    let spans = spans_of(&rx.all("/v1/traces"));
    let named = |n: &str| spans.iter().find(|s| s["name"] == n).cloned();
    let refresh = named("token refresh").expect("a token refresh span");
    assert_eq!(refresh["status"]["code"], 0, "{refresh}");
    let connect = named("redis connect").expect("a connect span");
    assert_eq!(connect["kind"], 3);
    assert_eq!(attr(&connect, "server.address"), Some("localhost"));
    let reauth = named("redis re-AUTH").expect("a re-AUTH span");
    assert_eq!(reauth["status"]["code"], 0, "{reauth}");
    assert_eq!(
        attr(&reauth, "redis_entra_proxy.connection.kind"),
        Some("shared")
    );
    let get = named("GET").expect("a command span");
    assert_eq!(attr(&get, "db.operation.name"), Some("GET"));
    assert_eq!(get["traceId"].as_str().unwrap().len(), 32);
    let start: u64 = get["startTimeUnixNano"].as_str().unwrap().parse().unwrap();
    let end: u64 = get["endTimeUnixNano"].as_str().unwrap().parse().unwrap();
    assert!(start > 0 && end >= start);
    let log = proxy.log_text();
    assert!(
        !log.contains("hdr-value-7731"),
        "the header value was logged"
    );
    assert!(!log.contains("export of"), "{log}");
}

/// A collector that accepts connections and never answers.
async fn silent_collector() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            held.push(sock);
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_or_silent_collector_costs_commands_nothing_and_shutdown_is_prompt() {
    let redis = RedisServer::start("app", "app-password");
    let dead = free_port();
    let silent = silent_collector().await;
    let mut env = static_env(&redis, "app", "app-password");
    env.extend(
        [
            ("REDIS_ENTRA_PROXY_OTEL__ENABLED", "true".to_string()),
            ("REDIS_ENTRA_PROXY_OTEL__METRICS_INTERVAL", "200ms".into()),
            ("REDIS_ENTRA_PROXY_OTEL__EXPORT_TIMEOUT", "30s".into()),
            ("REDIS_ENTRA_PROXY_OTEL__TRACE_SAMPLE_RATIO", "1".into()),
            // Metrics to a closed port, traces to a collector that never answers.
            (
                "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
                format!("http://127.0.0.1:{dead}/v1/metrics"),
            ),
            (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                format!("http://127.0.0.1:{silent}/v1/traces"),
            ),
        ]
        .map(|(k, v)| (k.to_string(), v)),
    );
    let mut proxy = Proxy::start(&env);
    let port = proxy.port;
    tokio::task::spawn_blocking(move || {
        let mut c = Raw::connect(port);
        for i in 0..300 {
            assert_eq!(c.call(&["SET", &format!("k{i}"), "v"]), "+OK\r\n");
        }
        // Long enough for several failed metric exports.
        std::thread::sleep(Duration::from_millis(1500));
        for i in 0..300 {
            assert_eq!(c.call(&["GET", &format!("k{i}")]), "$1\r\nv\r\n");
        }
    })
    .await
    .unwrap();
    // The failure is reported, once (at most one line a minute).
    let deadline = Instant::now() + Duration::from_secs(30);
    while !proxy.log_text().contains("OpenTelemetry export of metrics") && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = proxy.log_text();
    let failures = log
        .lines()
        .filter(|l| l.contains("OpenTelemetry export of metrics"))
        .count();
    assert_eq!(failures, 1, "{log}");
    assert!(log.contains("cannot connect"), "{log}");

    // SIGTERM with a trace export hanging on the silent collector: the proxy
    // exits without waiting for it (its timeout is 30 s; the hang guard 20 s).
    let pid = proxy.child().id() as libc::pid_t;
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = proxy.child().try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the proxy did not stop: {}",
            proxy.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status}: {}", proxy.log_text());
    assert!(proxy.log_text().contains("redis-entra-proxy stopped"));
}
