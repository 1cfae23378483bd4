//! Tokens and secrets never reach the logs, whatever happens to the rotator.
//! Alone in its own test binary: tracing caches per-callsite interest process-wide,
//! so a thread-local subscriber could miss events that tests on other threads
//! registered first.

mod common;

use common::token_emulator::{EmulatorConfig, Fault, TokenEmulator};
use redis_entra_proxy::auth::{self, EntraEnv};
use redis_entra_proxy::config::{AuthConfig, EntraCredentialKind};
use redis_entra_proxy::metrics::Metrics;
use redis_entra_proxy::secret::Secret;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A `std::io::Write` into a shared buffer, for capturing log output.
#[derive(Clone, Default)]
struct LogBuffer(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn tokens_and_secrets_never_reach_the_logs() {
    let logs = LogBuffer::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        // The SDK crates at trace too: their request logging must not leak either.
        .with_env_filter(
            "redis_entra_proxy=trace,azure_identity=trace,azure_core=trace,typespec_client_core=trace",
        )
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    // current_thread runtime: the rotator's task logs on this thread.
    let _guard = tracing::subscriber::set_default(subscriber);

    let emu = TokenEmulator::start(EmulatorConfig {
        lifetime: Duration::from_secs(3),
        ..Default::default()
    })
    .await;
    let emu_cfg = emu.config();
    emu.push_faults([Fault::unauthorized(), Fault::MalformedJson]);
    let mut cfg = AuthConfig::default();
    cfg.entra.credential = EntraCredentialKind::ClientSecret;
    cfg.entra.tenant_id = Some(emu_cfg.tenant.clone());
    cfg.entra.client_id = Some(emu_cfg.client_id.clone());
    cfg.entra.authority_host = Some(emu.authority_host());
    cfg.entra.ca_file = Some(emu.ca_file().to_path_buf());
    cfg.entra.client_secret = Some(Secret::new(emu_cfg.client_secret.clone()));
    cfg.entra.max_backoff = Duration::from_secs(1);
    let shutdown = CancellationToken::new();
    let mut rx = auth::start_with_env(
        &cfg,
        Arc::new(Metrics::new()),
        EntraEnv::default(),
        shutdown.clone(),
    )
    .unwrap();
    tokio::time::timeout(Duration::from_secs(15), rx.wait_for(|s| s.generation >= 2))
        .await
        .expect("two generations within 15 s")
        .unwrap();
    shutdown.cancel();
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(text.contains("new Entra token"), "{text}");
    assert!(
        text.contains("==> Request"),
        "the SDK's request logging ran: {text}"
    );
    assert!(
        text.contains("emu-oid-1") && text.contains("generation=2"),
        "{text}"
    );
    assert!(text.contains("401"), "{text}");
    assert!(text.contains("not JSON"), "{text}");
    assert!(
        !text.contains(&emu_cfg.client_secret),
        "client secret logged"
    );
    for t in emu.issued() {
        assert!(
            !text.contains(&t.token),
            "token of generation {} logged",
            t.generation
        );
        // Not even its signature or payload part.
        let sig = t.token.rsplit('.').next().unwrap();
        assert!(!text.contains(sig));
    }
}
