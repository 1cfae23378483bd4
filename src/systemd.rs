//! systemd's service notification protocol (`Type=notify`), by hand: one datagram
//! of `KEY=VALUE` lines to the Unix socket named by `$NOTIFY_SOCKET` (a path, or
//! `@name` for an abstract socket). `main` sends `READY=1` once the client listener
//! is up, `STATUS=...` lines as things change and `STOPPING=1` when the drain
//! begins. Without `$NOTIFY_SOCKET` (not under systemd) nothing is sent.

use std::os::unix::net::UnixDatagram;

/// Where to send notifications: `$NOTIFY_SOCKET`, read once at start.
#[derive(Debug, Clone)]
pub struct Notifier {
    socket: Option<String>,
}

impl Notifier {
    /// From the value of `$NOTIFY_SOCKET` (`None`: not under systemd).
    pub fn new(socket: Option<String>) -> Notifier {
        Notifier {
            socket: socket.filter(|s| !s.is_empty()),
        }
    }

    /// Send `state` (newline-separated `KEY=VALUE` lines). Failures are logged and
    /// otherwise ignored: a missing notification is systemd's timeout to report,
    /// never a reason for the proxy to stop.
    pub fn notify(&self, state: &str) {
        let Some(socket) = &self.socket else {
            return;
        };
        if let Err(e) = send(socket, state) {
            tracing::warn!(socket = %socket, error = %e, "systemd notification failed");
        }
    }
}

fn send(socket: &str, state: &str) -> std::io::Result<usize> {
    let sock = UnixDatagram::unbound()?;
    match socket.strip_prefix('@') {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
            sock.send_to_addr(state.as_bytes(), &addr)
        }
        None => sock.send_to(state.as_bytes(), socket),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_to_a_path_or_an_abstract_socket_and_never_fails() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.sock");
        let rx = UnixDatagram::bind(&path).unwrap();
        Notifier::new(Some(path.display().to_string())).notify("READY=1\nSTATUS=up");
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=up");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("redis-entra-proxy-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let rx = UnixDatagram::bind_addr(&addr).unwrap();
        Notifier::new(Some(format!("@{name}"))).notify("STOPPING=1");
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");

        // Nobody listening, or not under systemd: nothing happens.
        Notifier::new(Some(dir.path().join("gone").display().to_string())).notify("READY=1");
        Notifier::new(None).notify("READY=1");
    }
}
