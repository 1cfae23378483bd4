//! The real `redis-entra-proxy` binary started as a child process with its
//! configuration in environment variables, on a free loopback port.

use super::redis::{free_port, RedisServer};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Proxy {
    pub port: u16,
    pub log: std::path::PathBuf,
    child: Child,
    _dir: tempfile::TempDir,
}

/// Environment for a proxy in front of `redis` with a static credential.
pub fn static_env(redis: &RedisServer, user: &str, password: &str) -> Vec<(String, String)> {
    [
        ("REDIS_ENTRA_PROXY_UPSTREAM__HOST", "localhost".to_string()),
        ("REDIS_ENTRA_PROXY_UPSTREAM__PORT", redis.port.to_string()),
        (
            "REDIS_ENTRA_PROXY_UPSTREAM__CA_FILE",
            redis.pki.ca_pem.display().to_string(),
        ),
        ("REDIS_ENTRA_PROXY_AUTH__SOURCE", "static".to_string()),
        ("REDIS_ENTRA_PROXY_AUTH__USERNAME", user.to_string()),
        (
            "REDIS_ENTRA_PROXY_AUTH__STATIC__PASSWORD",
            password.to_string(),
        ),
        (
            "REDIS_ENTRA_PROXY_UPSTREAM__CONNECT_TIMEOUT",
            "3s".to_string(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

impl Proxy {
    pub fn start(env: &[(String, String)]) -> Proxy {
        Proxy::start_on(env, "127.0.0.1")
    }

    /// Listening on `host` (`localhost`: both 127.0.0.1 and ::1) at a free port.
    pub fn start_on(env: &[(String, String)], host: &str) -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let log = dir.path().join("proxy.log");
        let child = Command::new(env!("CARGO_BIN_EXE_redis-entra-proxy"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env(
                "REDIS_ENTRA_PROXY_LISTEN__ADDRESS",
                format!("{host}:{port}"),
            )
            .env("REDIS_ENTRA_PROXY_LOG__LEVEL", "debug")
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start redis-entra-proxy");
        let mut p = Proxy {
            port,
            log,
            child,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = p.child.try_wait() {
                panic!("proxy exited with {status}: {}", p.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "proxy did not listen: {}",
                p.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        p
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// A raw client socket with a read timeout.
    pub fn raw(&self) -> TcpStream {
        let s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s
    }

    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Ok(dir) = std::env::var("KEEP_PROXY_LOG") {
            let _ = std::fs::copy(
                &self.log,
                std::path::Path::new(&dir).join(format!("proxy-{}.log", self.port)),
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Send `input`, then read until `expect` bytes arrived or the peer closed.
pub fn roundtrip(s: &mut TcpStream, input: &[u8], expect: usize) -> Vec<u8> {
    s.write_all(input).unwrap();
    read_n(s, expect)
}

pub fn read_n(s: &mut TcpStream, expect: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    while out.len() < expect {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => panic!("read failed after {} bytes: {e}", out.len()),
        }
    }
    out
}

/// Read until the peer closes (or 20 s pass).
pub fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

/// A raw RESP client for tests: sends commands, reads whole replies.
pub struct Raw {
    pub s: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    pub fn connect(port: u16) -> Raw {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Raw { s, buf: Vec::new() }
    }

    pub fn send(&mut self, args: &[&str]) {
        let refs: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        self.s
            .write_all(&redis_entra_proxy::resp::command(&refs))
            .unwrap();
    }

    /// Read one complete reply (any RESP2/RESP3 type).
    pub fn read(&mut self) -> Vec<u8> {
        let mut scanner = redis_entra_proxy::resp::scan::ReplyScanner::new();
        loop {
            if let Some(r) = scanner.scan(&self.buf).unwrap() {
                return self.buf.drain(..r.len).collect();
            }
            let mut chunk = [0u8; 65536];
            let n = self.s.read(&mut chunk).expect("reply within 20 s");
            assert!(
                n > 0,
                "connection closed; had {:?}",
                String::from_utf8_lossy(&self.buf)
            );
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// One complete reply if one arrives within `wait`, else `None` (the
    /// connection stays usable; part of a reply read meanwhile is kept).
    pub fn try_read(&mut self, wait: Duration) -> Option<Vec<u8>> {
        let deadline = std::time::Instant::now() + wait;
        loop {
            let mut scanner = redis_entra_proxy::resp::scan::ReplyScanner::new();
            if let Some(r) = scanner.scan(&self.buf).unwrap() {
                return Some(self.buf.drain(..r.len).collect());
            }
            let left = deadline.checked_duration_since(std::time::Instant::now())?;
            self.s
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            let mut chunk = [0u8; 65536];
            let got = self.s.read(&mut chunk);
            self.s
                .set_read_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            match got {
                Ok(0) => panic!("connection closed"),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(_) => return None,
            }
        }
    }

    pub fn call(&mut self, args: &[&str]) -> String {
        self.send(args);
        String::from_utf8_lossy(&self.read()).into_owned()
    }
}

/// A plain HTTP/1.1 request to the admin port: (status, body).
/// Turn the proxy's admin server on at a free loopback port; returns the port.
/// Environment for a proxy in front of `redis` that takes Entra tokens from
/// the emulator's managed-identity (IMDS) endpoint.
pub fn entra_imds_env(
    redis: &RedisServer,
    emu: &super::token_emulator::TokenEmulator,
) -> Vec<(String, String)> {
    [
        ("REDIS_ENTRA_PROXY_UPSTREAM__HOST", "localhost".to_string()),
        ("REDIS_ENTRA_PROXY_UPSTREAM__PORT", redis.port.to_string()),
        (
            "REDIS_ENTRA_PROXY_UPSTREAM__CA_FILE",
            redis.pki.ca_pem.display().to_string(),
        ),
        ("REDIS_ENTRA_PROXY_UPSTREAM__CONNECT_TIMEOUT", "3s".into()),
        ("REDIS_ENTRA_PROXY_AUTH__SOURCE", "entra".into()),
        (
            "REDIS_ENTRA_PROXY_AUTH__ENTRA__CREDENTIAL",
            "managed-identity".into(),
        ),
        (
            "REDIS_ENTRA_PROXY_AUTH__ENTRA__IMDS_ENDPOINT",
            emu.imds_endpoint(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// Give each token the emulator issues an ACL user (its `oid`, the token as
/// password, every key, channel and command), made before the token is
/// handed out; then wait `delay` (a token endpoint that takes its time).
pub fn acl_user_per_token(
    redis: &RedisServer,
    emu: &super::token_emulator::TokenEmulator,
    delay: Duration,
) {
    let (port, ca) = (redis.port, redis.pki.ca_pem.clone());
    emu.on_issue(move |t: super::token_emulator::Issued| {
        let ca = ca.clone();
        async move {
            let pass = format!(">{}", t.token);
            let out = super::redis::admin_cli(port, &ca)
                .args(["ACL", "SETUSER", &t.oid, "on", &pass, "~*", "&*", "+@all"])
                .output()
                .unwrap();
            assert!(out.status.success());
            tokio::time::sleep(delay).await;
        }
    });
}

pub fn enable_admin(env: &mut Vec<(String, String)>) -> u16 {
    let admin = free_port();
    env.push(("REDIS_ENTRA_PROXY_ADMIN__ENABLED".into(), "true".into()));
    env.push((
        "REDIS_ENTRA_PROXY_ADMIN__ADDRESS".into(),
        format!("127.0.0.1:{admin}"),
    ));
    admin
}

/// Sum of the samples in the metrics text whose lines start with `prefix`.
pub fn metric_sum(metrics: &str, prefix: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub fn http(port: u16, method: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}
