//! The OTLP/HTTP JSON encoding (the protobuf messages' documented JSON mapping:
//! lowerCamelCase fields, 64-bit integers as decimal strings, trace and span ids in
//! hex) of the proxy's metrics and spans. Pure functions: no I/O.
//!
//! The metrics `/metrics` shows are taken from its Prometheus text, so that both
//! always carry the same set: counters become monotonic cumulative sums (name
//! without `_total`), gauges gauges, histograms explicit-bucket histograms.

use super::ops::{self, Snapshot};
use serde_json::{json, Value};

/// Who sends: the resource and scope of every request.
#[derive(Debug, Clone)]
pub struct Origin {
    pub service_name: String,
    pub service_version: &'static str,
    pub instance_id: String,
}

impl Origin {
    fn resource(&self) -> Value {
        json!({ "attributes": [
            attr_str("service.name", &self.service_name),
            attr_str("service.version", self.service_version),
            attr_str("service.instance.id", &self.instance_id),
        ]})
    }
}

fn scope() -> Value {
    json!({ "name": "redis-entra-proxy", "version": env!("CARGO_PKG_VERSION") })
}

pub fn attr_str(key: &str, value: &str) -> Value {
    json!({ "key": key, "value": { "stringValue": value } })
}

pub fn attr_int(key: &str, value: i64) -> Value {
    json!({ "key": key, "value": { "intValue": value.to_string() } })
}

/// One Prometheus sample: name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// One metric family of the text exposition.
#[derive(Debug, Clone, PartialEq)]
pub struct Family {
    pub name: String,
    pub kind: String,
    pub help: String,
    pub unit: String,
    pub samples: Vec<Sample>,
}

/// Parse the Prometheus / OpenMetrics text exposition. Lines it cannot read are
/// skipped (it only ever reads the proxy's own output).
pub fn parse_exposition(text: &str) -> Vec<Family> {
    let mut out: Vec<Family> = Vec::new();
    for line in text.lines() {
        let line = line.trim_end();
        if line.is_empty() || line == "# EOF" {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (Some(what), Some(name)) = (parts.next(), parts.next()) else {
                continue;
            };
            let arg = parts.next().unwrap_or("").to_string();
            let fam = match out.last_mut() {
                Some(f) if f.name == name => f,
                _ => {
                    out.push(Family {
                        name: name.to_string(),
                        kind: "unknown".into(),
                        help: String::new(),
                        unit: String::new(),
                        samples: Vec::new(),
                    });
                    out.last_mut().expect("just pushed")
                }
            };
            match what {
                "TYPE" => fam.kind = arg,
                "HELP" => fam.help = arg,
                "UNIT" => fam.unit = arg,
                _ => {}
            }
            continue;
        }
        let Some(sample) = parse_sample(line) else {
            continue;
        };
        match out.last_mut() {
            Some(f) if sample.name.starts_with(&f.name) => f.samples.push(sample),
            _ => out.push(Family {
                name: sample.name.clone(),
                kind: "unknown".into(),
                help: String::new(),
                unit: String::new(),
                samples: vec![sample],
            }),
        }
    }
    out
}

fn parse_sample(line: &str) -> Option<Sample> {
    let name_end = line.find(['{', ' '])?;
    let name = line[..name_end].to_string();
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(r) = rest.strip_prefix('{') {
        let mut chars = r.char_indices().peekable();
        let mut end = None;
        loop {
            // key
            let mut key = String::new();
            while let Some(&(i, c)) = chars.peek() {
                if c == '}' {
                    end = Some(i);
                    break;
                }
                if c == '=' {
                    break;
                }
                if c != ',' && c != ' ' {
                    key.push(c);
                }
                chars.next();
            }
            if end.is_some() {
                break;
            }
            chars.next(); // '='
            if chars.next()?.1 != '"' {
                return None;
            }
            let mut value = String::new();
            loop {
                let (_, c) = chars.next()?;
                match c {
                    '"' => break,
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    c => value.push(c),
                }
            }
            labels.push((key, value));
        }
        rest = &r[end? + 1..];
    }
    let value_text = rest.split_whitespace().next()?;
    let value = match value_text {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name,
        labels,
        value,
    })
}

fn attrs(labels: &[(String, String)]) -> Vec<Value> {
    labels.iter().map(|(k, v)| attr_str(k, v)).collect()
}

fn unit_of(f: &Family) -> &str {
    if !f.unit.is_empty() {
        if f.unit == "seconds" {
            return "s";
        }
        return &f.unit;
    }
    if f.name.ends_with("_seconds") {
        "s"
    } else if f.name.ends_with("_bytes") {
        "By"
    } else {
        ""
    }
}

/// One family as an OTLP metric, or none (no samples, or a kind it does not map).
pub fn family_metric(f: &Family, start_nanos: u64, now_nanos: u64) -> Option<Value> {
    let times = |mut p: Value| {
        p["startTimeUnixNano"] = json!(start_nanos.to_string());
        p["timeUnixNano"] = json!(now_nanos.to_string());
        p
    };
    let body = match f.kind.as_str() {
        "counter" => {
            let points: Vec<Value> = f
                .samples
                .iter()
                .filter(|s| !s.name.ends_with("_created"))
                .map(|s| {
                    times(json!({ "attributes": attrs(&s.labels), "asDouble": finite(s.value) }))
                })
                .collect();
            if points.is_empty() {
                return None;
            }
            (
                "sum",
                json!({ "dataPoints": points, "aggregationTemporality": 2, "isMonotonic": true }),
            )
        }
        "gauge" => {
            if f.samples.is_empty() {
                return None;
            }
            let points: Vec<Value> = f
                .samples
                .iter()
                .map(|s| {
                    times(json!({ "attributes": attrs(&s.labels), "asDouble": finite(s.value) }))
                })
                .collect();
            ("gauge", json!({ "dataPoints": points }))
        }
        "histogram" => {
            let mut bounds = Vec::new();
            let mut cumulative = Vec::new();
            let (mut count, mut sum) = (0.0, 0.0);
            let mut labels: Vec<(String, String)> = Vec::new();
            for s in &f.samples {
                if s.name.ends_with("_bucket") {
                    let le = s.labels.iter().find(|(k, _)| k == "le")?;
                    if le.1 != "+Inf" {
                        bounds.push(le.1.parse::<f64>().ok()?);
                    }
                    cumulative.push(s.value as u64);
                    labels = s
                        .labels
                        .iter()
                        .filter(|(k, _)| k != "le")
                        .cloned()
                        .collect();
                } else if s.name.ends_with("_count") {
                    count = s.value;
                } else if s.name.ends_with("_sum") {
                    sum = s.value;
                }
            }
            if cumulative.is_empty() {
                return None;
            }
            let mut prev = 0;
            let counts: Vec<String> = cumulative
                .iter()
                .map(|&c| {
                    let n = c.saturating_sub(prev);
                    prev = c;
                    n.to_string()
                })
                .collect();
            let point = times(json!({
                "attributes": attrs(&labels),
                "count": (count as u64).to_string(),
                "sum": finite(sum),
                "bucketCounts": counts,
                "explicitBounds": bounds,
            }));
            (
                "histogram",
                json!({ "dataPoints": [point], "aggregationTemporality": 2 }),
            )
        }
        _ => return None,
    };
    let mut m = json!({ "name": f.name, "description": f.help, "unit": unit_of(f) });
    m[body.0] = body.1;
    Some(m)
}

fn finite(v: f64) -> f64 {
    if v.is_finite() {
        v
    } else {
        0.0
    }
}

/// `db.client.operation.duration` from the per-command histograms.
pub fn operation_duration(snaps: &[Snapshot], start_nanos: u64, now_nanos: u64) -> Option<Value> {
    if snaps.is_empty() {
        return None;
    }
    let points: Vec<Value> = snaps
        .iter()
        .map(|s| {
            json!({
                "attributes": [
                    attr_str("db.system.name", "redis"),
                    attr_str("db.operation.name", ops::name(s.op)),
                ],
                "startTimeUnixNano": start_nanos.to_string(),
                "timeUnixNano": now_nanos.to_string(),
                "count": s.count.to_string(),
                "sum": s.sum_seconds,
                "bucketCounts": s.buckets.iter().map(u64::to_string).collect::<Vec<_>>(),
                "explicitBounds": ops::BOUNDS,
            })
        })
        .collect();
    Some(json!({
        "name": "db.client.operation.duration",
        "description": "Duration of database client operations: from a client command's arrival at the proxy to its reply being queued for the client.",
        "unit": "s",
        "histogram": { "dataPoints": points, "aggregationTemporality": 2 },
    }))
}

/// An `ExportMetricsServiceRequest`.
pub fn metrics_request(origin: &Origin, metrics: Vec<Value>) -> Value {
    json!({ "resourceMetrics": [{
        "resource": origin.resource(),
        "scopeMetrics": [{ "scope": scope(), "metrics": metrics }],
    }]})
}

/// A finished span.
#[derive(Debug, Clone, PartialEq)]
pub struct SpanRecord {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub name: &'static str,
    /// 1 internal, 3 client (the OTLP `SpanKind` numbers).
    pub kind: u8,
    pub start_nanos: u64,
    pub end_nanos: u64,
    pub attributes: Vec<Value>,
    /// The error, when it failed (status ERROR with this message).
    pub error: Option<String>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An `ExportTraceServiceRequest`.
pub fn traces_request(origin: &Origin, spans: &[SpanRecord]) -> Value {
    let spans: Vec<Value> = spans
        .iter()
        .map(|s| {
            let status = match &s.error {
                Some(m) => json!({ "code": 2, "message": m }),
                None => json!({ "code": 0 }),
            };
            json!({
                "traceId": hex(&s.trace_id),
                "spanId": hex(&s.span_id),
                "name": s.name,
                "kind": s.kind,
                "startTimeUnixNano": s.start_nanos.to_string(),
                "endTimeUnixNano": s.end_nanos.max(s.start_nanos).to_string(),
                "attributes": s.attributes,
                "status": status,
            })
        })
        .collect();
    json!({ "resourceSpans": [{
        "resource": origin.resource(),
        "scopeSpans": [{ "scope": scope(), "spans": spans }],
    }]})
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP redis_entra_proxy_commands Client commands by routing class.\n\
# TYPE redis_entra_proxy_commands counter\n\
redis_entra_proxy_commands_total{route=\"local\"} 3\n\
redis_entra_proxy_commands_total{route=\"sh\\\"ared\"} 7\n\
# HELP redis_entra_proxy_client_connections Client connections open now.\n\
# TYPE redis_entra_proxy_client_connections gauge\n\
redis_entra_proxy_client_connections 2\n\
# HELP redis_entra_proxy_command_duration_seconds Time.\n\
# TYPE redis_entra_proxy_command_duration_seconds histogram\n\
redis_entra_proxy_command_duration_seconds_sum 0.5\n\
redis_entra_proxy_command_duration_seconds_count 4\n\
redis_entra_proxy_command_duration_seconds_bucket{le=\"0.1\"} 1\n\
redis_entra_proxy_command_duration_seconds_bucket{le=\"1.0\"} 3\n\
redis_entra_proxy_command_duration_seconds_bucket{le=\"+Inf\"} 4\n\
# EOF\n";

    #[test]
    fn reads_the_exposition() {
        let fams = parse_exposition(TEXT);
        assert_eq!(fams.len(), 3);
        assert_eq!(fams[0].kind, "counter");
        assert_eq!(
            fams[0].samples[1].labels,
            vec![("route".into(), "sh\"ared".into())]
        );
        assert_eq!(fams[0].samples[1].value, 7.0);
        assert_eq!(fams[1].samples[0].value, 2.0);
        assert_eq!(fams[2].samples.len(), 5);
    }

    #[test]
    fn maps_kinds_to_otlp() {
        let fams = parse_exposition(TEXT);
        let sum = family_metric(&fams[0], 1, 2).unwrap();
        assert_eq!(sum["sum"]["isMonotonic"], true);
        assert_eq!(sum["sum"]["aggregationTemporality"], 2);
        assert_eq!(sum["sum"]["dataPoints"][1]["asDouble"], 7.0);
        assert_eq!(sum["sum"]["dataPoints"][0]["startTimeUnixNano"], "1");
        let gauge = family_metric(&fams[1], 1, 2).unwrap();
        assert_eq!(gauge["gauge"]["dataPoints"][0]["asDouble"], 2.0);
        let h = family_metric(&fams[2], 1, 2).unwrap();
        assert_eq!(h["unit"], "s");
        let p = &h["histogram"]["dataPoints"][0];
        assert_eq!(p["bucketCounts"], json!(["1", "2", "1"]));
        assert_eq!(p["explicitBounds"], json!([0.1, 1.0]));
        assert_eq!(p["count"], "4");
    }

    #[test]
    fn garbage_lines_are_skipped_not_fatal() {
        let fams =
            parse_exposition("x{a=\"unterminated 1\n{}\n# TYPE\nname_only\ny{a=b} 2\nz 1e400\n");
        assert!(fams.iter().all(|f| f.samples.iter().all(|s| s.name != "x")));
        for f in &fams {
            let _ = family_metric(f, 0, 0);
        }
    }

    #[test]
    fn operation_duration_follows_the_conventions() {
        let d = ops::Durations::default();
        d.record(ops::lookup(b"get"), 0.002, 2);
        let m = operation_duration(&d.snapshot(), 5, 6).unwrap();
        assert_eq!(m["name"], "db.client.operation.duration");
        assert_eq!(m["unit"], "s");
        let p = &m["histogram"]["dataPoints"][0];
        assert_eq!(p["attributes"][0], attr_str("db.system.name", "redis"));
        assert_eq!(p["attributes"][1], attr_str("db.operation.name", "GET"));
        assert_eq!(p["bucketCounts"][1], "2");
        assert_eq!(p["count"], "2");
        assert!(operation_duration(&[], 0, 0).is_none());
    }

    #[test]
    fn spans_carry_hex_ids_and_status() {
        let origin = Origin {
            service_name: "svc".into(),
            service_version: "1",
            instance_id: "i".into(),
        };
        let s = SpanRecord {
            trace_id: [0xab; 16],
            span_id: [1; 8],
            name: "token refresh",
            kind: 1,
            start_nanos: 10,
            end_nanos: 5,
            attributes: vec![attr_int("n", 1)],
            error: Some("boom".into()),
        };
        let r = traces_request(&origin, &[s]);
        let span = &r["resourceSpans"][0]["scopeSpans"][0]["spans"][0];
        assert_eq!(span["traceId"], "ab".repeat(16));
        assert_eq!(span["spanId"], "0101010101010101");
        assert_eq!(span["endTimeUnixNano"], "10");
        assert_eq!(span["status"]["code"], 2);
        assert_eq!(
            r["resourceSpans"][0]["resource"]["attributes"][0],
            attr_str("service.name", "svc")
        );
    }
}

#[cfg(test)]
mod real_exposition {
    use super::*;

    #[test]
    fn every_family_of_metrics_maps() {
        let m = crate::metrics::Metrics::new();
        m.command(crate::metrics::Route::Shared);
        m.command_latency.observe(0.01);
        m.upstream("shared", "up").inc();
        let text = m.render();
        let fams = parse_exposition(&text);
        let declared = text.lines().filter(|l| l.starts_with("# TYPE")).count();
        assert_eq!(fams.len(), declared, "{text}");
        let mapped: Vec<Value> = fams.iter().filter_map(|f| family_metric(f, 1, 2)).collect();
        let find = |name: &str| mapped.iter().find(|m| m["name"] == name).cloned();
        let commands = find("redis_entra_proxy_commands").expect("commands");
        let shared = commands["sum"]["dataPoints"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["attributes"][0] == attr_str("route", "shared"))
            .unwrap()
            .clone();
        assert_eq!(shared["asDouble"], 1.0);
        let h = find("redis_entra_proxy_command_duration_seconds").expect("histogram");
        assert_eq!(h["histogram"]["dataPoints"][0]["count"], "1");
        assert!(find("redis_entra_proxy_upstream_connections").is_some());
    }
}
