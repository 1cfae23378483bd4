//! `listen.address`: which TCP addresses the client listener binds. The default,
//! `localhost:6379`, is both loopbacks, because clients resolve `localhost` to
//! `::1` first as often as to 127.0.0.1 (Node.js 17+, many images).

use super::{invalid, Config, ConfigError};
use std::net::SocketAddr;

/// The TCP addresses of `listen.address`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenAddrs {
    /// Failing to listen on one of these is an error.
    pub required: Vec<SocketAddr>,
    /// Listened on when the machine has them (IPv6 loopback may be turned off in a
    /// container); skipped, with a log line, when it does not.
    pub if_available: Vec<SocketAddr>,
}

impl ListenAddrs {
    /// Every address, required first.
    pub fn all(&self) -> impl Iterator<Item = &SocketAddr> {
        self.required.iter().chain(&self.if_available)
    }
}

impl Config {
    /// The TCP addresses to listen on. `localhost:PORT` (the default) is
    /// 127.0.0.1 and, where the machine has IPv6, [::1] (clients that resolve
    /// `localhost` to `::1` first, as Node.js 17+ does, must find the proxy there
    /// too). Otherwise a comma-separated list of `HOST:PORT`, every one required.
    pub fn listen_addrs(&self) -> Result<ListenAddrs, ConfigError> {
        let text = self.listen.address.trim();
        if let Some(port) = text.strip_prefix("localhost:") {
            let port: u16 = port
                .parse()
                .map_err(|e| invalid("listen.address", format!("`{text}`: bad port: {e}")))?;
            return Ok(ListenAddrs {
                required: vec![SocketAddr::from(([127, 0, 0, 1], port))],
                if_available: vec![SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port))],
            });
        }
        let required = text
            .split(',')
            .map(|a| {
                a.trim().parse().map_err(|e| {
                    invalid(
                        "listen.address",
                        format!("`{}` is not HOST:PORT (or localhost:PORT): {e}", a.trim()),
                    )
                })
            })
            .collect::<Result<Vec<SocketAddr>, _>>()?;
        Ok(ListenAddrs {
            required,
            if_available: vec![],
        })
    }

    /// The first TCP listen address.
    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        Ok(self.listen_addrs()?.required[0])
    }
}
