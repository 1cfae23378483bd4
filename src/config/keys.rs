//! The list of every configuration key, the values the enum-valued ones
//! accept, the command-line flags, and how a key is named in an error.

use super::ENV_PREFIX;

/// Every configuration key, with its default as the example file shows it.
pub const KEYS: &[(&str, &str)] = &[
    ("listen.address", "localhost:6379"),
    ("listen.unix_socket", "none"),
    ("listen.password", "none"),
    ("listen.password_file", "none"),
    ("listen.max_clients", "10000"),
    ("listen.cluster_face", "true"),
    ("limits.max_bulk_bytes", "536870912"),
    ("limits.max_line_bytes", "65536"),
    ("limits.max_elements", "1048576"),
    ("limits.max_buffered_bytes", "1073741824"),
    ("limits.max_pubsub_queued_bytes", "33554432"),
    ("upstream.host", "required"),
    ("upstream.port", "6380"),
    ("upstream.ca_file", "none"),
    ("upstream.server_name", "upstream.host"),
    ("upstream.tls_insecure_skip_verify", "false"),
    ("upstream.tls_insecure_send_credentials", "false"),
    ("upstream.connect_timeout", "10s"),
    ("upstream.reply_timeout", "30s"),
    ("upstream.keepalive", "60s"),
    ("upstream.hold", "15s"),
    ("upstream.azure_events", "auto"),
    ("upstream.pool_size", "2"),
    ("upstream.warm_pinned", "2"),
    ("upstream.max_pinned", "256"),
    ("upstream.cluster", "auto"),
    ("auth.source", "entra"),
    ("auth.username", "oid claim of each token"),
    ("auth.static.password", "none"),
    ("auth.static.password_file", "none"),
    ("auth.entra.credential", "auto"),
    ("auth.entra.client_id", "none"),
    ("auth.entra.object_id", "none"),
    ("auth.entra.resource_id", "none"),
    ("auth.entra.tenant_id", "AZURE_TENANT_ID"),
    (
        "auth.entra.authority_host",
        "AZURE_AUTHORITY_HOST or https://login.microsoftonline.com",
    ),
    (
        "auth.entra.federated_token_file",
        "AZURE_FEDERATED_TOKEN_FILE",
    ),
    ("auth.entra.client_secret", "none"),
    ("auth.entra.client_secret_file", "none"),
    (
        "auth.entra.client_certificate_file",
        "AZURE_CLIENT_CERTIFICATE_PATH",
    ),
    ("auth.entra.client_certificate_send_chain", "false"),
    ("auth.entra.arc_key_directory", "/var/opt/azcmagent/tokens"),
    ("auth.entra.scope", "https://redis.azure.com/.default"),
    (
        "auth.entra.imds_endpoint",
        "http://169.254.169.254/metadata/identity/oauth2/token",
    ),
    ("auth.entra.ca_file", "none"),
    ("auth.entra.attempt_timeout", "10s"),
    ("auth.entra.max_backoff", "60s"),
    ("admin.enabled", "false"),
    ("admin.address", "127.0.0.1:9090"),
    ("admin.readiness", "credential"),
    ("log.format", "text"),
    ("log.level", "info"),
    ("log.max_per_minute", "20"),
    ("shutdown.grace", "30s"),
    ("shutdown.min_delay", "0s"),
    ("otel.enabled", "false"),
    (
        "otel.endpoint",
        "OTEL_EXPORTER_OTLP_ENDPOINT, else http://localhost:4318",
    ),
    (
        "otel.service_name",
        "OTEL_SERVICE_NAME, else redis-entra-proxy",
    ),
    ("otel.metrics_interval", "60s"),
    ("otel.export_timeout", "10s"),
    ("otel.trace_sample_ratio", "0.01"),
];

/// The values each enum-valued key accepts (besides `log.level`, a filter: see
/// [`check_log_level`]). Checked before deserializing, so that the error names them.
pub const ENUM_VALUES: &[(&str, &[&str])] = &[
    ("upstream.cluster", &["auto", "on", "off"]),
    ("auth.source", &["entra", "static"]),
    (
        "auth.entra.credential",
        &[
            "auto",
            "managed-identity",
            "workload-identity",
            "client-secret",
            "client-certificate",
            "azure-cli",
            "azure-developer-cli",
            "azd",
            "developer-tools",
        ],
    ),
    ("admin.readiness", &["listening", "credential", "upstream"]),
    ("log.format", &["text", "json"]),
];

/// The level names `log.level` accepts, alone or as `target=level`.
pub const LOG_LEVELS: &[&str] = &["error", "warn", "info", "debug", "trace", "off"];

/// `log.level`: a level name, or comma-separated directives `target=level` (a
/// level alone among them sets the default). A bare word that is not a level is
/// refused: tracing would read `warning` as "every level of the target
/// `warning`", which silences everything else.
pub fn check_log_level(filter: &str) -> Result<(), String> {
    let accepted = || {
        format!(
            "expected one of {} (or target=level, ...)",
            LOG_LEVELS.join(", ")
        )
    };
    let is_level = |l: &str| LOG_LEVELS.iter().any(|k| k.eq_ignore_ascii_case(l.trim()));
    if filter.trim().is_empty() {
        return Err(format!("is empty: {}", accepted()));
    }
    for directive in filter.split(',') {
        let level = match directive.rsplit_once('=') {
            Some((_target, level)) => level,
            None => directive,
        };
        if !is_level(level) {
            return Err(format!("`{}` is not a level: {}", level.trim(), accepted()));
        }
    }
    tracing_subscriber::EnvFilter::try_new(filter)
        .map(|_| ())
        .map_err(|e| format!("{e}: {}", accepted()))
}

/// Command-line flags for the common keys: (flag, key).
pub const FLAGS: &[(&str, &str)] = &[
    ("--listen-address", "listen.address"),
    ("--listen-unix-socket", "listen.unix_socket"),
    ("--upstream-host", "upstream.host"),
    ("--upstream-port", "upstream.port"),
    ("--upstream-ca-file", "upstream.ca_file"),
    ("--upstream-server-name", "upstream.server_name"),
    ("--auth-source", "auth.source"),
    ("--auth-username", "auth.username"),
    ("--auth-entra-credential", "auth.entra.credential"),
    ("--auth-entra-client-id", "auth.entra.client_id"),
    ("--admin-enabled", "admin.enabled"),
    ("--admin-address", "admin.address"),
    ("--log-format", "log.format"),
    ("--log-level", "log.level"),
];

/// The environment variable of a key: `upstream.host` -> `REDIS_ENTRA_PROXY_UPSTREAM__HOST`.
pub fn env_name(key: &str) -> String {
    format!("{ENV_PREFIX}_{}", key.replace('.', "__").to_uppercase())
}

fn flag_of(key: &str) -> Option<&'static str> {
    FLAGS.iter().find(|(_, k)| *k == key).map(|(f, _)| *f)
}

/// How to name a key in an error so the user can find where to fix it.
pub fn describe_key(key: &str) -> String {
    match flag_of(key) {
        Some(flag) => format!("`{key}` (env {}, flag {flag})", env_name(key)),
        None => format!("`{key}` (env {})", env_name(key)),
    }
}
