//! The same bytes to the proxy and to a plain redis-server (the twin), the
//! replies compared: where the proxy answers or tracks a command itself, it
//! must answer as Redis does.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// Encode one command (words split on spaces; `\0` stands for an empty word).
pub fn cmd(line: &str) -> Vec<u8> {
    let words: Vec<&[u8]> = line
        .split(' ')
        .map(|w| if w == "\\0" { &b""[..] } else { w.as_bytes() })
        .collect();
    redis_entra_proxy::resp::command(&words).to_vec()
}

/// Everything the peer writes until it has been quiet for `quiet` (or closed),
/// after at least `want` bytes arrived (hang guard: 20 s).
pub fn read_quiet(s: &mut TcpStream, want: usize, quiet: Duration) -> Vec<u8> {
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut chunk = [0u8; 65536];
    while Instant::now() < deadline {
        // Fewer bytes than the twin sent: wait longer for the rest.
        let wait = if out.len() >= want {
            quiet
        } else {
            Duration::from_secs(3).max(quiet)
        };
        s.set_read_timeout(Some(wait)).unwrap();
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&chunk[..n]),
        }
    }
    out
}

/// Send `setup` (replies dropped) then `lines`, pipelined, to both; the
/// replies to `lines`, as text (direct, proxy).
pub fn both(direct: u16, proxy: u16, setup: &[&str], lines: &[&str]) -> (String, String) {
    let run = |port: u16, want: usize| {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        if !setup.is_empty() {
            for l in setup {
                s.write_all(&cmd(l)).unwrap();
            }
            read_quiet(&mut s, 1, Duration::from_millis(300));
        }
        let all: Vec<u8> = lines.iter().flat_map(|l| cmd(l)).collect();
        s.write_all(&all).unwrap();
        String::from_utf8_lossy(&read_quiet(&mut s, want, Duration::from_millis(400))).into_owned()
    };
    let want = run(direct, 1);
    let got = run(proxy, want.len());
    (want, got)
}

/// Same, one command at a time (each reply awaited before the next is sent).
pub fn both_stepwise(direct: u16, proxy: u16, lines: &[&str]) -> (String, String) {
    let mut d = TcpStream::connect(("127.0.0.1", direct)).unwrap();
    let mut p = TcpStream::connect(("127.0.0.1", proxy)).unwrap();
    let (mut want, mut got) = (String::new(), String::new());
    for l in lines {
        d.write_all(&cmd(l)).unwrap();
        p.write_all(&cmd(l)).unwrap();
        let a = read_quiet(&mut d, 0, Duration::from_millis(150));
        let b = read_quiet(&mut p, a.len(), Duration::from_millis(150));
        want.push_str(&format!("{l} => {}\n", show(&a)));
        got.push_str(&format!("{l} => {}\n", show(&b)));
    }
    (want, got)
}

fn show(b: &[u8]) -> String {
    String::from_utf8_lossy(b).replace("\r\n", "\\r\\n ")
}
