use super::*;

pub(super) fn load(env: &[(&str, &str)], file: Option<&str>) -> Result<Config, ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    if let Some(text) = file {
        std::fs::write(&path, text).unwrap();
    }
    Config::load(Sources {
        defaults: None,
        file: file.map(|_| path.as_path()),
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        overrides: vec![],
    })
}

#[test]
fn otel_is_off_by_default_and_reads_the_standard_variables() {
    let base = ("REDIS_ENTRA_PROXY_UPSTREAM__HOST", "h");
    let collector = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318");
    let cfg = load(&[base, collector], None).unwrap();
    assert_eq!(cfg.otel.settings().unwrap(), None);
    let on = ("REDIS_ENTRA_PROXY_OTEL__ENABLED", "true");
    let cfg = load(&[base, collector, on], None).unwrap();
    let s = cfg.otel.settings().unwrap().unwrap();
    assert_eq!(s.metrics_url, "http://collector:4318/v1/metrics");
    assert_eq!(s.trace_sample_ratio, 0.01);
    let file = "[otel]\nenabled = true\nendpoint = \"https://c:1\"\nmetrics_interval = \"5s\"\n";
    let cfg = load(&[base, collector], Some(file)).unwrap();
    let s = cfg.otel.settings().unwrap().unwrap();
    assert_eq!(s.traces_url, "https://c:1/v1/traces");
    assert_eq!(s.metrics_interval, Duration::from_secs(5));
}

#[test]
fn bad_otel_values_name_their_key() {
    let base = ("REDIS_ENTRA_PROXY_UPSTREAM__HOST", "h");
    let on = ("REDIS_ENTRA_PROXY_OTEL__ENABLED", "true");
    let e = load(
        &[
            base,
            on,
            ("REDIS_ENTRA_PROXY_OTEL__TRACE_SAMPLE_RATIO", "2"),
        ],
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("bad value for `otel.trace_sample_ratio`"), "{e}");
    let e = load(
        &[
            base,
            on,
            ("REDIS_ENTRA_PROXY_OTEL__ENDPOINT", "localhost:4317"),
        ],
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("bad value for `otel.endpoint`"), "{e}");
    let e = load(&[base, on, ("OTEL_EXPORTER_OTLP_HEADERS", "k")], None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("OTEL_EXPORTER_OTLP_HEADERS"), "{e}");
    let e = load(&[base, ("REDIS_ENTRA_PROXY_OTEL__NOPE", "1")], None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("otel.nope"), "{e}");
}

#[test]
fn env_names_follow_the_contract() {
    assert_eq!(
        env_name("upstream.host"),
        "REDIS_ENTRA_PROXY_UPSTREAM__HOST"
    );
    assert_eq!(
        env_name("auth.static.password"),
        "REDIS_ENTRA_PROXY_AUTH__STATIC__PASSWORD"
    );
}

#[test]
fn defaults_and_env() {
    let c = load(
        &[
            ("REDIS_ENTRA_PROXY_UPSTREAM__HOST", "cache.example"),
            ("REDIS_ENTRA_PROXY_LISTEN__UNIX_SOCKET", "/tmp/x.sock"),
            ("REDIS_ENTRA_PROXY_AUTH__STATIC__PASSWORD", "1e5"),
            ("REDIS_ENTRA_PROXY_UPSTREAM__CONNECT_TIMEOUT", "250ms"),
            ("UNRELATED", "x"),
        ],
        None,
    )
    .unwrap();
    assert_eq!(c.upstream.host, "cache.example");
    assert_eq!(c.upstream.port, 6380);
    assert_eq!(c.listen.address, "localhost:6379");
    assert_eq!(
        c.listen.unix_socket.as_deref(),
        Some(Path::new("/tmp/x.sock"))
    );
    // A password that looks like a number stays the exact string.
    assert_eq!(c.auth.static_.password.unwrap().expose(), "1e5");
    assert_eq!(c.upstream.connect_timeout, Duration::from_millis(250));
    assert_eq!(c.auth.source, AuthSource::Entra);
}

#[test]
fn precedence_flag_env_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, "[upstream]\nhost = \"file\"\nport = 1\n").unwrap();
    let c = Config::load(Sources {
        defaults: None,
        file: Some(&path),
        env: [(
            "REDIS_ENTRA_PROXY_UPSTREAM__PORT".to_string(),
            "2".to_string(),
        )]
        .into(),
        overrides: vec![("upstream.host".into(), "flag".into())],
    })
    .unwrap();
    assert_eq!(c.upstream.host, "flag");
    assert_eq!(c.upstream.port, 2);
}

#[test]
fn unknown_keys_are_named() {
    let e = load(&[("REDIS_ENTRA_PROXY_UPSTREAM__HOTS", "x")], None).unwrap_err();
    assert!(e.to_string().contains("unknown key `upstream.hots`"), "{e}");
    let e = load(
        &[],
        Some("[upstream]\nhost = \"h\"\n[listen]\nadress = \"x\"\n"),
    )
    .unwrap_err();
    assert!(e.to_string().contains("`listen.adress`"), "{e}");
    let e = load(&[], Some("[upstrem]\nhost = \"h\"\n")).unwrap_err();
    assert!(e.to_string().contains("`upstrem`"), "{e}");
}

#[test]
fn bad_values_name_key_and_env() {
    let e = load(
        &[
            ("REDIS_ENTRA_PROXY_UPSTREAM__HOST", "h"),
            ("REDIS_ENTRA_PROXY_UPSTREAM__PORT", "abc"),
        ],
        None,
    )
    .unwrap_err();
    let m = e.to_string();
    assert!(
        m.contains("`upstream.port`") && m.contains("REDIS_ENTRA_PROXY_UPSTREAM__PORT"),
        "{m}"
    );
    let e = load(
        &[
            ("REDIS_ENTRA_PROXY_UPSTREAM__HOST", "h"),
            ("REDIS_ENTRA_PROXY_AUTH__SOURCE", "magic"),
        ],
        None,
    )
    .unwrap_err();
    assert!(e.to_string().contains("`auth.source`"), "{e}");
    let e = load(&[], None).unwrap_err();
    assert!(
        e.to_string()
            .contains("missing required key `upstream.host`"),
        "{e}"
    );
}

/// Every enum-valued key refuses a value it does not know and names the ones
/// it accepts; `log.level` too (`warning` once silenced every line).
#[test]
fn unknown_enum_values_name_the_accepted_ones() {
    for (key, bad, accepted) in [
        (
            "log.level",
            "warning",
            "error, warn, info, debug, trace, off",
        ),
        (
            "log.level",
            "verbose",
            "error, warn, info, debug, trace, off",
        ),
        (
            "log.level",
            "info,azure_core=loud",
            "error, warn, info, debug, trace, off",
        ),
        ("log.format", "yaml", "text, json"),
        ("auth.source", "magic", "entra, static"),
        ("upstream.cluster", "yes", "auto, on, off"),
        (
            "admin.readiness",
            "always",
            "listening, credential, upstream",
        ),
        ("auth.entra.credential", "msi", "auto, managed-identity"),
    ] {
        let e = load(
            &[
                ("REDIS_ENTRA_PROXY_UPSTREAM__HOST", "h"),
                (&env_name(key), bad),
            ],
            None,
        )
        .map(|_| ())
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(&format!("`{key}`"))
                && e.contains(accepted)
                && e.contains(bad.rsplit('=').next().unwrap()),
            "{key} = {bad}: {e}"
        );
    }
    // Every value the list names is one the key takes.
    for (key, values) in ENUM_VALUES {
        for v in *values {
            load(
                &[
                    ("REDIS_ENTRA_PROXY_UPSTREAM__HOST", "h"),
                    ("REDIS_ENTRA_PROXY_AUTH__STATIC__PASSWORD", "p"),
                    (&env_name(key), v),
                ],
                None,
            )
            .unwrap_or_else(|e| panic!("{key} = {v}: {e}"));
        }
    }
    for good in [
        "warn",
        "DEBUG",
        "off",
        "info,redis_entra_proxy=debug",
        "trace",
    ] {
        load(
            &[
                ("REDIS_ENTRA_PROXY_UPSTREAM__HOST", "h"),
                ("REDIS_ENTRA_PROXY_LOG__LEVEL", good),
            ],
            None,
        )
        .unwrap_or_else(|e| panic!("{good}: {e}"));
    }
}

/// Sending a token (or password) to a server whose certificate is not verified
/// gives it to anyone on the path: one key is not enough to do that.
#[test]
fn insecure_tls_needs_a_second_key() {
    let base = [
        ("REDIS_ENTRA_PROXY_UPSTREAM__HOST", "h"),
        (
            "REDIS_ENTRA_PROXY_UPSTREAM__TLS_INSECURE_SKIP_VERIFY",
            "true",
        ),
    ];
    let e = load(&base, None).map(|_| ()).unwrap_err().to_string();
    assert!(
        e.contains("`upstream.tls_insecure_skip_verify`")
            && e.contains("upstream.tls_insecure_send_credentials"),
        "{e}"
    );
    let mut both = base.to_vec();
    both.push((
        "REDIS_ENTRA_PROXY_UPSTREAM__TLS_INSECURE_SEND_CREDENTIALS",
        "true",
    ));
    let c = load(&both, None).unwrap();
    assert!(c.upstream.tls_insecure_skip_verify);
}

#[test]
fn non_loopback_listener_needs_password() {
    let base = [
        ("REDIS_ENTRA_PROXY_UPSTREAM__HOST", "h"),
        ("REDIS_ENTRA_PROXY_LISTEN__ADDRESS", "0.0.0.0:6379"),
    ];
    let e = load(&base, None).unwrap_err();
    assert!(e.to_string().contains("listen.password"), "{e}");
    let mut with_pw = base.to_vec();
    with_pw.push(("REDIS_ENTRA_PROXY_LISTEN__PASSWORD", "pw"));
    load(&with_pw, None).unwrap();
}

#[test]
fn static_source_needs_password_and_secret_not_in_file() {
    let e = load(
        &[
            ("REDIS_ENTRA_PROXY_UPSTREAM__HOST", "h"),
            ("REDIS_ENTRA_PROXY_AUTH__SOURCE", "static"),
        ],
        None,
    )
    .unwrap_err();
    assert!(e.to_string().contains("auth.static.password"), "{e}");
    let e = load(
        &[],
        Some("[upstream]\nhost=\"h\"\n[auth.entra]\ncredential=\"client-secret\"\nclient_secret=\"s\"\n"),
    )
    .unwrap_err();
    assert!(e.to_string().contains("auth.entra.client_secret"), "{e}");
}

#[test]
fn example_file_documents_every_key_and_loads() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/redis-entra-proxy.example.toml"
    );
    let text = std::fs::read_to_string(path).unwrap();
    for (key, _) in KEYS {
        assert!(
            text.contains(&env_name(key)),
            "example lacks {}",
            env_name(key)
        );
    }
    let env = [(
        "REDIS_ENTRA_PROXY_AUTH__STATIC__PASSWORD".to_string(),
        "x".to_string(),
    )]
    .into();
    Config::load(Sources {
        defaults: None,
        file: Some(Path::new(path)),
        env,
        overrides: vec![],
    })
    .unwrap();
}

#[test]
fn admin_address_without_admin_enabled_is_an_error() {
    let base = [("REDIS_ENTRA_PROXY_UPSTREAM__HOST", "h")];
    let mut env = base.to_vec();
    env.push(("REDIS_ENTRA_PROXY_ADMIN__ADDRESS", "[::]:9090"));
    let e = load(&env, None).unwrap_err().to_string();
    assert!(
        e.contains("`admin.address`") && e.contains("admin.enabled"),
        "{e}"
    );
    env.push(("REDIS_ENTRA_PROXY_ADMIN__ENABLED", "true"));
    let c = load(&env, None).unwrap();
    assert!(c.admin.enabled);
    // Turned off on purpose, with the address left in place: fine.
    env.pop();
    env.push(("REDIS_ENTRA_PROXY_ADMIN__ENABLED", "false"));
    assert!(!load(&env, None).unwrap().admin.enabled);
}

#[test]
fn listen_defaults_to_both_loopbacks() {
    let c = load(&[("REDIS_ENTRA_PROXY_UPSTREAM__HOST", "h")], None).unwrap();
    let a = c.listen_addrs().unwrap();
    assert_eq!(a.required, vec!["127.0.0.1:6379".parse().unwrap()]);
    assert_eq!(a.if_available, vec!["[::1]:6379".parse().unwrap()]);
    let c = load(
        &[
            ("REDIS_ENTRA_PROXY_UPSTREAM__HOST", "h"),
            (
                "REDIS_ENTRA_PROXY_LISTEN__ADDRESS",
                "127.0.0.1:7000, [::1]:7001",
            ),
        ],
        None,
    )
    .unwrap();
    let a = c.listen_addrs().unwrap();
    assert_eq!(a.required.len(), 2);
    assert!(a.if_available.is_empty());
    let e = load(
        &[
            ("REDIS_ENTRA_PROXY_UPSTREAM__HOST", "h"),
            (
                "REDIS_ENTRA_PROXY_LISTEN__ADDRESS",
                "127.0.0.1:7000,[::]:7001",
            ),
        ],
        None,
    )
    .unwrap_err();
    assert!(e.to_string().contains("[::]:7001 is not a loopback"), "{e}");
}
