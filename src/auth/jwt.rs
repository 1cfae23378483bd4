//! Reading the claims of a JWT-shaped access token, for the Entra rotator
//! ([`super::rotator`]): the username the proxy sends upstream is the token's `oid`
//! claim, and `exp` is the fallback expiry when a token endpoint does not say.
//!
//! No signature check: the proxy only forwards the token it was given by a trusted
//! endpoint; the Redis server is the one that verifies it. Errors never quote the
//! token or any part of it.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::Deserialize;

/// The claims of an access token that the proxy uses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Claims {
    /// Object id of the identity: the username for `AUTH`.
    #[serde(default)]
    pub oid: Option<String>,
    /// Expiry, Unix seconds.
    #[serde(default)]
    pub exp: Option<u64>,
    /// Issued at, Unix seconds.
    #[serde(default)]
    pub iat: Option<u64>,
    /// Audience: a string, or a list of them (`check` shows and checks it).
    #[serde(default)]
    pub aud: Option<serde_json::Value>,
    /// Tenant id.
    #[serde(default)]
    pub tid: Option<String>,
    /// A user's sign-in name, when the identity is a user.
    #[serde(default)]
    pub upn: Option<String>,
    /// The client (application) id the token was issued to.
    #[serde(default)]
    pub appid: Option<String>,
}

impl Claims {
    /// The `aud` claim as a list (empty when absent).
    pub fn audiences(&self) -> Vec<String> {
        match &self.aud {
            Some(serde_json::Value::String(s)) => vec![s.clone()],
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
            _ => Vec::new(),
        }
    }
}

/// The application id of Azure Cache for Redis: tokens for it may carry this as
/// their `aud` instead of the URI.
pub const REDIS_APP_ID: &str = "acca5fbb-b7e4-4009-81f1-37e38fd66d78";

/// Whether `aud` names Azure Redis (`https://redis.azure.com`, a sovereign
/// cloud's `https://redis.azure.*`, or the application id).
pub fn is_redis_audience(aud: &str) -> bool {
    let a = aud.trim_end_matches('/');
    a == REDIS_APP_ID || a.to_ascii_lowercase().starts_with("https://redis.azure.")
}

/// What to say about a token's audience: `None` when it is Azure Redis's (or the
/// token carries none to judge), else a warning naming the audience and the setting.
pub fn audience_warning(claims: &Claims) -> Option<String> {
    let aud = claims.audiences();
    if aud.is_empty() || aud.iter().any(|a| is_redis_audience(a)) {
        return None;
    }
    Some(format!(
        "the token's audience is {}, not Azure Redis: the cache will refuse it (WRONGPASS); set auth.entra.scope to https://redis.azure.com/.default",
        aud.join(" ")
    ))
}

/// Why a token's claims could not be read. Never contains the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("token is not JWT-shaped (expected three dot-separated parts)")]
    Shape,
    #[error("token payload is not base64url")]
    Base64,
    #[error("token payload is not a JSON object of claims")]
    Json,
}

/// Decode the payload (second part) of a JWT without checking its signature.
pub fn claims(token: &str) -> Result<Claims, JwtError> {
    let mut parts = token.split('.');
    let (Some(_header), Some(payload), Some(_sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Shape);
    };
    // Tokens are unpadded base64url; tolerate padding from odd issuers.
    let bytes = URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|_| JwtError::Base64)?;
    // serde_json's messages can quote input: map to a fixed message.
    serde_json::from_slice(&bytes).map_err(|_| JwtError::Json)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(payload: &str) -> String {
        format!(
            "{}.{}.c2ln",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256","typ":"JWT"}"#),
            URL_SAFE_NO_PAD.encode(payload)
        )
    }

    #[test]
    fn audiences_are_judged() {
        let c = |aud: &str| claims(&token(&format!(r#"{{"oid":"o","aud":{aud}}}"#))).unwrap();
        assert_eq!(audience_warning(&c(r#""https://redis.azure.com""#)), None);
        assert_eq!(audience_warning(&c(&format!("\"{REDIS_APP_ID}\""))), None);
        assert_eq!(
            audience_warning(&c(r#"["x","https://redis.azure.com/"]"#)),
            None
        );
        let w = audience_warning(&c(r#""https://management.azure.com""#)).unwrap();
        assert!(w.contains("https://management.azure.com") && w.contains("auth.entra.scope"));
        assert!(!is_redis_audience("https://management.azure.com"));
    }

    #[test]
    fn reads_oid_and_exp() {
        let c = claims(&token(
            r#"{"oid":"0000-abc","exp":1700000000,"iat":1699996400,"aud":"https://redis.azure.com"}"#,
        ))
        .unwrap();
        assert_eq!(c.oid.as_deref(), Some("0000-abc"));
        assert_eq!(c.exp, Some(1_700_000_000));
        assert_eq!(c.iat, Some(1_699_996_400));
    }

    #[test]
    fn missing_claims_are_none() {
        let c = claims(&token(r#"{"sub":"x"}"#)).unwrap();
        assert_eq!(c, Claims::default());
    }

    #[test]
    fn tolerates_padding() {
        let padded = format!(
            "h.{}.s",
            base64::engine::general_purpose::URL_SAFE.encode(r#"{"oid":"a"}"#)
        );
        assert!(padded.contains('='), "{padded}");
        assert_eq!(claims(&padded).unwrap().oid.as_deref(), Some("a"));
    }

    #[test]
    fn errors_never_quote_the_token() {
        let secret = "not-a-jwt-SECRETVALUE";
        let e = claims(secret).unwrap_err();
        assert_eq!(e, JwtError::Shape);
        let e = claims("a.SECRET!!.c").unwrap_err();
        assert_eq!(e, JwtError::Base64);
        let bad_json = format!("a.{}.c", URL_SAFE_NO_PAD.encode("SECRETVALUE"));
        let e = claims(&bad_json).unwrap_err();
        assert_eq!(e, JwtError::Json);
        for e in [JwtError::Shape, JwtError::Base64, JwtError::Json] {
            assert!(!e.to_string().contains("SECRET"));
        }
        // A payload whose oid has the wrong type must not be echoed either.
        let wrong = token(r#"{"oid":["SECRETVALUE"]}"#);
        let e = claims(&wrong).unwrap_err();
        assert!(!e.to_string().contains("SECRET"), "{e}");
    }
}
