//! A test certificate authority made at run time with rcgen, for test servers on
//! loopback (the token emulator's https endpoint): a CA written as PEM for the
//! client to trust, and a rustls server config for `localhost` / `127.0.0.1`.

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A CA and one server certificate it signed.
pub struct TestCa {
    /// The CA certificate, PEM, on disk: pass it as a `ca_file`.
    pub ca_pem: PathBuf,
    /// The server certificate chain (leaf only) and key, for [`TestCa::server_config`].
    cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
}

impl TestCa {
    /// Make a CA named after `prefix`, write it to `dir/{prefix}-ca.pem`, and sign
    /// a server certificate for `names` (DNS names or IP addresses).
    pub fn new(dir: &Path, prefix: &str, names: &[&str]) -> TestCa {
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, format!("{prefix} test CA"));
        let ca = ca_params.self_signed(&ca_key).expect("CA certificate");
        let key = KeyPair::generate().expect("server key");
        let params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .expect("server params");
        let issuer = Issuer::from_params(&ca_params, &ca_key);
        let cert = params.signed_by(&key, &issuer).expect("server certificate");
        let ca_pem = dir.join(format!("{prefix}-ca.pem"));
        std::fs::write(&ca_pem, ca.pem()).expect("write CA PEM");
        TestCa {
            ca_pem,
            cert: cert.der().clone(),
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
        }
    }

    /// A rustls server config (ring provider) presenting the server certificate.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![self.cert.clone()],
                PrivateKeyDer::Pkcs8(self.key.clone_key()),
            )
            .expect("server certificate and key");
        Arc::new(config)
    }
}
