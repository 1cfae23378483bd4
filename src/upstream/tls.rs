//! Dialling the cache: TCP connect, TLS 1.2/1.3 with rustls (ring provider),
//! SNI = `upstream.server_name` or the host, certificate verification against
//! the system roots plus `upstream.ca_file`, then `HELLO <2|3> AUTH <user> <token>`
//! with the current credential. Everything under `upstream.connect_timeout`.

use super::UpstreamError;
use crate::auth::TokenWatch;
use crate::config::Config;
use crate::resp::scan::ReplyScanner;
use crate::resp::{self, Proto};
use bytes::BytesMut;
use rustls::pki_types::ServerName;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

pub type Stream = tokio_rustls::client::TlsStream<TcpStream>;

/// An upstream connection that has completed TLS and AUTH.
pub struct Authed {
    pub stream: Stream,
    pub proto: Proto,
    /// Credential generation it authenticated with.
    pub generation: u64,
    /// When that credential expires (`None`: never).
    pub expires_at: Option<SystemTime>,
    /// Bytes read past the handshake reply (normally none).
    pub leftover: BytesMut,
    /// The server's HELLO reply fields (server, version, mode, role, modules).
    pub hello: Arc<Vec<(String, resp::Value)>>,
}

impl Authed {
    /// The server's id for this connection (HELLO's `id`): what `CLIENT
    /// UNBLOCK` and `CLIENT TRACKING ... REDIRECT` name.
    pub fn server_id(&self) -> Option<u64> {
        self.hello.iter().find_map(|(k, v)| match (k.as_str(), v) {
            ("id", resp::Value::Int(i)) => u64::try_from(*i).ok(),
            _ => None,
        })
    }
}

/// Builds TLS connections to the one configured upstream.
pub struct Connector {
    tls: TlsConnector,
    server_name: ServerName<'static>,
    host: String,
    port: u16,
    addr: String,
    connect_timeout: Duration,
    tokens: TokenWatch,
    /// The HELLO fields of the most recent connection, for clients' own HELLO.
    last_hello: std::sync::Mutex<Arc<Vec<(String, resp::Value)>>>,
    /// The command model, learned from the server's `COMMAND` on the first
    /// connection (shared with the connectors of a cluster's nodes). While
    /// one connection asks, connections dialled at the same time (the shared
    /// slots at start) wait for its answer rather than fetch the table too,
    /// and none is handed out before the model is known.
    learned: tokio::sync::OnceCell<Arc<crate::command::Commands>>,
    /// Where each HELLO AUTH outcome is recorded (readiness, metrics, log).
    acceptance: Arc<crate::acceptance::Acceptance>,
    /// Dials one cluster node found in the topology, not the configured endpoint.
    node: bool,
    /// Closed while the pub/sub hub subscribes again on this endpoint; its
    /// re-established shared connections wait for it (issue 18).
    resub: Arc<super::maintenance::resubscribe::ResubGate>,
    /// Where a `MOVING` push said the endpoint went, until its ttl: new
    /// connections dial there (issue 18: maintenance/moving.rs).
    moved: std::sync::Mutex<Option<super::maintenance::moving::Moved>>,
    /// Each dial is a span, when OpenTelemetry export is on.
    otel: Option<Arc<crate::otel::Telemetry>>,
}

/// The TLS client configuration: ring provider, TLS 1.2 and 1.3 only.
pub fn client_config(cfg: &Config) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = &cfg.upstream.ca_file {
        let pem = std::fs::read(path).map_err(|e| {
            format!(
                "config: cannot read upstream.ca_file {}: {e}",
                path.display()
            )
        })?;
        let mut added = 0;
        for cert in rustls_pemfile::certs(&mut &pem[..]) {
            let cert = cert.map_err(|e| format!("upstream.ca_file: bad PEM: {e}"))?;
            roots
                .add(cert)
                .map_err(|e| format!("upstream.ca_file: unusable certificate: {e}"))?;
            added += 1;
        }
        if added == 0 {
            return Err(format!(
                "upstream.ca_file {} holds no PEM certificate",
                path.display()
            ));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?;
    let config = if cfg.upstream.tls_insecure_skip_verify {
        tracing::error!(
            "upstream.tls_insecure_skip_verify = true: the upstream certificate is NOT verified; anyone on the path can read and change your traffic"
        );
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(danger::NoVerify))
            .with_no_client_auth()
    } else {
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    Ok(config)
}

impl Connector {
    pub fn new(cfg: &Config, tokens: TokenWatch) -> Result<Self, String> {
        let tls = TlsConnector::from(Arc::new(client_config(cfg)?));
        let name = cfg.tls_server_name().to_string();
        let server_name = ServerName::try_from(name.clone())
            .map_err(|e| format!("upstream.server_name `{name}` is not a valid TLS name: {e}"))?;
        Ok(Connector {
            tls,
            server_name,
            host: cfg.upstream.host.clone(),
            port: cfg.upstream.port,
            addr: format!("{}:{}", cfg.upstream.host, cfg.upstream.port),
            connect_timeout: cfg.upstream.connect_timeout,
            tokens,
            last_hello: Default::default(),
            learned: Default::default(),
            acceptance: Default::default(),
            node: false,
            resub: Default::default(),
            moved: Default::default(),
            otel: None,
        })
    }

    /// Record AUTH outcomes in `acceptance` (shared with readiness and metrics).
    pub fn with_acceptance(mut self, acceptance: Arc<crate::acceptance::Acceptance>) -> Self {
        self.acceptance = acceptance;
        self
    }

    /// Record each dial as a span (OpenTelemetry export on).
    pub fn with_otel(mut self, otel: Option<Arc<crate::otel::Telemetry>>) -> Self {
        self.otel = otel;
        self
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Whether this dials a cluster node (made by [`Connector::for_node`]).
    pub fn is_node(&self) -> bool {
        self.node
    }

    /// The same TLS settings, credential and server name (SNI and the name the
    /// certificate must show: the cache's, whatever the topology calls the
    /// node), dialling one cluster node at `host:port`.
    pub fn for_node(&self, host: &str, port: u16) -> Connector {
        let learned = tokio::sync::OnceCell::new_with(self.learned.get().cloned());
        Connector {
            tls: self.tls.clone(),
            server_name: self.server_name.clone(),
            host: host.to_string(),
            port,
            addr: super::topology::Node {
                host: host.to_string(),
                port,
            }
            .to_string(),
            connect_timeout: self.connect_timeout,
            tokens: self.tokens.clone(),
            last_hello: Default::default(),
            learned,
            acceptance: self.acceptance.clone(),
            node: true,
            resub: Default::default(),
            moved: Default::default(),
            otel: self.otel.clone(),
        }
    }

    /// A `MOVING` push named where the endpoint went: dial there until
    /// `moved.until` (the TLS name checked stays the configured one).
    pub fn set_moved(&self, moved: super::maintenance::moving::Moved) {
        *self.moved.lock().expect("not poisoned") = Some(moved);
    }

    /// Where the next connection goes: (host, port, the address for errors).
    fn dial_to(&self) -> (String, u16, String) {
        let moved = self.moved.lock().expect("not poisoned");
        match super::maintenance::moving::dial_target(moved.as_ref(), tokio::time::Instant::now()) {
            Some((host, port)) => (
                host.to_string(),
                port,
                format!("{host}:{port} (moved from {})", self.addr),
            ),
            None => (self.host.clone(), self.port, self.addr.clone()),
        }
    }

    /// The gate the pub/sub hub closes while it subscribes again here.
    pub fn resubscribe_gate(&self) -> &Arc<super::maintenance::resubscribe::ResubGate> {
        &self.resub
    }

    pub fn tokens(&self) -> &TokenWatch {
        &self.tokens
    }

    /// The server's HELLO fields as last seen (empty before the first connection).
    pub fn hello_fields(&self) -> Arc<Vec<(String, resp::Value)>> {
        self.last_hello.lock().expect("not poisoned").clone()
    }

    /// The command model with what the server's `COMMAND` said (`None`
    /// until the first connection has asked).
    pub fn learned(&self) -> Option<&crate::command::Commands> {
        self.learned.get().map(|c| &**c)
    }

    /// Dial, handshake and authenticate one connection speaking `proto`.
    pub async fn connect(&self, proto: Proto) -> Result<Authed, UpstreamError> {
        let start = SystemTime::now();
        let r = self.connect_timed(proto).await;
        if let Some(otel) = &self.otel {
            use crate::otel::encode::{attr_int, attr_str};
            otel.finished(
                "redis connect",
                3,
                start,
                vec![
                    attr_str("db.system.name", "redis"),
                    attr_str("server.address", &self.host),
                    attr_int("server.port", i64::from(self.port)),
                    attr_str(
                        "redis_entra_proxy.protocol",
                        match proto {
                            Proto::Resp2 => "RESP2",
                            Proto::Resp3 => "RESP3",
                        },
                    ),
                ],
                r.as_ref().err().map(|e| e.to_string()),
            );
        }
        r
    }

    async fn connect_timed(&self, proto: Proto) -> Result<Authed, UpstreamError> {
        let phase = std::sync::atomic::AtomicU8::new(PHASE_TCP);
        match tokio::time::timeout(self.connect_timeout, self.connect_inner(proto, &phase)).await {
            Ok(r) => r,
            Err(_) => Err(UpstreamError::Timeout {
                addr: self.addr.clone(),
                secs: self.connect_timeout.as_secs_f64(),
                during: match phase.load(std::sync::atomic::Ordering::Acquire) {
                    PHASE_TCP => "connecting (TCP)",
                    // A plaintext Redis reads the ClientHello as the start of an
                    // inline command and waits for its end: nothing comes back.
                    // Nor from a frozen server, whose kernel still accepts TCP.
                    PHASE_TLS => {
                        "in the TLS handshake, with no TLS answer: the server did not speak TLS (plaintext port?) or did not answer at all (stopped, overloaded?)"
                    }
                    _ => "authenticating (HELLO AUTH)",
                },
            }),
        }
    }

    /// The credential to connect with. While the first token is still on its
    /// way (no credential and no refresh error yet: a proxy that has just
    /// started, beside an app that has too), wait for it up to half of
    /// `upstream.connect_timeout` (the other half is the dial's), so the app's
    /// first commands are not refused; a refresh error ends the wait at once.
    async fn credential(&self) -> Result<(Arc<crate::auth::Credential>, u64), UpstreamError> {
        let mut watch = self.tokens.clone();
        let deadline = tokio::time::Instant::now() + self.connect_timeout / 2;
        loop {
            let reason = {
                let state = watch.borrow_and_update();
                if let Some(c) = state.usable(SystemTime::now()) {
                    return Ok((c.clone(), state.generation));
                }
                state.last_error.clone()
            };
            let waited = match reason {
                Some(_) => Err(()),
                None => tokio::time::timeout_at(deadline, watch.changed())
                    .await
                    .map_err(|_| ())
                    .and_then(|r| r.map_err(|_| ())),
            };
            if waited.is_err() {
                return Err(UpstreamError::NoCredential {
                    addr: self.addr.clone(),
                    reason: reason.unwrap_or_else(|| {
                        "waiting for the first Entra token from the token endpoint".into()
                    }),
                });
            }
        }
    }

    async fn connect_inner(
        &self,
        proto: Proto,
        phase: &std::sync::atomic::AtomicU8,
    ) -> Result<Authed, UpstreamError> {
        let (cred, generation) = self.credential().await?;
        let (host, port, addr) = self.dial_to();
        let tcp = TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| UpstreamError::Connect {
                addr: addr.clone(),
                reason: e.to_string(),
            })?;
        let _ = tcp.set_nodelay(true);
        phase.store(PHASE_TLS, std::sync::atomic::Ordering::Release);
        let mut stream = self
            .tls
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| UpstreamError::Tls {
                addr,
                reason: tls_reason(&e),
            })?;
        phase.store(PHASE_AUTH, std::sync::atomic::Ordering::Release);
        let version: &[u8] = match proto {
            Proto::Resp2 => b"2",
            Proto::Resp3 => b"3",
        };
        let hello = resp::command(&[
            b"HELLO",
            version,
            b"AUTH",
            cred.username.as_bytes(),
            cred.password.expose().as_bytes(),
        ]);
        stream
            .write_all(&hello)
            .await
            .map_err(|e| UpstreamError::Connect {
                addr: self.addr.clone(),
                reason: format!("writing HELLO: {e}"),
            })?;
        let mut buf = BytesMut::with_capacity(4096);
        let reply = self.read_reply(&mut stream, &mut buf, "HELLO").await?;
        if let Some(text) = resp::error_text(&reply) {
            self.acceptance
                .refused(generation, &cred.username, &text, std::time::Instant::now());
            return Err(UpstreamError::Auth {
                addr: self.addr.clone(),
                reason: format!("{text} (as user `{}`)", cred.username),
            });
        }
        self.acceptance.accepted(generation, &cred.username);
        // The first connection asks; the others wait for its answer. One
        // that fails (or the connect timeout dropping it) lets the next
        // waiting connection ask on its own stream. Before, a connection
        // dialled meanwhile was used at once, and a command judged by the
        // built-in table only (a RESP2 subscribed client's unknown command
        // got "Can't execute" instead of Redis's "unknown command").
        if !self.learned.initialized() {
            self.learned
                .get_or_try_init(|| self.learn_commands(&mut stream, &mut buf))
                .await?;
        }
        let hello = Arc::new(parse_hello(&reply));
        *self.last_hello.lock().expect("not poisoned") = hello.clone();
        Ok(Authed {
            stream,
            proto,
            generation,
            expires_at: cred.expires_at,
            leftover: buf,
            hello,
        })
    }
}

const PHASE_TCP: u8 = 0;
const PHASE_TLS: u8 = 1;
const PHASE_AUTH: u8 = 2;

/// A TLS handshake error, with a hint when the server answered with something
/// that is not TLS at all (a plaintext Redis's `-ERR ...`).
pub fn tls_reason(e: &std::io::Error) -> String {
    let text = e.to_string();
    if text.contains("InvalidContentType") || text.contains("corrupt message") {
        format!("the server did not speak TLS (plaintext port?): {text}")
    } else {
        text
    }
}

impl Connector {
    /// Read one whole reply during the handshake.
    async fn read_reply(
        &self,
        stream: &mut Stream,
        buf: &mut BytesMut,
        during: &str,
    ) -> Result<BytesMut, UpstreamError> {
        let mut scanner = ReplyScanner::new();
        loop {
            if let Some(r) = scanner
                .scan(buf)
                .map_err(|e| UpstreamError::Protocol(e.to_string()))?
            {
                return Ok(buf.split_to(r.len));
            }
            let n = stream
                .read_buf(buf)
                .await
                .map_err(|e| UpstreamError::Connect {
                    addr: self.addr.clone(),
                    reason: format!("reading {during} reply: {e}"),
                })?;
            if n == 0 {
                return Err(UpstreamError::Connect {
                    addr: self.addr.clone(),
                    reason: format!("server closed the connection during {during}"),
                });
            }
        }
    }

    /// Ask the server which commands it has (`COMMAND`, once per process):
    /// see [`Connector::learn`].
    async fn learn_commands(
        &self,
        stream: &mut Stream,
        buf: &mut BytesMut,
    ) -> Result<Arc<crate::command::Commands>, UpstreamError> {
        stream
            .write_all(&resp::command(&[b"COMMAND"]))
            .await
            .map_err(|e| UpstreamError::Connect {
                addr: self.addr.clone(),
                reason: format!("writing COMMAND: {e}"),
            })?;
        let reply = self.read_reply(stream, buf, "COMMAND").await?;
        Ok(Arc::new(model_of(&reply)))
    }

    /// Build the command model from `COMMAND`'s reply (arities, flags, key
    /// positions: blocking commands the routing table does not list are
    /// pinned too, a cluster finds module commands' keys), once. A server
    /// that refuses `COMMAND` leaves the built-in tables in charge.
    pub fn learn(&self, reply: &[u8]) {
        let _ = self.learned.set(Arc::new(model_of(reply)));
    }
}

/// The command model `COMMAND`'s reply gives (logged), or the built-in one.
fn model_of(reply: &[u8]) -> crate::command::Commands {
    match crate::command::Commands::from_command_reply(reply) {
        Some(l) => {
            tracing::info!(
                commands = l.known,
                blocking_not_in_table = ?l.blocking.iter().map(|b| String::from_utf8_lossy(b).into_owned()).collect::<Vec<_>>(),
                refused_unplaced = ?l.unplaced.iter().map(|b| String::from_utf8_lossy(b).into_owned()).collect::<Vec<_>>(),
                "learned the server's command table"
            );
            l
        }
        None if super::policy::is_noperm(reply) => {
            tracing::warn!(
                "{}",
                super::policy::refusal_line(
                    "COMMAND",
                    reply,
                    "routing (and finding keys) by the built-in table only"
                )
            );
            crate::command::Commands::builtin()
        }
        None => {
            tracing::info!(
                reply = %resp::error_text(reply).unwrap_or_else(|| "not a command table".into()),
                "the server did not list its commands; routing by the built-in table only"
            );
            crate::command::Commands::builtin()
        }
    }
}

/// The server's HELLO map, keeping the fields a client's own HELLO shows.
fn parse_hello(reply: &[u8]) -> Vec<(String, resp::Value)> {
    use redis_protocol::resp3::types::OwnedFrame as F;
    fn value(f: &F) -> resp::Value {
        match f {
            F::Number { data, .. } => resp::Value::Int(*data),
            F::BlobString { data, .. } | F::SimpleString { data, .. } => {
                resp::Value::Str(bytes::Bytes::copy_from_slice(data))
            }
            F::Array { data, .. } => resp::Value::List(data.iter().map(value).collect()),
            _ => resp::Value::Str(bytes::Bytes::new()),
        }
    }
    let items: Vec<(F, F)> = match resp::decode_reply(reply) {
        Some(F::Map { data, .. }) => data.into_iter().collect(),
        Some(F::Array { data, .. }) => {
            let mut it = data.into_iter();
            let mut v = Vec::new();
            while let (Some(k), Some(val)) = (it.next(), it.next()) {
                v.push((k, val));
            }
            v
        }
        _ => Vec::new(),
    };
    items
        .iter()
        .filter_map(|(k, v)| {
            let key = match k {
                F::BlobString { data, .. } | F::SimpleString { data, .. } => {
                    String::from_utf8_lossy(data).into_owned()
                }
                _ => return None,
            };
            Some((key, value(v)))
        })
        .collect()
}

mod danger {
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{DigitallySignedStruct, SignatureScheme};

    /// Accepts any certificate: only behind `upstream.tls_insecure_skip_verify`.
    #[derive(Debug)]
    pub struct NoVerify;

    impl ServerCertVerifier for NoVerify {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Ok(HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Ok(HandshakeSignatureValid::assertion())
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            rustls::crypto::ring::default_provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_non_tls_answer_is_named() {
        let e = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType),
        );
        let r = super::tls_reason(&e);
        assert!(r.contains("did not speak TLS (plaintext port?)"), "{r}");
        let e = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::Expired),
        );
        assert!(!super::tls_reason(&e).contains("plaintext"));
    }
}
