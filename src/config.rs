//! Configuration: one name per setting, usable as a TOML key (`upstream.host`), an
//! environment variable (`REDIS_ENTRA_PROXY_UPSTREAM__HOST`) and, for the common
//! ones, a flag (`--upstream-host`). Precedence: flag > environment > file > default.
//!
//! [`KEYS`] is the single list of every key: unknown keys are rejected against it,
//! and a test checks that the example config documents each of them.

mod environment;
mod keys;
mod listen;
mod otel;
mod secrets;

pub use environment::is_service_link;
pub use keys::{check_log_level, describe_key, env_name, ENUM_VALUES, FLAGS, KEYS, LOG_LEVELS};
pub use listen::ListenAddrs;
pub use otel::OtelConfig;
pub use secrets::{read_secret_file, SECRET_KEYS};

use crate::secret::Secret;
use serde::Deserialize;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Prefix of every environment variable.
pub const ENV_PREFIX: &str = "REDIS_ENTRA_PROXY";

/// Exit status for a command line that cannot be understood (sysexits EX_USAGE).
pub const EX_USAGE: i32 = 64;
/// Exit status for a configuration that cannot be used (sysexits EX_CONFIG).
pub const EX_CONFIG: i32 = 78;

/// A configuration that cannot be used. Always names the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config: cannot read {path}: {source}")]
    File {
        path: PathBuf,
        source: config::ConfigError,
    },
    #[error("config: unknown key `{key}` (from {origin}); see config/redis-entra-proxy.example.toml for the keys")]
    UnknownKey { key: String, origin: String },
    #[error("config: missing required key {}", describe_key(.0))]
    Missing(&'static str),
    #[error("config: bad value for {}: {reason}", describe_key(.key))]
    Invalid { key: String, reason: String },
}

fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        reason: reason.into(),
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub listen: ListenConfig,
    pub limits: LimitsConfig,
    pub upstream: UpstreamConfig,
    pub auth: AuthConfig,
    pub admin: AdminConfig,
    pub log: LogConfig,
    pub shutdown: ShutdownConfig,
    pub otel: OtelConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenConfig {
    pub address: String,
    pub unix_socket: Option<PathBuf>,
    pub password: Option<Secret>,
    pub password_file: Option<PathBuf>,
    pub max_clients: usize,
    /// Answer CLUSTER SLOTS/SHARDS/NODES/..., READONLY, READWRITE and ASKING
    /// as one node owning every slot (`downstream::face`).
    pub cluster_face: bool,
}

/// Bounds on what one client may send (see `resp::scan`).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub max_bulk_bytes: usize,
    pub max_line_bytes: usize,
    pub max_elements: usize,
    pub max_buffered_bytes: usize,
    /// Bytes of pub/sub messages queued for one client that it has not read;
    /// past this the client is disconnected.
    pub max_pubsub_queued_bytes: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    pub host: String,
    pub port: u16,
    pub ca_file: Option<PathBuf>,
    pub server_name: Option<String>,
    pub tls_insecure_skip_verify: bool,
    /// The second key `tls_insecure_skip_verify` needs: yes, send the credential
    /// (token or password) to a server whose certificate is not verified.
    pub tls_insecure_send_credentials: bool,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub reply_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub keepalive: Duration,
    /// How long a command not yet sent waits for a shared connection being
    /// re-established (failover, restart, network blip) before it fails;
    /// 0 fails it at the first failed dial.
    #[serde(with = "humantime_serde")]
    pub hold: Duration,
    /// Follow Azure Cache for Redis's maintenance notices (`AzureRedisEvents`).
    pub azure_events: AzureEvents,
    pub pool_size: usize,
    pub warm_pinned: usize,
    pub max_pinned: usize,
    /// Whether the upstream is a Redis Cluster (OSS cluster policy).
    pub cluster: ClusterMode,
}

/// `upstream.azure_events`: subscribe to `AzureRedisEvents` on a connection
/// of its own and follow the notices. `auto`: when the host is an Azure
/// Cache for Redis name (the service that publishes them).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum AzureEvents {
    Auto,
    On,
    Off,
}

impl Config {
    /// Whether to follow `AzureRedisEvents` (see [`AzureEvents`]).
    pub fn azure_events(&self) -> bool {
        const HOSTS: [&str; 3] = [
            ".redis.cache.windows.net",
            ".redis.cache.chinacloudapi.cn",
            ".redis.cache.usgovcloudapi.net",
        ];
        match self.upstream.azure_events {
            AzureEvents::On => true,
            AzureEvents::Off => false,
            AzureEvents::Auto => {
                let host = self.upstream.host.to_ascii_lowercase();
                HOSTS.iter().any(|h| host.ends_with(h))
            }
        }
    }
}

/// `upstream.cluster`: find out from the first connection, or say so.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ClusterMode {
    Auto,
    On,
    Off,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum AuthSource {
    Entra,
    Static,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub source: AuthSource,
    pub username: Option<String>,
    #[serde(rename = "static")]
    pub static_: StaticAuthConfig,
    pub entra: EntraConfig,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StaticAuthConfig {
    pub password: Option<Secret>,
    /// Read at start and again on SIGHUP.
    pub password_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum EntraCredentialKind {
    /// Chosen from the environment at start, as `DefaultAzureCredential` would.
    Auto,
    ManagedIdentity,
    WorkloadIdentity,
    ClientSecret,
    ClientCertificate,
    AzureCli,
    #[serde(alias = "azd")]
    AzureDeveloperCli,
    /// `az`, then `azd`.
    DeveloperTools,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EntraConfig {
    pub credential: EntraCredentialKind,
    pub client_id: Option<String>,
    pub object_id: Option<String>,
    pub resource_id: Option<String>,
    pub tenant_id: Option<String>,
    pub authority_host: Option<String>,
    pub federated_token_file: Option<PathBuf>,
    pub client_secret: Option<Secret>,
    pub client_secret_file: Option<PathBuf>,
    pub client_certificate_file: Option<PathBuf>,
    pub client_certificate_send_chain: bool,
    pub arc_key_directory: PathBuf,
    pub scope: String,
    pub imds_endpoint: Option<String>,
    pub ca_file: Option<PathBuf>,
    #[serde(with = "humantime_serde")]
    pub attempt_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub enabled: bool,
    pub address: SocketAddr,
    pub readiness: Readiness,
}

/// What `/readyz` (and the container `HEALTHCHECK`, and the `ready` metric) waits
/// for, beyond "listening and not draining". A sidecar's readiness is its pod's: a
/// condition every pod shares (a cache failover) must not take them all out of
/// their Service at once, so the default does not look at upstream connections.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Readiness {
    /// Listening and not draining.
    Listening,
    /// Also a credential with enough time left (see `admin::token_margin`).
    Credential,
    /// Also at least one connected, authenticated upstream connection.
    Upstream,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
    /// Lines of one kind (call site) per minute, in a burst or spread; the rest are
    /// dropped and counted. 0: no limit. Debug and trace lines are never limited.
    pub max_per_minute: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
    #[serde(with = "humantime_serde")]
    pub min_delay: Duration,
}

impl Default for ListenConfig {
    fn default() -> Self {
        ListenConfig {
            address: "localhost:6379".into(),
            unix_socket: None,
            password: None,
            password_file: None,
            max_clients: 10_000,
            cluster_face: true,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_bulk_bytes: 512 * 1024 * 1024,
            max_line_bytes: 64 * 1024,
            max_elements: 1024 * 1024,
            max_buffered_bytes: 1024 * 1024 * 1024,
            max_pubsub_queued_bytes: 32 * 1024 * 1024,
        }
    }
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            host: String::new(),
            port: 6380,
            ca_file: None,
            server_name: None,
            tls_insecure_skip_verify: false,
            tls_insecure_send_credentials: false,
            connect_timeout: Duration::from_secs(10),
            reply_timeout: Duration::from_secs(30),
            keepalive: Duration::from_secs(60),
            // Azure Cache for Redis reaches the new primary 9-10 s after it
            // closes the connections at a failover: 15 s covers that gap,
            // a dial or two after it, and a TLS handshake and AUTH, and
            // stays well under client libraries' usual command timeouts.
            hold: Duration::from_secs(15),
            azure_events: AzureEvents::Auto,
            pool_size: 2,
            warm_pinned: 2,
            max_pinned: 256,
            cluster: ClusterMode::Auto,
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            source: AuthSource::Entra,
            username: None,
            static_: StaticAuthConfig::default(),
            entra: EntraConfig::default(),
        }
    }
}

impl Default for EntraConfig {
    fn default() -> Self {
        EntraConfig {
            credential: EntraCredentialKind::Auto,
            client_id: None,
            object_id: None,
            resource_id: None,
            tenant_id: None,
            authority_host: None,
            federated_token_file: None,
            client_secret: None,
            client_secret_file: None,
            client_certificate_file: None,
            client_certificate_send_chain: false,
            arc_key_directory: PathBuf::from("/var/opt/azcmagent/tokens"),
            scope: "https://redis.azure.com/.default".into(),
            imds_endpoint: None,
            ca_file: None,
            attempt_timeout: Duration::from_secs(10),
            max_backoff: Duration::from_secs(60),
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            enabled: false,
            address: "127.0.0.1:9090".parse().expect("literal address"),
            readiness: Readiness::Credential,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".into(),
            max_per_minute: 20,
        }
    }
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            grace: Duration::from_secs(30),
            min_delay: Duration::ZERO,
        }
    }
}

/// Where a configuration comes from. `env` is passed in (tests give a map; `main`
/// gives the process environment), never read here.
pub struct Sources<'a> {
    /// A TOML file of defaults, below everything else (`--defaults`: the container
    /// image's own settings, which the user's file, environment and flags override).
    pub defaults: Option<&'a Path>,
    pub file: Option<&'a Path>,
    pub env: HashMap<String, String>,
    /// (key, value) pairs from flags; they win over everything.
    pub overrides: Vec<(String, String)>,
}

impl Config {
    /// Merge file, environment and flags, reject unknown keys, and validate.
    pub fn load(sources: Sources<'_>) -> Result<Config, ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(path) = sources.defaults {
            builder = builder.add_source(
                config::File::from(path)
                    .format(config::FileFormat::Toml)
                    .required(true),
            );
        }
        if let Some(path) = sources.file {
            builder = builder.add_source(
                config::File::from(path)
                    .format(config::FileFormat::Toml)
                    .required(true),
            );
        }
        // Only our own variables: the rest of the environment is none of our
        // business, and so are Kubernetes service links that share our prefix.
        let otel_env = sources.env.clone();
        let ours: config::Map<String, String> = sources
            .env
            .into_iter()
            .filter(|(k, v)| k.starts_with(&format!("{ENV_PREFIX}_")) && !is_service_link(k, v))
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("_")
                .separator("__")
                .source(Some(ours)),
        );
        for (key, value) in &sources.overrides {
            builder = builder
                .set_override(key.as_str(), value.as_str())
                .map_err(|e| invalid(key, e.to_string()))?;
        }
        let merged = builder.build().map_err(|source| ConfigError::File {
            path: sources.file.map(Path::to_path_buf).unwrap_or_default(),
            source,
        })?;
        check_known_keys(&merged)?;
        for path in sources.defaults.iter().chain(sources.file.iter()) {
            secrets::refuse_in_file(path)?;
        }
        for (key, values) in ENUM_VALUES {
            if let Ok(v) = merged.get::<String>(key) {
                if !values.contains(&v.as_str()) {
                    return Err(invalid(
                        key,
                        format!("`{v}` is not one of {}", values.join(", ")),
                    ));
                }
            }
        }
        let admin_address_set = merged.get::<String>("admin.address").is_ok();
        let admin_enabled_set = merged.get::<String>("admin.enabled").is_ok();
        let mut cfg: Config = merged.try_deserialize().map_err(map_deserialize_error)?;
        if admin_address_set && !admin_enabled_set {
            return Err(invalid(
                "admin.address",
                format!(
                    "is set but the admin server is off: set {} = true (or remove admin.address)",
                    describe_key("admin.enabled")
                ),
            ));
        }
        secrets::resolve(&mut cfg)?;
        cfg.otel.env = crate::otel::OtelEnv::from_env(&otel_env);
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.upstream.host.trim().is_empty() {
            return Err(ConfigError::Missing("upstream.host"));
        }
        if self.upstream.port == 0 {
            return Err(invalid("upstream.port", "must be 1-65535"));
        }
        let addrs = self.listen_addrs()?;
        if let Some(addr) = addrs.all().find(|a| !a.ip().is_loopback()) {
            if self.listen.password.is_none() {
                return Err(invalid(
                    "listen.address",
                    format!(
                        "{addr} is not a loopback address: set {} so that only your clients can use the proxy",
                        describe_key("listen.password")
                    ),
                ));
            }
        }
        if self.auth.source == AuthSource::Static
            && self
                .auth
                .static_
                .password
                .as_ref()
                .is_none_or(Secret::is_empty)
        {
            return Err(ConfigError::Missing("auth.static.password"));
        }
        if self.upstream.tls_insecure_skip_verify && !self.upstream.tls_insecure_send_credentials {
            return Err(invalid(
                "upstream.tls_insecure_skip_verify",
                format!(
                    "the proxy would send its credential (an Entra token or a password) to a server whose \
                     certificate is not verified, to anyone on the path; for a test, also set {} = true",
                    describe_key("upstream.tls_insecure_send_credentials")
                ),
            ));
        }
        if self.upstream.pool_size == 0 {
            return Err(invalid("upstream.pool_size", "must be at least 1"));
        }
        if self.upstream.max_pinned < self.upstream.warm_pinned {
            return Err(invalid(
                "upstream.warm_pinned",
                "cannot exceed upstream.max_pinned",
            ));
        }
        let l = &self.limits;
        for (key, v, min) in [
            ("limits.max_bulk_bytes", l.max_bulk_bytes, 1),
            ("limits.max_line_bytes", l.max_line_bytes, 64),
            ("limits.max_elements", l.max_elements, 1),
            ("limits.max_buffered_bytes", l.max_buffered_bytes, 1024),
            (
                "limits.max_pubsub_queued_bytes",
                l.max_pubsub_queued_bytes,
                1024,
            ),
        ] {
            if v < min {
                return Err(invalid(key, format!("must be at least {min}")));
            }
        }
        if self.auth.entra.attempt_timeout.is_zero() {
            return Err(invalid("auth.entra.attempt_timeout", "must be positive"));
        }
        check_log_level(&self.log.level).map_err(|reason| invalid("log.level", reason))?;
        self.otel.settings().map_err(|reason| {
            let key = [
                "otel.trace_sample_ratio",
                "otel.metrics_interval",
                "otel.export_timeout",
            ]
            .into_iter()
            .find(|k| reason.starts_with(k))
            .unwrap_or("otel.endpoint");
            invalid(key, reason)
        })?;
        Ok(())
    }

    /// The name the upstream certificate must carry (and the SNI we send).
    pub fn tls_server_name(&self) -> &str {
        self.upstream
            .server_name
            .as_deref()
            .unwrap_or(&self.upstream.host)
    }
}

fn check_known_keys(merged: &config::Config) -> Result<(), ConfigError> {
    let table = match &merged.cache.kind {
        config::ValueKind::Table(t) => t.clone(),
        _ => Default::default(),
    };
    let mut stack: Vec<(String, config::Value)> = table.into_iter().collect();
    while let Some((path, value)) = stack.pop() {
        let origin = value
            .origin()
            .map(|o| o.to_string())
            .unwrap_or_else(|| format!("a flag or env {}", env_name(&path)));
        match value.kind {
            config::ValueKind::Table(inner) if !KEYS.iter().any(|(k, _)| *k == path.as_str()) => {
                let is_section = KEYS.iter().any(|(k, _)| k.starts_with(&format!("{path}.")));
                if !is_section {
                    return Err(ConfigError::UnknownKey { key: path, origin });
                }
                stack.extend(inner.into_iter().map(|(k, v)| (format!("{path}.{k}"), v)));
            }
            _ => {
                if !KEYS.iter().any(|(k, _)| *k == path.as_str()) {
                    return Err(ConfigError::UnknownKey { key: path, origin });
                }
            }
        }
    }
    Ok(())
}

fn map_deserialize_error(e: config::ConfigError) -> ConfigError {
    // config's messages already say "for key `x.y`"; pull the key out so the
    // message also names the environment variable and flag.
    let msg = e.to_string();
    let key = msg
        .split("for key `")
        .nth(1)
        .and_then(|rest| rest.split('`').next())
        .map(str::to_string);
    match key {
        Some(key) => ConfigError::Invalid {
            reason: msg.split(" for key `").next().unwrap_or(&msg).to_string(),
            key,
        },
        None => ConfigError::Invalid {
            key: "?".into(),
            reason: msg,
        },
    }
}

#[cfg(test)]
mod tests;
