//! Writes a throwaway CA and a `localhost` server certificate into a folder,
//! for the quick start's local TLS redis-server: `cargo run --example testpki -- DIR`.

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

fn main() {
    let dir = std::env::args().nth(1).expect("usage: testpki DIR");
    let dir = std::path::Path::new(&dir);
    std::fs::create_dir_all(dir).expect("create the output folder");
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(
        rcgen::DnType::CommonName,
        "redis-entra-proxy quick start CA",
    );
    let ca = ca_params.self_signed(&ca_key).expect("CA certificate");
    let key = KeyPair::generate().expect("server key");
    let params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .expect("server params");
    let cert = params
        .signed_by(&key, &Issuer::from_params(&ca_params, &ca_key))
        .expect("server certificate");
    std::fs::write(dir.join("ca.pem"), ca.pem()).expect("write ca.pem");
    std::fs::write(dir.join("server.pem"), cert.pem()).expect("write server.pem");
    std::fs::write(dir.join("server.key"), key.serialize_pem()).expect("write server.key");
    println!("wrote ca.pem, server.pem, server.key to {}", dir.display());
}
