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
//! line. Tokens are never printed. `--redis-port` may be given once per node of
//! a cluster: each user is made on every node; with `--resync`, every second,
//! on any node that lacks a live one (restarted, or frozen at issue); with
//! `--acl-save`, each change is followed by `ACL SAVE` (nodes with an
//! `aclfile`). Writes the IMDS endpoint URL to
//! `--endpoint-file` once it listens, then serves until killed.

#[allow(dead_code)]
#[path = "../tests/common/tls.rs"]
mod tls;
#[allow(dead_code)]
#[path = "../tests/common/token_emulator.rs"]
mod token_emulator;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use token_emulator::{EmulatorConfig, Issued, TokenEmulator};
use tokio::io::AsyncWriteExt;

struct Args {
    /// One or more redis-servers (every node of a cluster): each token's ACL
    /// user is made on all of them.
    redis_ports: Vec<u16>,
    ca: PathBuf,
    lifetime: u64,
    endpoint_file: PathBuf,
    /// Two emulators on one redis-server need their own ACL user names.
    oid_prefix: String,
    /// Every second, make the live tokens' users again on any server that
    /// lacks them (a cluster node restarted, or frozen when a token was issued).
    resync: bool,
    /// `ACL SAVE` after each change (nodes with an `aclfile`: a restarted
    /// node has the users from the start).
    acl_save: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut redis_ports = Vec::new();
    let mut ca = None;
    let mut lifetime = 15;
    let mut endpoint_file = None;
    let mut oid_prefix = String::from("quickstart-oid-");
    let mut resync = false;
    let mut acl_save = false;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--redis-port" => {
                redis_ports.push(value()?.parse().map_err(|e| format!("--redis-port: {e}"))?)
            }
            "--ca" => ca = Some(PathBuf::from(value()?)),
            "--lifetime" => lifetime = value()?.parse().map_err(|e| format!("--lifetime: {e}"))?,
            "--endpoint-file" => endpoint_file = Some(PathBuf::from(value()?)),
            "--oid-prefix" => oid_prefix = value()?,
            "--resync" => resync = true,
            "--acl-save" => acl_save = true,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if redis_ports.is_empty() {
        return Err("--redis-port is required".into());
    }
    Ok(Args {
        redis_ports,
        ca: ca.ok_or("--ca is required")?,
        lifetime,
        endpoint_file: endpoint_file.ok_or("--endpoint-file is required")?,
        oid_prefix,
        resync,
        acl_save,
    })
}

/// Run one command on a redis-server as `admin`, the command on stdin; gives up
/// after 2 s (a frozen or dead node must not hold the other servers back).
async fn redis_admin(port: u16, ca: &Path, command: &str) -> Result<String, String> {
    let mut child = tokio::process::Command::new("redis-cli")
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
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run redis-cli: {e}"))?;
    let mut stdin = child.stdin.take().expect("piped");
    stdin
        .write_all(format!("{command}\n").as_bytes())
        .await
        .map_err(|e| format!("redis-cli stdin: {e}"))?;
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(2), child.wait_with_output())
        .await
        .map_err(|_| format!("redis-cli to port {port}: no answer in 2s"))?
        .map_err(|e| format!("redis-cli: {e}"))?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The same command on every server, at once; the answers in port order.
async fn on_every_port(ports: &[u16], ca: &Path, command: &str) -> Vec<Result<String, String>> {
    let tasks: Vec<_> = ports
        .iter()
        .map(|&port| {
            let (ca, command) = (ca.to_path_buf(), command.to_string());
            tokio::spawn(async move { redis_admin(port, &ca, &command).await })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap_or_else(|e| Err(e.to_string())));
    }
    out
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
    let (ports, ca) = (Arc::new(args.redis_ports.clone()), args.ca.clone());
    // A change of users, followed by `ACL SAVE` with --acl-save; the answer
    // of a change that worked, then.
    let save = if args.acl_save { "\nACL SAVE" } else { "" };
    let ok = if args.acl_save { "OK\nOK" } else { "OK" };
    // The users of the tokens not yet expired: oid -> token.
    let live: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let (hook_ports, hook_ca, hook_live) = (ports.clone(), ca.clone(), live.clone());
    emu.on_issue(move |t: Issued| {
        let (ports, ca, live) = (hook_ports.clone(), hook_ca.clone(), hook_live.clone());
        async move {
            live.lock()
                .expect("not poisoned")
                .insert(t.oid.clone(), t.token.clone());
            let set = format!("ACL SETUSER {} on >{} ~* &* +@all{save}", t.oid, t.token);
            for (port, r) in ports.iter().zip(on_every_port(&ports, &ca, &set).await) {
                match r {
                    Ok(r) if r == ok => {}
                    Ok(r) => eprintln!(
                        "[token emulator] ACL SETUSER {} on port {port} answered: {r}",
                        t.oid
                    ),
                    Err(e) => eprintln!("[token emulator] {e}"),
                }
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
                live.lock().expect("not poisoned").remove(&oid);
                let _ = on_every_port(&ports, &ca, &format!("ACL DELUSER {oid}{save}")).await;
                println!(
                    "[token emulator {}] token generation {} expired: deleted user {oid}; \
                     Redis closes connections still authenticated as it",
                    now(),
                    t.generation
                );
            });
        }
    });
    if args.resync {
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let users = on_every_port(&ports, &ca, "ACL USERS").await;
                let wanted: Vec<(String, String)> = live
                    .lock()
                    .expect("not poisoned")
                    .iter()
                    .map(|(o, t)| (o.clone(), t.clone()))
                    .collect();
                for (port, have) in ports.iter().zip(users) {
                    // A frozen or dead server: next round.
                    let Ok(have) = have else { continue };
                    for (oid, token) in &wanted {
                        if have.lines().any(|u| u == oid) {
                            continue;
                        }
                        let set = format!("ACL SETUSER {oid} on >{token} ~* &* +@all{save}");
                        match redis_admin(*port, &ca, &set).await {
                            Ok(r) if r == ok => println!(
                                "[token emulator {}] made user {oid} again on port {port}",
                                now()
                            ),
                            Ok(r) => eprintln!("[token emulator] resync on port {port}: {r}"),
                            Err(e) => eprintln!("[token emulator] {e}"),
                        }
                    }
                }
            }
        });
    }
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
