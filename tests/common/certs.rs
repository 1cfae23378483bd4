//! Test certificates made at run time with rcgen: a CA, and a server
//! certificate for `localhost` / 127.0.0.1 signed by it.

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use std::path::{Path, PathBuf};

pub struct TestPki {
    pub ca_pem: PathBuf,
    pub cert_pem: PathBuf,
    pub key_pem: PathBuf,
}

/// Write a CA and a server certificate for `names` into `dir`.
pub fn make(dir: &Path, prefix: &str, names: &[&str]) -> TestPki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("{prefix} test CA"));
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let params =
        CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let cert = params.signed_by(&key, &issuer).unwrap();
    let pki = TestPki {
        ca_pem: dir.join(format!("{prefix}-ca.pem")),
        cert_pem: dir.join(format!("{prefix}-cert.pem")),
        key_pem: dir.join(format!("{prefix}-key.pem")),
    };
    std::fs::write(&pki.ca_pem, ca.pem()).unwrap();
    std::fs::write(&pki.cert_pem, cert.pem()).unwrap();
    std::fs::write(&pki.key_pem, key.serialize_pem()).unwrap();
    pki
}
