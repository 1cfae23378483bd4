//! The client side of the admin server: a tiny blocking GET for the container
//! `HEALTHCHECK`, where there is no curl and no shell.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// Probe the admin server at `addr` with `GET path` and return a process exit status
/// for a container `HEALTHCHECK`: 0 on 200, 1 on anything else (including no answer
/// within 5 s). Prints the status line and body to stdout (Docker keeps it in the
/// health log). An unspecified `addr` (`0.0.0.0:9090`, the usual container setting)
/// is probed on loopback. Blocking, std only: call it before starting a runtime.
pub fn healthcheck(addr: SocketAddr, path: &str) -> i32 {
    match probe(addr, path, Duration::from_secs(5)) {
        // Written without `println!`, which panics on a closed stdout.
        Ok((200, body)) => {
            stdout_line(&format!("200 {}", body.trim_end()));
            0
        }
        Ok((status, body)) => {
            stdout_line(&format!("{status} {}", body.trim_end()));
            1
        }
        Err(e) => {
            stdout_line(&format!("healthcheck: {addr}{path}: {e}"));
            1
        }
    }
}

fn stdout_line(line: &str) {
    let _ = writeln!(std::io::stdout(), "{line}");
}

/// One blocking HTTP/1.1 GET with a total deadline; returns (status, body).
fn probe(addr: SocketAddr, path: &str, timeout: Duration) -> std::io::Result<(u16, String)> {
    // An unspecified address (`[::]`, `0.0.0.0`) listens on 127.0.0.1 whether it got
    // IPv6 or fell back to IPv4; ::1 is the way in where 127.0.0.1 is refused.
    if addr.ip().is_unspecified() {
        let port = addr.port();
        return probe_one(
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port),
            path,
            timeout,
        )
        .or_else(|_| {
            probe_one(
                SocketAddr::new(Ipv6Addr::LOCALHOST.into(), port),
                path,
                timeout,
            )
        });
    }
    probe_one(addr, path, timeout)
}

fn probe_one(addr: SocketAddr, path: &str, timeout: Duration) -> std::io::Result<(u16, String)> {
    let deadline = Instant::now() + timeout;
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: redis-entra-proxy-healthcheck\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no complete answer in time",
            ));
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut buf)? {
            0 => break,
            n if response.len() < 64 * 1024 => response.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP response")
        })?;
    Ok((status, body.to_string()))
}
