//! Checks on the container image recipe that no Docker engine is needed for: the
//! `Dockerfile` is parsed into instructions and held to the basics a user relies on
//! (non-root user, pinned base images, exposed ports equal to the configured
//! defaults, every copied path present and not excluded by `.dockerignore`).
//! Run by `scripts/check-deploy.sh` beside hadolint and the manifest validation.

use redis_entra_proxy::config::Config;
use std::path::Path;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// One Dockerfile instruction: keyword (upper case) and its arguments, with line
/// continuations joined and comments dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Instruction {
    keyword: String,
    args: String,
}

fn parse(text: &str) -> Vec<Instruction> {
    let mut out = Vec::new();
    let mut pending = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && pending.is_empty()) {
            continue;
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            pending.push_str(head);
            pending.push(' ');
            continue;
        }
        pending.push_str(trimmed);
        let whole = std::mem::take(&mut pending);
        let (keyword, args) = whole
            .split_once(char::is_whitespace)
            .unwrap_or((&whole, ""));
        out.push(Instruction {
            keyword: keyword.to_ascii_uppercase(),
            args: args.trim().to_string(),
        });
    }
    assert!(pending.is_empty(), "Dockerfile ends inside a continuation");
    out
}

/// Split arguments into words, dropping `--flag=value` options.
fn words(args: &str) -> Vec<&str> {
    args.split_whitespace()
        .filter(|w| !w.starts_with("--"))
        .collect()
}

fn dockerfile() -> Vec<Instruction> {
    let text = std::fs::read_to_string(Path::new(ROOT).join("Dockerfile")).unwrap();
    parse(&text)
}

/// `FROM` arguments with `${NAME}` replaced by the default of the `ARG NAME=...`
/// declared before the first `FROM` (the base images are build arguments).
fn resolve_args(all: &[Instruction], text: &str) -> String {
    let mut out = text.to_string();
    for arg in all.iter().take_while(|i| i.keyword != "FROM") {
        if arg.keyword != "ARG" {
            continue;
        }
        if let Some((name, default)) = arg.args.split_once('=') {
            out = out.replace(&format!("${{{name}}}"), default.trim_matches('"'));
        }
    }
    assert!(
        !out.contains("${"),
        "no default for a build argument in `{text}`"
    );
    out
}

/// The instructions of the last stage (what the image is).
fn final_stage(all: &[Instruction]) -> &[Instruction] {
    let start = all
        .iter()
        .rposition(|i| i.keyword == "FROM")
        .expect("a FROM");
    &all[start..]
}

#[test]
fn parser_handles_continuations_and_comments() {
    let parsed = parse("# c\nFROM a:1 AS b\n\nRUN x \\\n  && y\n# mid\nUSER 1\n");
    assert_eq!(
        parsed,
        vec![
            Instruction {
                keyword: "FROM".into(),
                args: "a:1 AS b".into()
            },
            Instruction {
                keyword: "RUN".into(),
                args: "x  && y".into()
            },
            Instruction {
                keyword: "USER".into(),
                args: "1".into()
            },
        ]
    );
}

#[test]
fn runs_as_a_numeric_non_root_user() {
    let all = dockerfile();
    let user = final_stage(&all)
        .iter()
        .rfind(|i| i.keyword == "USER")
        .expect("the final stage sets USER");
    let uid = user.args.split(':').next().unwrap();
    // Numeric, so that Kubernetes' runAsNonRoot can check it without /etc/passwd.
    let uid: u32 = uid
        .parse()
        .unwrap_or_else(|_| panic!("USER {} is not numeric", user.args));
    assert_ne!(uid, 0, "USER must not be root");
}

#[test]
fn base_images_are_pinned_and_never_latest() {
    let all = dockerfile();
    let mut stages: Vec<String> = Vec::new();
    for from in all.iter().filter(|i| i.keyword == "FROM") {
        let args = resolve_args(&all, &from.args);
        let w = words(&args);
        let image = w[0];
        if let Some(alias) = w.iter().position(|x| x.eq_ignore_ascii_case("AS")) {
            stages.push(w[alias + 1].to_string());
        }
        if stages[..stages.len().saturating_sub(1)]
            .iter()
            .any(|s| s == image)
        {
            continue; // an earlier stage, not an image
        }
        let name = image.rsplit('/').next().unwrap();
        let pinned = image.contains("@sha256:")
            || name
                .split_once(':')
                .is_some_and(|(_, tag)| !tag.is_empty() && tag != "latest");
        assert!(pinned, "FROM {image}: pin a tag or digest, never latest");
    }
    assert!(
        !all.iter().any(|i| i.args.contains(":latest")),
        "no :latest anywhere"
    );
}

#[test]
fn build_image_matches_the_toolchain() {
    let all = dockerfile();
    let first = resolve_args(
        &all,
        &all.iter().find(|i| i.keyword == "FROM").unwrap().args,
    );
    let rustc = std::process::Command::new(std::env::var("RUSTC").unwrap_or("rustc".into()))
        .arg("--version")
        .output()
        .unwrap();
    let version = String::from_utf8(rustc.stdout).unwrap();
    let version = version.split_whitespace().nth(1).unwrap().to_string();
    assert!(
        first.starts_with(&format!("rust:{version}-")),
        "build stage `{first}` should use rust:{version}, the toolchain the project is tested with"
    );
}

#[test]
fn exposes_the_default_ports() {
    let all = dockerfile();
    let mut exposed: Vec<u16> = final_stage(&all)
        .iter()
        .filter(|i| i.keyword == "EXPOSE")
        .flat_map(|i| i.args.split_whitespace())
        .map(|p| p.trim_end_matches("/tcp").parse().unwrap())
        .collect();
    exposed.sort_unstable();
    let defaults = Config::default();
    let listen = defaults.listen_addr().unwrap();
    let mut expected = vec![listen.port(), defaults.admin.address.port()];
    expected.sort_unstable();
    assert_eq!(exposed, expected);
    assert_eq!(expected, vec![6379, 9090]);
}

#[test]
fn copied_paths_exist_and_are_in_the_build_context() {
    let all = dockerfile();
    let ignore = std::fs::read_to_string(Path::new(ROOT).join(".dockerignore")).unwrap();
    let ignore: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert_eq!(
        ignore.first(),
        Some(&"*"),
        ".dockerignore is an allow-list starting with *"
    );
    let mut copied = 0;
    for copy in all
        .iter()
        .filter(|i| i.keyword == "COPY" || i.keyword == "ADD")
    {
        if copy.args.contains("--from=") {
            continue;
        }
        let w = words(&copy.args);
        let (sources, _dest) = w.split_at(w.len() - 1);
        for src in sources {
            assert!(
                !src.contains("://"),
                "{} {}: copy from the repository only",
                copy.keyword,
                copy.args
            );
            let path = Path::new(ROOT).join(src);
            assert!(path.exists(), "COPY source `{src}` does not exist");
            let entry = src.trim_end_matches('/');
            assert!(
                ignore
                    .iter()
                    .any(|l| *l == format!("!{entry}") || *l == format!("!{entry}/")),
                "COPY source `{src}` is not allowed back in by .dockerignore"
            );
            copied += 1;
        }
    }
    assert!(
        copied >= 2,
        "expected the manifest and the sources to be copied"
    );
}

#[test]
fn labels_the_version_and_checks_health() {
    let all = dockerfile();
    let last = final_stage(&all);
    let arg = last
        .iter()
        .find(|i| i.keyword == "ARG" && i.args.starts_with("VERSION"))
        .expect("ARG VERSION in the final stage");
    assert_eq!(
        arg.args,
        format!("VERSION={}", env!("CARGO_PKG_VERSION")),
        "the default VERSION follows Cargo.toml"
    );
    assert!(
        last.iter().any(|i| i.keyword == "LABEL"
            && i.args
                .contains("org.opencontainers.image.version=\"${VERSION}\"")),
        "LABEL org.opencontainers.image.version from the VERSION argument"
    );
    let health = last
        .iter()
        .find(|i| i.keyword == "HEALTHCHECK")
        .expect("a HEALTHCHECK");
    // Exec form: the runtime image has no shell.
    assert!(
        health
            .args
            .contains(r#"CMD ["/usr/local/bin/redis-entra-proxy", "--defaults", "/etc/redis-entra-proxy/image-defaults.toml", "healthcheck"]"#),
        "{}",
        health.args
    );
    let entry = last
        .iter()
        .find(|i| i.keyword == "ENTRYPOINT")
        .expect("an ENTRYPOINT");
    assert!(entry.args.starts_with('['), "exec-form ENTRYPOINT");
}

/// `ENV` of the final stage as (name, value) pairs, quotes removed.
fn image_env(all: &[Instruction]) -> Vec<(String, String)> {
    final_stage(all)
        .iter()
        .filter(|i| i.keyword == "ENV")
        .flat_map(|i| i.args.split_whitespace())
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
        .collect()
}

#[test]
fn the_image_settings_are_a_valid_config_with_a_dual_stack_admin_port() {
    let (env, defaults) = image_sources(&dockerfile());
    let mut vars: std::collections::HashMap<String, String> = env.iter().cloned().collect();
    vars.insert(
        "REDIS_ENTRA_PROXY_UPSTREAM__HOST".into(),
        "cache.example".into(),
    );
    let cfg = Config::load(redis_entra_proxy::config::Sources {
        defaults: defaults.as_deref(),
        file: None,
        env: vars,
        overrides: vec![],
    })
    .unwrap();
    assert!(cfg.admin.enabled);
    assert_eq!(cfg.admin.address, "[::]:9090".parse().unwrap());
    assert_eq!(
        cfg.listen_addr().unwrap(),
        "127.0.0.1:6379".parse().unwrap()
    );
}

/// The image's settings as the proxy sees them: its `ENV`, and the `--defaults`
/// file its ENTRYPOINT names (mapped back to the repository file COPY put there).
fn image_sources(all: &[Instruction]) -> (Vec<(String, String)>, Option<std::path::PathBuf>) {
    let last = final_stage(all);
    let entry = last
        .iter()
        .find(|i| i.keyword == "ENTRYPOINT")
        .expect("an ENTRYPOINT");
    let args: Vec<String> = entry
        .args
        .trim_matches(|c| c == '[' || c == ']')
        .split(',')
        .map(|a| a.trim().trim_matches('"').to_string())
        .collect();
    let defaults = args
        .iter()
        .position(|a| a == "--defaults")
        .map(|i| args[i + 1].clone())
        .map(|in_image| {
            let copy = last
                .iter()
                .filter(|i| i.keyword == "COPY" && !i.args.contains("--from="))
                .find(|i| words(&i.args).last() == Some(&in_image.as_str()))
                .unwrap_or_else(|| panic!("no COPY puts {in_image} in the image"));
            Path::new(ROOT).join(words(&copy.args)[0])
        });
    (image_env(all), defaults)
}

/// The image's defaults are defaults: `admin.enabled = false` (or another admin
/// address) in the user's TOML wins over them. The image used to set them as
/// `ENV`, which is above the file, so the TOML was silently ignored.
#[test]
fn a_toml_value_wins_over_the_image_defaults() {
    let (env, defaults) = image_sources(&dockerfile());
    let dir = tempfile::tempdir().unwrap();
    let mut vars: std::collections::HashMap<String, String> = env.into_iter().collect();
    vars.insert(
        "REDIS_ENTRA_PROXY_UPSTREAM__HOST".into(),
        "cache.example".into(),
    );
    let load = |toml: &str| {
        let path = dir.path().join("user.toml");
        std::fs::write(&path, toml).unwrap();
        Config::load(redis_entra_proxy::config::Sources {
            defaults: defaults.as_deref(),
            file: Some(&path),
            env: vars.clone(),
            overrides: vec![],
        })
        .unwrap()
    };
    let cfg = load("[admin]\nenabled = false\n");
    assert!(!cfg.admin.enabled, "the image's defaults overrode the TOML");
    let cfg = load("[admin]\nenabled = true\naddress = \"127.0.0.1:9191\"\n");
    assert_eq!(cfg.admin.address, "127.0.0.1:9191".parse().unwrap());
    // Without a word about admin, the image's defaults hold.
    let cfg = load("");
    assert!(cfg.admin.enabled);
    assert_eq!(cfg.admin.address, "[::]:9090".parse().unwrap());
}

/// jemalloc (tikv-jemallocator, the global allocator) is built from C sources by
/// its `configure` and `make`: the rust slim image has a C compiler but no
/// `make`, so `docker build` failed. The build stage installs it. (The image
/// build itself runs in scripts/check-deploy.sh.)
#[test]
fn the_build_stage_installs_what_jemalloc_needs() {
    let manifest = std::fs::read_to_string(Path::new(ROOT).join("Cargo.toml")).unwrap();
    if !manifest.contains("tikv-jemallocator") {
        return;
    }
    let all = dockerfile();
    let build_stage_end = all
        .iter()
        .rposition(|i| i.keyword == "FROM")
        .expect("a final FROM");
    let installs_make = all[..build_stage_end].iter().any(|i| {
        i.keyword == "RUN"
            && i.args.contains("apt-get install")
            && i.args
                .split_whitespace()
                .any(|w| w == "make" || w.starts_with("make="))
    });
    assert!(installs_make, "the build stage must apt-get install make");
}

/// Cargo reads every target the manifest names, even to build one binary: each
/// example, bench and extra binary source must be copied into the build stage.
#[test]
fn every_target_the_manifest_names_is_copied_into_the_build_stage() {
    let manifest: toml::Value =
        toml::from_str(&std::fs::read_to_string(Path::new(ROOT).join("Cargo.toml")).unwrap())
            .unwrap();
    let all = dockerfile();
    let copied: Vec<String> = all
        .iter()
        .filter(|i| i.keyword == "COPY" && !i.args.contains("--from"))
        .flat_map(|i| {
            let w = words(&i.args);
            w[..w.len().saturating_sub(1)]
                .iter()
                .map(|s| s.trim_end_matches('/').to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    let covered = |path: &str| {
        copied
            .iter()
            .any(|c| path == c || path.starts_with(&format!("{c}/")))
    };
    for (kind, dir) in [("example", "examples"), ("bench", "benches")] {
        for target in manifest
            .get(kind)
            .and_then(|v| v.as_array())
            .into_iter()
            .flatten()
        {
            let name = target["name"].as_str().unwrap();
            let path = target
                .get("path")
                .and_then(|p| p.as_str())
                .map(String::from)
                .unwrap_or_else(|| format!("{dir}/{name}.rs"));
            assert!(
                covered(&path),
                "Cargo.toml names {kind} {name} at {path}, which the Dockerfile does not copy: the image build fails"
            );
        }
    }
}
