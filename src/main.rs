//! The `redis-entra-proxy` binary: flags, config, logging, signals. Everything
//! else lives in the library (`server::start`).

use clap::Parser;
use redis_entra_proxy::config::{self, Config, LogFormat, Sources, EX_CONFIG, EX_USAGE};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "redis-entra-proxy",
    version,
    about = "Plain RESP on localhost to Azure Redis over TLS with Entra ID tokens"
)]
struct Args {
    /// TOML config file (optional when everything comes from the environment).
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,
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
    let cfg = match Config::load(Sources {
        file: args.config.as_deref(),
        env: std::env::vars().collect(),
        overrides: args.overrides(),
    }) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("redis-entra-proxy: {e}");
            std::process::exit(EX_CONFIG);
        }
    };
    init_logging(&cfg);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = rt.block_on(run(cfg));
    std::process::exit(code);
}

fn init_logging(cfg: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&cfg.log.level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cfg.log.format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

async fn run(cfg: Config) -> i32 {
    let running = match redis_entra_proxy::server::start(&cfg).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("redis-entra-proxy: {e}");
            return match e {
                redis_entra_proxy::server::StartError::Config(_) => EX_CONFIG,
                _ => 1,
            };
        }
    };
    wait_for_signal().await;
    tracing::info!(
        grace_secs = cfg.shutdown.grace.as_secs_f64(),
        "shutting down: draining clients"
    );
    let second = tokio::spawn(async {
        wait_for_signal().await;
        eprintln!("redis-entra-proxy: second signal, exiting now");
        std::process::exit(130);
    });
    running.shutdown(cfg.shutdown.grace).await;
    second.abort();
    0
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
