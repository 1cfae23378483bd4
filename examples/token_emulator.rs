//! The tests' token-endpoint emulator as a process, for the quick start: Entra
//! tokens for redis-entra-proxy when no Azure is at hand, with Azure's "an
//! expired token closes the connection" played by a real redis-server.
//!
//! ```text
//! cargo run --example token_emulator -- --redis-port 6380 --ca DIR/ca.pem \
//!     --lifetime 15 --endpoint-file DIR/endpoint
//! ```
//!
//! Each token is a new generation with its own `oid` (`quickstart-oid-1`, `-2`,
//! ...; `--oid-prefix` changes the prefix, so that two emulators can share a
//! server). Before a token is handed out, its `oid` becomes an ACL user of the
//! redis-server whose password is the token; when the token expires that user
//! is deleted, and Redis closes every connection still authenticated as it, as
//! Azure does. The admin password for the redis-server comes from the
//! environment variable `EMULATOR_REDIS_ADMIN_PASSWORD` (user `admin`); ACL
//! commands go to `redis-cli` on its standard input, so no secret is on a command
//! line. Tokens are never printed. Writes the IMDS endpoint URL to
//! `--endpoint-file` once it listens, then serves until killed.

#[allow(dead_code)]
#[path = "../tests/common/tls.rs"]
mod tls;
#[allow(dead_code)]
#[path = "../tests/common/token_emulator.rs"]
mod token_emulator;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};
use token_emulator::{EmulatorConfig, Issued, TokenEmulator};

struct Args {
    redis_port: u16,
    ca: PathBuf,
    lifetime: u64,
    endpoint_file: PathBuf,
    /// Two emulators on one redis-server need their own ACL user names.
    oid_prefix: String,
}

fn parse_args() -> Result<Args, String> {
    let mut redis_port = None;
    let mut ca = None;
    let mut lifetime = 15;
    let mut endpoint_file = None;
    let mut oid_prefix = String::from("quickstart-oid-");
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--redis-port" => {
                redis_port = Some(value()?.parse().map_err(|e| format!("--redis-port: {e}"))?)
            }
            "--ca" => ca = Some(PathBuf::from(value()?)),
            "--lifetime" => lifetime = value()?.parse().map_err(|e| format!("--lifetime: {e}"))?,
            "--endpoint-file" => endpoint_file = Some(PathBuf::from(value()?)),
            "--oid-prefix" => oid_prefix = value()?,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(Args {
        redis_port: redis_port.ok_or("--redis-port is required")?,
        ca: ca.ok_or("--ca is required")?,
        lifetime,
        endpoint_file: endpoint_file.ok_or("--endpoint-file is required")?,
        oid_prefix,
    })
}

/// Run one command on the redis-server as `admin`, the command on stdin.
fn redis_admin(port: u16, ca: &PathBuf, command: &str) -> Result<String, String> {
    let mut child = Command::new("redis-cli")
        .arg("--tls")
        .arg("--cacert")
        .arg(ca)
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "--user",
            "admin",
        ])
        .env(
            "REDISCLI_AUTH",
            std::env::var("EMULATOR_REDIS_ADMIN_PASSWORD").unwrap_or_default(),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run redis-cli: {e}"))?;
    let mut stdin = child.stdin.take().expect("piped");
    stdin
        .write_all(format!("{command}\n").as_bytes())
        .map_err(|e| format!("redis-cli stdin: {e}"))?;
    drop(stdin);
    let out = child
        .wait_with_output()
        .map_err(|e| format!("redis-cli: {e}"))?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn now() -> String {
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    format!(
        "{:02}:{:02}:{:02}",
        secs / 3600 % 24,
        secs / 60 % 60,
        secs % 60
    )
}

#[tokio::main]
async fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("token_emulator: {e}");
            std::process::exit(64);
        }
    };
    let emu = TokenEmulator::start(EmulatorConfig {
        lifetime: Duration::from_secs(args.lifetime),
        oid_prefix: args.oid_prefix.clone(),
        ..Default::default()
    })
    .await;
    let (port, ca) = (args.redis_port, args.ca.clone());
    emu.on_issue(move |t: Issued| {
        let ca = ca.clone();
        async move {
            let set = format!("ACL SETUSER {} on >{} ~* &* +@all", t.oid, t.token);
            match redis_admin(port, &ca, &set) {
                Ok(r) if r == "OK" => {}
                Ok(r) => eprintln!("[token emulator] ACL SETUSER {} answered: {r}", t.oid),
                Err(e) => eprintln!("[token emulator] {e}"),
            }
            let lifetime = t
                .expires_at
                .duration_since(t.issued_at)
                .unwrap_or_default()
                .as_secs();
            println!(
                "[token emulator {}] issued token generation {} (oid {}), valid for {lifetime}s",
                now(),
                t.generation,
                t.oid
            );
            let oid = t.oid.clone();
            tokio::spawn(async move {
                let wait = t
                    .expires_at
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                tokio::time::sleep(wait).await;
                let _ = redis_admin(port, &ca, &format!("ACL DELUSER {oid}"));
                println!(
                    "[token emulator {}] token generation {} expired: deleted user {oid}; \
                     Redis closes connections still authenticated as it",
                    now(),
                    t.generation
                );
            });
        }
    });
    let endpoint = emu.imds_endpoint();
    if let Err(e) = std::fs::write(&args.endpoint_file, &endpoint) {
        eprintln!(
            "token_emulator: cannot write {}: {e}",
            args.endpoint_file.display()
        );
        std::process::exit(73);
    }
    println!(
        "[token emulator] IMDS endpoint {endpoint}, tokens valid for {}s",
        args.lifetime
    );
    // Serve until killed (the quick start stops it).
    std::future::pending::<()>().await;
}
