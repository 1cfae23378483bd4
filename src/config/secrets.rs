//! Secrets in the configuration: `listen.password`, `auth.static.password` and
//! `auth.entra.client_secret` come from the environment or from a file of their
//! own (`<key>_file`: Kubernetes and Docker secrets are files), never from the TOML
//! file, which gets committed and copied around.

use super::{describe_key, invalid, Config, ConfigError};
use crate::secret::Secret;
use std::path::Path;

/// (secret key, its `_file` key).
pub const SECRET_KEYS: &[(&str, &str)] = &[
    ("listen.password", "listen.password_file"),
    ("auth.static.password", "auth.static.password_file"),
    ("auth.entra.client_secret", "auth.entra.client_secret_file"),
];

/// Refuse any secret written in the TOML file at `path`.
pub(super) fn refuse_in_file(path: &Path) -> Result<(), ConfigError> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let Ok(parsed) = text.parse::<toml::Table>() else {
        return Ok(());
    };
    let root = toml::Value::Table(parsed);
    for (key, file_key) in SECRET_KEYS {
        if key
            .split('.')
            .try_fold(&root, |v, part| v.get(part))
            .is_some()
        {
            return Err(invalid(
                key,
                format!(
                    "is not accepted in the config file: set the environment variable or {}",
                    describe_key(file_key)
                ),
            ));
        }
    }
    Ok(())
}

/// Read a secret from `path` for `key`: the file's contents without a trailing line
/// ending (`echo` adds one). An unreadable or empty file is an error naming the key.
pub fn read_secret_file(key: &str, path: &Path) -> Result<Secret, ConfigError> {
    let text = zeroize::Zeroizing::new(
        std::fs::read_to_string(path)
            .map_err(|e| invalid(key, format!("cannot read {}: {e}", path.display())))?,
    );
    let value = text.trim_end_matches(['\n', '\r']);
    if value.is_empty() {
        return Err(invalid(key, format!("{} is empty", path.display())));
    }
    Ok(Secret::new(value))
}

/// Fill `listen.password` and `auth.static.password` from their `_file` keys
/// (setting both a secret and its file is an error). The client secret's file is
/// left to the Entra source, which reads it for every token request.
pub(super) fn resolve(cfg: &mut Config) -> Result<(), ConfigError> {
    let both = |key: &str, file_key: &str| {
        invalid(
            key,
            format!(
                "set only one of {} and {}",
                describe_key(key),
                describe_key(file_key)
            ),
        )
    };
    if let Some(path) = cfg.listen.password_file.clone() {
        if cfg.listen.password.is_some() {
            return Err(both("listen.password", "listen.password_file"));
        }
        cfg.listen.password = Some(read_secret_file("listen.password_file", &path)?);
    }
    if let Some(path) = cfg.auth.static_.password_file.clone() {
        if cfg.auth.static_.password.is_some() {
            return Err(both("auth.static.password", "auth.static.password_file"));
        }
        cfg.auth.static_.password = Some(read_secret_file("auth.static.password_file", &path)?);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::tests::load;

    #[test]
    fn secrets_are_refused_in_the_file_and_read_from_their_own_files() {
        for (section, key) in [
            ("listen", "password"),
            ("auth.static", "password"),
            ("auth.entra", "client_secret"),
        ] {
            let e = load(
                &[],
                Some(&format!(
                    "[upstream]\nhost=\"h\"\n[{section}]\n{key}=\"s\"\n"
                )),
            )
            .unwrap_err();
            let m = e.to_string();
            assert!(
                m.contains(&format!("`{section}.{key}`"))
                    && m.contains(&format!("{section}.{key}_file")),
                "{m}"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let listen = dir.path().join("listen");
        let access = dir.path().join("access");
        std::fs::write(&listen, "client pw\n").unwrap();
        std::fs::write(&access, "access-key\r\n").unwrap();
        let (l, a) = (listen.display().to_string(), access.display().to_string());
        let base = [
            ("REDIS_ENTRA_PROXY_UPSTREAM__HOST", "h"),
            ("REDIS_ENTRA_PROXY_AUTH__SOURCE", "static"),
            ("REDIS_ENTRA_PROXY_LISTEN__PASSWORD_FILE", l.as_str()),
            ("REDIS_ENTRA_PROXY_AUTH__STATIC__PASSWORD_FILE", a.as_str()),
        ];
        let c = load(&base, None).unwrap();
        assert_eq!(c.listen.password.unwrap().expose(), "client pw");
        assert_eq!(c.auth.static_.password.unwrap().expose(), "access-key");
        // Both a secret and its file; an empty file; a missing one.
        let mut both = base.to_vec();
        both.push(("REDIS_ENTRA_PROXY_LISTEN__PASSWORD", "x"));
        assert!(load(&both, None)
            .unwrap_err()
            .to_string()
            .contains("set only one"));
        std::fs::write(&access, "\n").unwrap();
        let e = load(&base, None).unwrap_err().to_string();
        assert!(
            e.contains("auth.static.password_file") && e.contains("empty"),
            "{e}"
        );
        std::fs::remove_file(&access).unwrap();
        let e = load(&base, None).unwrap_err().to_string();
        assert!(
            e.contains("auth.static.password_file") && e.contains("cannot read"),
            "{e}"
        );
    }
}
