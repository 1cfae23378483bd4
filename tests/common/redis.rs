//! A real `redis-server` on loopback with TLS only (no plaintext port), the
//! default user disabled, and ACL users made by the test. Stopped on drop.

use super::certs::{self, TestPki};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    pub port: u16,
    pub pki: TestPki,
    pub dir: tempfile::TempDir,
    child: Child,
}

/// The password of the `admin` ACL user tests use to inspect the server.
pub const ADMIN_PASSWORD: &str = "admin-test-password";

pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

impl RedisServer {
    /// Start with one ACL user `user` whose password is `password`.
    pub fn start(user: &str, password: &str) -> RedisServer {
        RedisServer::start_with(user, password, None, "")
    }

    /// [`RedisServer::start`] with `extra` lines appended to its redis.conf
    /// and, given `pki`, that certificate and CA instead of its own (servers
    /// that replicate over TLS, or that one front routes to, share one).
    pub fn start_with(
        user: &str,
        password: &str,
        pki: Option<&TestPki>,
        extra: &str,
    ) -> RedisServer {
        assert!(
            Command::new("redis-server")
                .arg("--version")
                .output()
                .is_ok(),
            "redis-server is not installed: run .ci/run or apt-get install redis-server"
        );
        let dir = tempfile::tempdir().unwrap();
        let pki = match pki {
            Some(p) => TestPki {
                ca_pem: p.ca_pem.clone(),
                cert_pem: p.cert_pem.clone(),
                key_pem: p.key_pem.clone(),
            },
            None => certs::make(dir.path(), "redis", &["localhost", "127.0.0.1"]),
        };
        let port = free_port();
        let conf = format!(
            "port 0\ntls-port {port}\nbind 127.0.0.1\ntls-cert-file {}\ntls-key-file {}\ntls-ca-cert-file {}\ntls-auth-clients no\nsave \"\"\nappendonly no\ndir {}\nuser default off\nuser admin on >{ADMIN_PASSWORD} ~* &* +@all\nuser {user} on >{password} ~* &* +@all\n{}logfile {}\n{extra}",
            pki.cert_pem.display(),
            pki.key_pem.display(),
            pki.ca_pem.display(),
            dir.path().display(),
            super::policies::conf_lines(),
            dir.path().join("redis.log").display(),
        );
        let conf_path = dir.path().join("redis.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let child = spawn(&conf_path);
        let server = RedisServer {
            port,
            pki,
            dir,
            child,
        };
        server.wait_ready();
        server
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = self.cli(&["PING"]);
            if out.trim() == "PONG" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not start: {out}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kill the server (as a crash would); `start_again` brings it back on the same port.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn start_again(&mut self) {
        self.child = spawn(&self.dir.path().join("redis.conf"));
        self.wait_ready();
    }

    /// Stop the server without closing its sockets (SIGSTOP), as a stalled
    /// or overloaded server looks to its clients; `resume` continues it.
    pub fn pause(&self) {
        signal(self.child.id(), "-STOP");
    }

    pub fn resume(&self) {
        signal(self.child.id(), "-CONT");
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    /// Run redis-cli straight against the TLS port as `admin`.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = admin_cli(self.port, &self.pki.ca_pem)
            .args(args)
            .output()
            .expect("run redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    }
}

/// `redis-cli` to a TLS server on loopback `port` as `admin`; add the
/// command's arguments.
pub fn admin_cli(port: u16, ca: &std::path::Path) -> Command {
    let mut cmd = Command::new("redis-cli");
    cmd.args(["--tls", "--cacert"])
        .arg(ca)
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args([
            "--user",
            "admin",
            "--pass",
            ADMIN_PASSWORD,
            "--no-auth-warning",
        ]);
    cmd
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill {sig} {pid} failed");
}

fn spawn(conf: &std::path::Path) -> Child {
    Command::new("redis-server")
        .arg(conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start redis-server")
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain redis-server (no TLS, no ACL) on a loopback port: the reference a
/// test compares the proxy's bytes with. Stopped on drop.
pub struct PlainRedis {
    pub port: u16,
    _dir: tempfile::TempDir,
    child: Child,
}

impl PlainRedis {
    pub fn start() -> PlainRedis {
        PlainRedis::start_with(&[])
    }

    /// With extra `redis-server` arguments (`--cluster-enabled yes`, ...).
    pub fn start_with(extra: &[&str]) -> PlainRedis {
        let dir = tempfile::tempdir().unwrap();
        // A free port can be taken by another test's server between the
        // probe and the bind: then this one exits and another answers. Only
        // a server that reports this child's pid counts; otherwise try again.
        for _ in 0..10 {
            let port = free_port();
            let mut child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .args(extra)
                .arg("--dir")
                .arg(dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start redis-server");
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if child.try_wait().ok().flatten().is_some() {
                    break;
                }
                if serves_pid(port, child.id()) {
                    return PlainRedis {
                        port,
                        _dir: dir,
                        child,
                    };
                }
                assert!(
                    Instant::now() < deadline,
                    "plain redis-server did not start"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("plain redis-server could not bind a free port in 10 tries");
    }
}

/// Whether the server on `port` is the process `pid` (`INFO server`).
fn serves_pid(port: u16, pid: u32) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"*2\r\n$4\r\nINFO\r\n$6\r\nserver\r\n")
        .is_err()
    {
        return false;
    }
    let want = format!("process_id:{pid}\r\n");
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    while got.len() < 1 << 16 {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return false,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
        }
        let text = String::from_utf8_lossy(&got);
        if text.contains(&want) {
            return true;
        }
        if text.contains("process_id:") && text.ends_with("\r\n\r\n") {
            return false;
        }
    }
    false
}

impl Drop for PlainRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
