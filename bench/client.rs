//! The RESP client of the bench drivers (`bench/load.rs`, `bench/phases_load.rs`):
//! plain or TLS (server name `localhost`), whole replies read with the proxy's
//! own reply scanner.

use bytes::BytesMut;
use redis_entra_proxy::resp::command;
use redis_entra_proxy::resp::scan::ReplyScanner;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

pub fn tls(ca: &str) -> Result<tokio_rustls::TlsConnector, String> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca).map_err(|e| format!("{ca}: {e}"))?;
    for c in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots
            .add(c.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
}

pub enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// One client connection that writes commands and reads whole replies.
pub struct Client {
    io: Io,
    buf: BytesMut,
    scanner: ReplyScanner,
}

pub type Res<T> = Result<T, String>;

impl Client {
    /// Connect (TLS with server name `localhost` when `tls` is given) and,
    /// with `user`, AUTH with the password in `$BENCH_PASS`.
    pub async fn open(
        addr: SocketAddr,
        tls: Option<&Arc<tokio_rustls::TlsConnector>>,
        user: Option<&str>,
    ) -> Res<Client> {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let io = match tls {
            None => Io::Plain(tcp),
            Some(t) => {
                let name = rustls::pki_types::ServerName::try_from("localhost").expect("literal");
                Io::Tls(Box::new(
                    t.connect(name, tcp)
                        .await
                        .map_err(|e| format!("tls: {e}"))?,
                ))
            }
        };
        let mut c = Client {
            io,
            buf: BytesMut::with_capacity(16 * 1024),
            scanner: ReplyScanner::new(),
        };
        if let Some(user) = user {
            let pass = std::env::var("BENCH_PASS").map_err(|_| "BENCH_PASS is not set")?;
            let r = c
                .call(&command(&[b"AUTH", user.as_bytes(), pass.as_bytes()]), 1)
                .await?;
            if !r.starts_with(b"+OK") {
                return Err("AUTH refused".into());
            }
        }
        Ok(c)
    }

    pub async fn send(&mut self, bytes: &[u8]) -> Res<()> {
        self.io.write_all(bytes).await.map_err(|e| e.to_string())?;
        self.io.flush().await.map_err(|e| e.to_string())
    }

    /// Read `n` replies; returns the last one.
    pub async fn replies(&mut self, n: usize) -> Res<BytesMut> {
        let mut last = BytesMut::new();
        for _ in 0..n {
            loop {
                match self.scanner.scan(&self.buf).map_err(|e| e.0.to_string())? {
                    Some(r) => {
                        last = self.buf.split_to(r.len);
                        break;
                    }
                    None => {
                        if self.buf.capacity() - self.buf.len() < 4096 {
                            self.buf.reserve(16 * 1024);
                        }
                        let got = self
                            .io
                            .read_buf(&mut self.buf)
                            .await
                            .map_err(|e| e.to_string())?;
                        if got == 0 {
                            return Err("connection closed".into());
                        }
                    }
                }
            }
        }
        Ok(last)
    }

    pub async fn call(&mut self, bytes: &[u8], n: usize) -> Res<BytesMut> {
        self.send(bytes).await?;
        self.replies(n).await
    }
}
