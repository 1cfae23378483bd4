//! The `redis-entra-proxy` binary: flags, config, logging, signals. Everything
//! else lives in the library (`server::start`).

use clap::Parser;
use redis_entra_proxy::config::{self, Config, Sources, EX_CONFIG, EX_USAGE};
use redis_entra_proxy::logging::{self, stderr_line, LogSink};
use std::path::PathBuf;
use std::time::Duration;

/// jemalloc rather than glibc's malloc: with 10,000 idle clients the proxy
/// held 46 MB instead of 82 MB, and 41 MB instead of 76 MB 5 s after they
/// left (mimalloc: 87 MB with only 1,000). A long-lived daemon that sees
/// bursts of clients should give the memory back (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read before `main` (the `_RJEM_MALLOC_CONF`
/// environment variable overrides them). By default jemalloc returns freed
/// pages only when the process allocates again, 10 s after they were freed:
/// an idle proxy kept the memory of its last burst. A background thread
/// returns them while the proxy is idle, after 1 s (bench/MEMORY.md: after
/// the unread-client burst, RSS back near its start).
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &[u8; 43] = b"background_thread:true,dirty_decay_ms:1000\0";

#[derive(Parser, Debug)]
#[command(
    name = "redis-entra-proxy",
    version,
    about = "Plain RESP on localhost to Azure Redis over TLS with Entra ID tokens"
)]
struct Args {
    #[command(subcommand)]
    command: Option<Cmd>,
    /// TOML config file (optional when everything comes from the environment).
    #[arg(long, short = 'c', value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    /// TOML file of defaults, below the config file, the environment and the flags
    /// (the container image passes its own: admin server on [::]:9090).
    #[arg(long, value_name = "FILE", global = true)]
    defaults: Option<PathBuf>,
    /// Where clients connect: HOST:PORT, or a comma-separated list; `localhost`
    /// is 127.0.0.1 and ::1; a non-loopback address needs listen.password
    /// [env REDIS_ENTRA_PROXY_LISTEN__ADDRESS, TOML listen.address; default localhost:6379]
    #[arg(long, value_name = "HOST:PORT")]
    listen_address: Option<String>,
    /// Also listen on this Unix socket path (a live socket of another process
    /// there stops the start) [env REDIS_ENTRA_PROXY_LISTEN__UNIX_SOCKET, TOML listen.unix_socket]
    #[arg(long, value_name = "PATH")]
    listen_unix_socket: Option<String>,
    /// The cache's host name, e.g. NAME.redis.cache.windows.net (required)
    /// [env REDIS_ENTRA_PROXY_UPSTREAM__HOST, TOML upstream.host]
    #[arg(long, value_name = "HOST")]
    upstream_host: Option<String>,
    /// The cache's TLS port: 6380 for Azure Cache for Redis, 10000 for Azure
    /// Managed Redis [env REDIS_ENTRA_PROXY_UPSTREAM__PORT, TOML upstream.port; default 6380]
    #[arg(long, value_name = "PORT")]
    upstream_port: Option<String>,
    /// Extra PEM trust anchors for the cache's certificate (private CAs, tests)
    /// [env REDIS_ENTRA_PROXY_UPSTREAM__CA_FILE, TOML upstream.ca_file]
    #[arg(long, value_name = "FILE")]
    upstream_ca_file: Option<String>,
    /// The name the cache's certificate must carry, when you connect through
    /// another name (private endpoint IP, CNAME)
    /// [env REDIS_ENTRA_PROXY_UPSTREAM__SERVER_NAME, TOML upstream.server_name]
    #[arg(long, value_name = "NAME")]
    upstream_server_name: Option<String>,
    /// Where the proxy's own credential comes from: entra (tokens) or static
    /// (an access key) [env REDIS_ENTRA_PROXY_AUTH__SOURCE, TOML auth.source; default entra]
    #[arg(long, value_name = "entra|static")]
    auth_source: Option<String>,
    /// The username the proxy AUTHs as; by default each token's oid claim
    /// [env REDIS_ENTRA_PROXY_AUTH__USERNAME, TOML auth.username]
    #[arg(long, value_name = "NAME")]
    auth_username: Option<String>,
    /// Which Entra credential to use: auto, managed-identity, workload-identity,
    /// client-secret, client-certificate, azure-cli, azure-developer-cli, developer-tools
    /// [env REDIS_ENTRA_PROXY_AUTH__ENTRA__CREDENTIAL, TOML auth.entra.credential; default auto]
    #[arg(long, value_name = "KIND")]
    auth_entra_credential: Option<String>,
    /// The client (application) id of a user-assigned managed identity or an app
    /// registration [env REDIS_ENTRA_PROXY_AUTH__ENTRA__CLIENT_ID, TOML auth.entra.client_id]
    #[arg(long, value_name = "ID")]
    auth_entra_client_id: Option<String>,
    /// Serve /startup, /livez, /readyz, /metrics and /quitquitquit (bare: true;
    /// `=false` to turn it off)
    /// [env REDIS_ENTRA_PROXY_ADMIN__ENABLED, TOML admin.enabled; default false]
    #[arg(long, value_name = "true|false", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    admin_enabled: Option<String>,
    /// The admin server's address (needs admin.enabled)
    /// [env REDIS_ENTRA_PROXY_ADMIN__ADDRESS, TOML admin.address; default 127.0.0.1:9090]
    #[arg(long, value_name = "HOST:PORT")]
    admin_address: Option<String>,
    /// Log line format on stderr: text or json
    /// [env REDIS_ENTRA_PROXY_LOG__FORMAT, TOML log.format; default text]
    #[arg(long, value_name = "text|json")]
    log_format: Option<String>,
    /// How much to log: error, warn, info, debug, trace or off, or target=level
    /// directives [env REDIS_ENTRA_PROXY_LOG__LEVEL, TOML log.level; default info]
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<String>,
}

#[derive(clap::Subcommand, Debug)]
enum Cmd {
    /// Ask the admin endpoint of a running proxy (exit 0 when healthy): for
    /// container HEALTHCHECKs in images without a shell or curl.
    Healthcheck {
        /// Endpoint to ask.
        #[arg(default_value = "/readyz")]
        path: String,
    },
    /// Will this configuration work? Obtain a token and show its claims, connect
    /// (TLS version, certificate names), AUTH, HELLO, cluster or not, the commands
    /// the proxy needs, one round trip: a line per step, a hint per failure; exit 0
    /// only when all pass. Takes the same configuration as a run.
    Check,
}

impl Args {
    fn overrides(&self) -> Vec<(String, String)> {
        let pairs = [
            ("listen.address", &self.listen_address),
            ("listen.unix_socket", &self.listen_unix_socket),
            ("upstream.host", &self.upstream_host),
            ("upstream.port", &self.upstream_port),
            ("upstream.ca_file", &self.upstream_ca_file),
            ("upstream.server_name", &self.upstream_server_name),
            ("auth.source", &self.auth_source),
            ("auth.username", &self.auth_username),
            ("auth.entra.credential", &self.auth_entra_credential),
            ("auth.entra.client_id", &self.auth_entra_client_id),
            ("admin.enabled", &self.admin_enabled),
            ("admin.address", &self.admin_address),
            ("log.format", &self.log_format),
            ("log.level", &self.log_level),
        ];
        debug_assert_eq!(pairs.len(), config::FLAGS.len());
        pairs
            .into_iter()
            .filter_map(|(k, v)| v.clone().map(|v| (k.to_string(), v)))
            .collect()
    }
}

fn main() {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let code = if e.use_stderr() { EX_USAGE } else { 0 };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    let loaded = Config::load(Sources {
        defaults: args.defaults.as_deref(),
        file: args.config.as_deref(),
        env: std::env::vars().collect(),
        overrides: args.overrides(),
    });
    if let Some(Cmd::Healthcheck { path }) = &args.command {
        // Works even when the full config does not load here (no upstream
        // host in the healthcheck's environment, say).
        let addr = match &loaded {
            Ok(c) => c.admin.address,
            Err(_) => std::env::var(config::env_name("admin.address"))
                .ok()
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| "127.0.0.1:9090".parse().expect("literal")),
        };
        std::process::exit(redis_entra_proxy::admin::healthcheck(addr, path));
    }
    let cfg = match loaded {
        Ok(c) => c,
        Err(e) => {
            stderr_line(&format!("redis-entra-proxy: {e}"));
            std::process::exit(EX_CONFIG);
        }
    };
    let log = logging::init(
        cfg.log.format,
        &redis_entra_proxy::auth::log_filter(&cfg.log.level),
        cfg.log.max_per_minute,
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Some(Cmd::Check) = &args.command {
        let steps = rt.block_on(redis_entra_proxy::check::run(&cfg));
        let report = format!(
            "{}\n{}",
            redis_entra_proxy::check::header(&cfg),
            redis_entra_proxy::check::verdict::render(&steps)
        );
        let _ = std::io::Write::write_all(&mut std::io::stdout(), report.as_bytes());
        let code = if redis_entra_proxy::check::passed(&steps) {
            0
        } else {
            1
        };
        exit(&log, code);
    }
    let code = rt.block_on(run(cfg, log.clone()));
    exit(&log, code);
}

/// Exit with `code` once the log lines already queued are written (briefly: a log
/// pipe nobody reads cannot hold the exit up).
fn exit(log: &LogSink, code: i32) -> ! {
    log.flush(Duration::from_secs(1));
    std::process::exit(code)
}

async fn run(cfg: Config, log: LogSink) -> i32 {
    // Before anything listens: a SIGHUP from then on must find its handler.
    let hangups = match redis_entra_proxy::shutdown::Hangups::install() {
        Ok(h) => h,
        Err(e) => {
            tracing::error!("cannot install the SIGHUP handler: {e}");
            return 1;
        }
    };
    let running = match redis_entra_proxy::server::start(&cfg).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("{e}");
            return match e {
                redis_entra_proxy::server::StartError::Config(_) => EX_CONFIG,
                _ => 1,
            };
        }
    };
    let stop = running.stop.clone();
    // First SIGTERM/SIGINT cancels `stop` (as /quitquitquit does); a second one exits at once.
    let exit_now = move |status| exit(&log, status);
    if let Err(e) = redis_entra_proxy::shutdown::spawn_signal_handler(stop.clone(), exit_now) {
        tracing::error!("cannot install signal handlers: {e}");
        return 1;
    }
    let listen_password = running.listen_password.clone();
    hangups.spawn(running.tokens.clone(), move || listen_password.reload());
    let systemd = redis_entra_proxy::systemd::Notifier::new(std::env::var("NOTIFY_SOCKET").ok());
    systemd.notify(&format!(
        "READY=1\nSTATUS=listening on {:?}",
        running.tcp_addrs
    ));
    stop.cancelled().await;
    systemd.notify("STOPPING=1\nSTATUS=draining");
    tracing::info!(
        grace_secs = cfg.shutdown.grace.as_secs_f64(),
        min_delay_secs = cfg.shutdown.min_delay.as_secs_f64(),
        "shutting down: readiness false, draining clients"
    );
    running.shutdown(cfg.shutdown.grace).await;
    0
}
