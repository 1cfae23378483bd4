//! The client assertion of `auth.entra.credential = "client-certificate"`: an RS256
//! JWT signed with the app registration's certificate key, which
//! `azure_identity`'s `ClientAssertionCredential` ([`super::azure`]) sends to the
//! Entra token endpoint.
//!
//! The crate's own `ClientCertificateCredential` signs with OpenSSL, which this
//! project keeps out of its tree; the signature here is ring's RSASSA-PKCS1-v1_5
//! with SHA-256, the key and certificate read with rustls-pemfile. The file is a
//! PEM holding the certificate and its RSA private key (PKCS#8 or PKCS#1), as
//! `AZURE_CLIENT_CERTIFICATE_PATH` names for the other Azure SDKs; PKCS#12 (.pfx)
//! files are refused with a message saying how to convert them. The file is re-read
//! for every assertion, so a renewed certificate is picked up.

use super::AuthError;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{RsaKeyPair, RSA_PKCS1_SHA256};
use rustls::pki_types::PrivateKeyDer;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// How long an assertion is valid (Entra accepts up to 10 minutes and more).
const ASSERTION_LIFETIME_S: u64 = 600;

/// A certificate and key, loaded.
pub struct Certificate {
    key: RsaKeyPair,
    /// SHA-1 thumbprint, base64url (the `x5t` header Entra matches on).
    x5t: String,
    /// SHA-256 thumbprint, base64url (`x5t#S256`).
    x5t_s256: String,
    /// The certificate chain, base64 DER, leaf first (`x5c`, for subject-name/issuer
    /// authentication when `send_chain` is set).
    x5c: Vec<String>,
}

/// Why a certificate file cannot be used. Never contains key material.
fn bad(path: &Path, why: impl std::fmt::Display) -> AuthError {
    AuthError::Config(format!(
        "client certificate {} (auth.entra.client_certificate_file / AZURE_CLIENT_CERTIFICATE_PATH): {why}",
        path.display()
    ))
}

impl Certificate {
    /// Read and check `path` (PEM: certificate(s) and one RSA private key).
    pub fn load(path: &Path) -> Result<Certificate, AuthError> {
        let pem = std::fs::read(path).map_err(|e| bad(path, format!("cannot read it: {e}")))?;
        Certificate::from_pem(path, &pem)
    }

    fn from_pem(path: &Path, pem: &[u8]) -> Result<Certificate, AuthError> {
        if !pem.starts_with(b"-----") && !pem.windows(5).any(|w| w == b"-----") {
            return Err(bad(
                path,
                "not a PEM file (a .pfx must be converted: openssl pkcs12 -in cert.pfx -out cert.pem -nodes)",
            ));
        }
        let certs: Vec<_> = rustls_pemfile::certs(&mut &pem[..])
            .collect::<Result<_, _>>()
            .map_err(|_| bad(path, "a CERTIFICATE block is not valid PEM"))?;
        let Some(leaf) = certs.first() else {
            return Err(bad(path, "holds no CERTIFICATE"));
        };
        let key = rustls_pemfile::private_key(&mut &pem[..])
            .map_err(|_| bad(path, "a PRIVATE KEY block is not valid PEM"))?
            .ok_or_else(|| bad(path, "holds no PRIVATE KEY"))?;
        let key = match &key {
            PrivateKeyDer::Pkcs8(k) => RsaKeyPair::from_pkcs8(k.secret_pkcs8_der()),
            PrivateKeyDer::Pkcs1(k) => RsaKeyPair::from_der(k.secret_pkcs1_der()),
            _ => {
                return Err(bad(
                    path,
                    "the private key is not RSA (Entra certificate credentials are RSA)",
                ))
            }
        }
        .map_err(|e| {
            bad(
                path,
                format!("the private key is not a usable RSA key ({e}); Entra certificate credentials are RSA"),
            )
        })?;
        let sha1 = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, leaf.as_ref());
        let sha256 = ring::digest::digest(&ring::digest::SHA256, leaf.as_ref());
        Ok(Certificate {
            key,
            x5t: URL_SAFE_NO_PAD.encode(sha1.as_ref()),
            x5t_s256: URL_SAFE_NO_PAD.encode(sha256.as_ref()),
            x5c: certs.iter().map(|c| STANDARD.encode(c.as_ref())).collect(),
        })
    }

    /// A signed assertion for `client_id` at the token endpoint `audience`, valid
    /// from `now` for ten minutes.
    pub fn assertion(
        &self,
        client_id: &str,
        audience: &str,
        send_chain: bool,
        now: SystemTime,
    ) -> Result<String, String> {
        let rng = SystemRandom::new();
        let mut jti = [0u8; 16];
        rng.fill(&mut jti)
            .map_err(|_| "no random numbers for the assertion id".to_string())?;
        let now = now
            .duration_since(UNIX_EPOCH)
            .map_err(|_| "the clock is before 1970".to_string())?
            .as_secs();
        let mut header = serde_json::json!({
            "alg": "RS256",
            "typ": "JWT",
            "x5t": self.x5t,
            "x5t#S256": self.x5t_s256,
        });
        if send_chain {
            header["x5c"] = self.x5c.clone().into();
        }
        let claims = serde_json::json!({
            "aud": audience,
            "iss": client_id,
            "sub": client_id,
            "jti": jti.iter().map(|b| format!("{b:02x}")).collect::<String>(),
            "iat": now,
            "nbf": now,
            "exp": now + ASSERTION_LIFETIME_S,
        });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let mut sig = vec![0u8; self.key.public().modulus_len()];
        self.key
            .sign(&RSA_PKCS1_SHA256, &rng, signing_input.as_bytes(), &mut sig)
            .map_err(|_| "signing the client assertion failed".to_string())?;
        Ok(format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig)))
    }
}

/// A certificate file re-read for every assertion.
#[derive(Debug, Clone)]
pub struct CertificateFile {
    pub path: PathBuf,
    /// Send the chain (`x5c`) for subject-name/issuer authentication.
    pub send_chain: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_what_it_cannot_sign_with_and_never_quotes_key_material() {
        let p = Path::new("/x/cert.pem");
        let e = Certificate::from_pem(p, b"\x30\x82binary pfx")
            .err()
            .unwrap();
        assert!(e.to_string().contains("pkcs12"), "{e}");
        let e = Certificate::from_pem(p, b"-----BEGIN NOTHING-----\n-----END NOTHING-----\n")
            .err()
            .unwrap();
        assert!(e.to_string().contains("no CERTIFICATE"), "{e}");
        // An EC key (rcgen's default) is refused as not RSA.
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["x".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let pem = format!("{}{}", cert.pem(), key.serialize_pem());
        let e = Certificate::from_pem(p, pem.as_bytes()).err().unwrap();
        let text = e.to_string();
        assert!(text.contains("RSA"), "{text}");
        assert!(!text.contains("PRIVATE KEY-----"), "{text}");
    }
}
