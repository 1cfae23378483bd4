//! Where and how to export: the `otel.*` keys and the standard `OTEL_*`
//! variables, resolved by a pure function ([`resolve`]).

use std::collections::HashMap;
use std::time::Duration;

/// The standard OpenTelemetry variables the exporter reads, taken from the
/// environment at start-up.
#[derive(Clone, Default, PartialEq)]
pub struct OtelEnv {
    pub vars: HashMap<String, String>,
}

/// The variables read (and nothing else is kept).
pub const VARS: &[&str] = &[
    "OTEL_SDK_DISABLED",
    "OTEL_SERVICE_NAME",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_HEADERS",
    "OTEL_EXPORTER_OTLP_METRICS_HEADERS",
    "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
];

impl OtelEnv {
    pub fn from_env(env: &HashMap<String, String>) -> Self {
        Self {
            vars: VARS
                .iter()
                .filter_map(|k| env.get(*k).map(|v| (k.to_string(), v.clone())))
                .collect(),
        }
    }

    fn get(&self, k: &str) -> Option<&str> {
        self.vars
            .get(k)
            .map(String::as_str)
            .filter(|v| !v.trim().is_empty())
    }
}

// The header values may hold API keys: never shown.
impl std::fmt::Debug for OtelEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut keys: Vec<_> = self.vars.keys().collect();
        keys.sort();
        f.debug_struct("OtelEnv").field("set", &keys).finish()
    }
}

/// The `otel.*` keys as configured.
#[derive(Debug, Clone, PartialEq)]
pub struct Keys {
    pub enabled: bool,
    pub endpoint: Option<String>,
    pub service_name: Option<String>,
    pub metrics_interval: Duration,
    pub export_timeout: Duration,
    pub trace_sample_ratio: f64,
}

/// What the exporter does.
#[derive(Clone, PartialEq)]
pub struct Settings {
    pub metrics_url: String,
    pub traces_url: String,
    pub metrics_headers: Vec<(String, String)>,
    pub traces_headers: Vec<(String, String)>,
    pub service_name: String,
    pub metrics_interval: Duration,
    pub export_timeout: Duration,
    pub trace_sample_ratio: f64,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("metrics_url", &self.metrics_url)
            .field("traces_url", &self.traces_url)
            .field("service_name", &self.service_name)
            .finish_non_exhaustive()
    }
}

/// The OTLP/HTTP default endpoint.
pub const DEFAULT_ENDPOINT: &str = "http://localhost:4318";

/// The export settings, or none when export is off (`otel.enabled = false`, or
/// `OTEL_SDK_DISABLED=true`). `otel.endpoint` wins over
/// `OTEL_EXPORTER_OTLP_ENDPOINT`; a per-signal variable is used as given.
pub fn resolve(keys: &Keys, env: &OtelEnv) -> Result<Option<Settings>, String> {
    if !keys.enabled
        || env
            .get("OTEL_SDK_DISABLED")
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
    {
        return Ok(None);
    }
    let base = keys
        .endpoint
        .as_deref()
        .filter(|e| !e.trim().is_empty())
        .or_else(|| env.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
        .unwrap_or(DEFAULT_ENDPOINT)
        .trim()
        .trim_end_matches('/')
        .to_string();
    let signal = |var: &str, path: &str| -> Result<String, String> {
        let url = match (keys.endpoint.is_none(), env.get(var)) {
            (true, Some(u)) => u.trim().to_string(),
            _ => format!("{base}/{path}"),
        };
        check_url(&url)?;
        Ok(url)
    };
    let metrics_url = signal("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "v1/metrics")?;
    let traces_url = signal("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "v1/traces")?;
    let common = parse_headers(env.get("OTEL_EXPORTER_OTLP_HEADERS").unwrap_or(""))
        .map_err(|e| format!("OTEL_EXPORTER_OTLP_HEADERS: {e}"))?;
    let with = |var: &str| -> Result<Vec<(String, String)>, String> {
        let mut h = common.clone();
        for (k, v) in
            parse_headers(env.get(var).unwrap_or("")).map_err(|e| format!("{var}: {e}"))?
        {
            h.retain(|(old, _)| !old.eq_ignore_ascii_case(&k));
            h.push((k, v));
        }
        Ok(h)
    };
    if !(0.0..=1.0).contains(&keys.trace_sample_ratio) {
        return Err("otel.trace_sample_ratio must be between 0 and 1".into());
    }
    if keys.metrics_interval < Duration::from_millis(100) {
        return Err("otel.metrics_interval must be at least 100ms".into());
    }
    if keys.export_timeout.is_zero() {
        return Err("otel.export_timeout must be positive".into());
    }
    Ok(Some(Settings {
        metrics_url,
        traces_url,
        metrics_headers: with("OTEL_EXPORTER_OTLP_METRICS_HEADERS")?,
        traces_headers: with("OTEL_EXPORTER_OTLP_TRACES_HEADERS")?,
        service_name: keys
            .service_name
            .clone()
            .filter(|s| !s.trim().is_empty())
            .or_else(|| env.get("OTEL_SERVICE_NAME").map(str::to_string))
            .unwrap_or_else(|| "redis-entra-proxy".into()),
        metrics_interval: keys.metrics_interval,
        export_timeout: keys.export_timeout,
        trace_sample_ratio: keys.trace_sample_ratio,
    }))
}

fn check_url(url: &str) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("OTLP endpoint `{url}`: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err(format!(
            "OTLP endpoint `{url}`: must be an http:// or https:// URL (OTLP/HTTP; gRPC is not supported)"
        ));
    }
    Ok(())
}

/// `key1=value1,key2=value2`, values percent-encoded (the OTLP exporter spec).
pub fn parse_headers(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let Some((k, v)) = item.split_once('=') else {
            return Err("each header must be name=value".into());
        };
        let k = k.trim();
        let v = percent_decode(v.trim())?;
        reqwest::header::HeaderName::from_bytes(k.as_bytes())
            .map_err(|_| "a header name is not valid".to_string())?;
        reqwest::header::HeaderValue::from_str(&v)
            .map_err(|_| format!("the value of header {k} is not valid"))?;
        out.push((k.to_string(), v));
    }
    Ok(out)
}

fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or("a header value has a bad %-escape")?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "a header value is not UTF-8".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Keys {
        Keys {
            enabled: true,
            endpoint: None,
            service_name: None,
            metrics_interval: Duration::from_secs(60),
            export_timeout: Duration::from_secs(10),
            trace_sample_ratio: 0.01,
        }
    }

    fn env(pairs: &[(&str, &str)]) -> OtelEnv {
        OtelEnv::from_env(
            &pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .chain([("UNRELATED".to_string(), "x".to_string())])
                .collect(),
        )
    }

    #[test]
    fn off_unless_enabled() {
        let mut k = keys();
        k.enabled = false;
        assert_eq!(resolve(&k, &env(&[])).unwrap(), None);
        let e = env(&[("OTEL_SDK_DISABLED", "true")]);
        assert_eq!(resolve(&keys(), &e).unwrap(), None);
    }

    #[test]
    fn default_and_standard_endpoints() {
        let s = resolve(&keys(), &env(&[])).unwrap().unwrap();
        assert_eq!(s.metrics_url, "http://localhost:4318/v1/metrics");
        assert_eq!(s.service_name, "redis-entra-proxy");
        let e = env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://collector:4318/"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://t:1/custom"),
            ("OTEL_SERVICE_NAME", "cache-proxy"),
        ]);
        let s = resolve(&keys(), &e).unwrap().unwrap();
        assert_eq!(s.metrics_url, "https://collector:4318/v1/metrics");
        assert_eq!(s.traces_url, "http://t:1/custom");
        assert_eq!(s.service_name, "cache-proxy");
        assert!(!e.vars.contains_key("UNRELATED"));
    }

    #[test]
    fn the_key_wins_over_the_variables() {
        let mut k = keys();
        k.endpoint = Some("http://127.0.0.1:9".into());
        let e = env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://other:1"),
            ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "http://other:2/m"),
        ]);
        let s = resolve(&k, &e).unwrap().unwrap();
        assert_eq!(s.metrics_url, "http://127.0.0.1:9/v1/metrics");
        assert_eq!(s.traces_url, "http://127.0.0.1:9/v1/traces");
    }

    #[test]
    fn bad_values_are_refused() {
        let mut k = keys();
        k.endpoint = Some("grpc://x:4317".into());
        assert!(resolve(&k, &env(&[])).unwrap_err().contains("http://"));
        let mut k = keys();
        k.trace_sample_ratio = 1.5;
        assert!(resolve(&k, &env(&[])).is_err());
        let e = env(&[("OTEL_EXPORTER_OTLP_HEADERS", "novalue")]);
        assert!(resolve(&keys(), &e).is_err());
    }

    #[test]
    fn headers_are_decoded_and_never_shown() {
        let e = env(&[
            ("OTEL_EXPORTER_OTLP_HEADERS", "api-key=s%3Dcret, x=1"),
            ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "X=2"),
        ]);
        let s = resolve(&keys(), &e).unwrap().unwrap();
        assert_eq!(
            s.metrics_headers,
            vec![
                ("api-key".into(), "s=cret".into()),
                ("x".into(), "1".into())
            ]
        );
        assert_eq!(
            s.traces_headers,
            vec![
                ("api-key".into(), "s=cret".into()),
                ("X".into(), "2".into())
            ]
        );
        assert!(!format!("{s:?} {e:?}").contains("cret"));
        assert!(parse_headers("a=%zz").is_err());
        assert!(parse_headers("a=%4").is_err());
    }
}
