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
    /// listen.address
    #[arg(long)]
    listen_address: Option<String>,
    /// listen.unix_socket
    #[arg(long)]
    listen_unix_socket: Option<String>,
    /// upstream.host
    #[arg(long)]
    upstream_host: Option<String>,
    /// upstream.port
    #[arg(long)]
    upstream_port: Option<String>,
    /// upstream.ca_file
    #[arg(long)]
    upstream_ca_file: Option<String>,
    /// upstream.server_name
    #[arg(long)]
    upstream_server_name: Option<String>,
    /// auth.source (entra | static)
    #[arg(long)]
    auth_source: Option<String>,
    /// auth.username
    #[arg(long)]
    auth_username: Option<String>,
    /// auth.entra.credential
    #[arg(long)]
    auth_entra_credential: Option<String>,
    /// auth.entra.client_id
    #[arg(long)]
    auth_entra_client_id: Option<String>,
    /// admin.enabled
    #[arg(long)]
    admin_enabled: Option<String>,
    /// admin.address
    #[arg(long)]
    admin_address: Option<String>,
    /// log.format (text | json)
    #[arg(long)]
    log_format: Option<String>,
    /// log.level
    #[arg(long)]
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
    hangups.spawn(running.tokens.clone(), running.listen_password.clone());
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
