//! `[otel]`: OpenTelemetry export (see `crate::otel`).

use crate::otel::settings::{Keys, OtelEnv};
use serde::Deserialize;
use std::time::Duration;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OtelConfig {
    pub enabled: bool,
    pub endpoint: Option<String>,
    pub service_name: Option<String>,
    #[serde(with = "humantime_serde")]
    pub metrics_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub export_timeout: Duration,
    pub trace_sample_ratio: f64,
    /// The standard `OTEL_*` variables, taken from the environment at load.
    #[serde(skip)]
    pub env: OtelEnv,
}

impl Default for OtelConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            endpoint: None,
            service_name: None,
            metrics_interval: Duration::from_secs(60),
            export_timeout: Duration::from_secs(10),
            trace_sample_ratio: 0.01,
            env: OtelEnv::default(),
        }
    }
}

impl OtelConfig {
    pub fn keys(&self) -> Keys {
        Keys {
            enabled: self.enabled,
            endpoint: self.endpoint.clone(),
            service_name: self.service_name.clone(),
            metrics_interval: self.metrics_interval,
            export_timeout: self.export_timeout,
            trace_sample_ratio: self.trace_sample_ratio,
        }
    }

    /// The export settings, or none when off; an error names what is wrong.
    pub fn settings(&self) -> Result<Option<crate::otel::Settings>, String> {
        crate::otel::settings::resolve(&self.keys(), &self.env)
    }
}
