//! [`EntraEnv`]: the snapshot of environment variables the Entra sources
//! ([`super::entra`], [`super::auto`], [`super::azure`]) decide from, taken once at
//! start or handed in by tests, and [`find_on_path`] (a program on its `PATH`). A
//! leaf: the sources import it, it imports none of them.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// A snapshot of the environment variables the Entra sources read. Built once at
/// start ([`EntraEnv::from_process`]) or from a map in tests. An empty value counts
/// as unset. `Debug` lists the names only (`IDENTITY_HEADER` is a secret).
#[derive(Clone, Default)]
pub struct EntraEnv {
    vars: HashMap<String, String>,
}

impl EntraEnv {
    /// The current process environment (variables that are not UTF-8 are skipped).
    pub fn from_process() -> Self {
        std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .collect()
    }

    /// The value of `key`, if set and not empty.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.vars
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    /// Every variable, as passed to child processes (`az`).
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.vars.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// A copy with `key` set to `value`.
    pub fn with(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.vars.insert(key.into(), value.into());
        self
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for EntraEnv {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        EntraEnv {
            vars: iter
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        }
    }
}

impl fmt::Debug for EntraEnv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<_> = self.vars.keys().collect();
        names.sort();
        f.debug_struct("EntraEnv").field("names", &names).finish()
    }
}

/// The first executable `name` in the directories of `path` (a `PATH` value).
pub fn find_on_path(name: &str, path: Option<&str>) -> Option<PathBuf> {
    std::env::split_paths(path?)
        .filter(|dir| !dir.as_os_str().is_empty())
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}
