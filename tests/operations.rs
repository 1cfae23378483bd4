//! What the environment around a sidecar can do to the proxy, on the real binary:
//! a log pipe whose reader is gone, signals (SIGHUP, SIGTERM), systemd's
//! readiness socket, both loopbacks. Each test starts its own proxy (and token
//! emulator) on free loopback ports and stops them.

mod common;

use common::proxy::http;
use common::redis::free_port;
use common::token_emulator::{EmulatorConfig, TokenEmulator};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The proxy binary with `env` (nothing else from this process's environment),
/// its stderr given by the caller.
fn spawn(env: &[(String, String)], stderr: Stdio) -> Child {
    Command::new(env!("CARGO_BIN_EXE_redis-entra-proxy"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("start redis-entra-proxy")
}

/// Settings for a proxy that takes Entra tokens from `emu` (IMDS shape) and whose
/// upstream does not answer (nothing listens on its port): enough to exercise the
/// rotator, the admin server and signals without Redis.
fn entra_env(emu: &TokenEmulator, listen: u16, admin: u16) -> Vec<(String, String)> {
    [
        (
            "REDIS_ENTRA_PROXY_LISTEN__ADDRESS",
            format!("127.0.0.1:{listen}"),
        ),
        ("REDIS_ENTRA_PROXY_UPSTREAM__HOST", "127.0.0.1".into()),
        ("REDIS_ENTRA_PROXY_UPSTREAM__PORT", free_port().to_string()),
        ("REDIS_ENTRA_PROXY_UPSTREAM__CONNECT_TIMEOUT", "1s".into()),
        (
            "REDIS_ENTRA_PROXY_AUTH__ENTRA__IMDS_ENDPOINT",
            emu.imds_endpoint(),
        ),
        ("REDIS_ENTRA_PROXY_AUTH__ENTRA__MAX_BACKOFF", "1s".into()),
        ("REDIS_ENTRA_PROXY_ADMIN__ENABLED", "true".into()),
        (
            "REDIS_ENTRA_PROXY_ADMIN__ADDRESS",
            format!("127.0.0.1:{admin}"),
        ),
        ("REDIS_ENTRA_PROXY_LOG__LEVEL", "debug".into()),
        ("REDIS_ENTRA_PROXY_SHUTDOWN__GRACE", "2s".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

fn wait_listening(child: &mut Child, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("proxy exited with {status} before listening");
        }
        assert!(Instant::now() < deadline, "proxy did not listen on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig}");
}

/// Wait up to `limit` for the child to exit.
fn wait_exit(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// Kills the child when a test fails half-way.
struct Reaper(Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A log shipper that died (`| logger` gone, a crashed sidecar): stderr is a pipe
/// whose reader is closed, so every log line fails with EPIPE. The proxy must keep
/// refreshing tokens, answering probes, and stop cleanly on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_log_pipe_never_stops_the_proxy() {
    let emu = TokenEmulator::start(EmulatorConfig {
        lifetime: Duration::from_secs(2),
        ..Default::default()
    })
    .await;
    let (listen, admin) = (free_port(), free_port());
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let mut proxy = Reaper(spawn(&entra_env(&emu, listen, admin), writer.into()));
    wait_listening(&mut proxy.0, listen);
    // Tokens of 2 s are refreshed about every 1.5 s: a rotator that logs each one
    // (and each upstream reconnect fails, and logs) keeps going.
    emu.wait_requests(5, Duration::from_secs(30)).await;
    let (status, body) = tokio::task::spawn_blocking(move || http(admin, "GET", "/livez"))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    signal(&proxy.0, "-TERM");
    let status = tokio::task::spawn_blocking(move || {
        let s = wait_exit(&mut proxy.0, Duration::from_secs(15));
        (s, proxy)
    })
    .await
    .unwrap()
    .0;
    let status = status.expect("SIGTERM ends the proxy within 15 s");
    assert_eq!(status.code(), Some(0), "{status}");
}

/// SIGHUP (systemd's `ExecReload`, an operator who replaced a secret file): the
/// proxy stays up, says so, and fetches a new token at once, well before its
/// schedule (tokens here live an hour).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_refreshes_the_token_and_never_exits() {
    let emu = TokenEmulator::start(EmulatorConfig::default()).await;
    let (listen, admin) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("proxy.log");
    let file = std::fs::File::create(&log).unwrap();
    let mut proxy = Reaper(spawn(&entra_env(&emu, listen, admin), file.into()));
    wait_listening(&mut proxy.0, listen);
    emu.wait_issued(1, Duration::from_secs(20)).await;
    for n in 2..=3 {
        signal(&proxy.0, "-HUP");
        emu.wait_issued(n, Duration::from_secs(20)).await;
    }
    assert!(
        proxy.0.try_wait().unwrap().is_none(),
        "SIGHUP ended the proxy"
    );
    // The token is fine (no cache here, so /readyz waits for the cache's AUTH).
    let (_, body) = tokio::task::spawn_blocking(move || http(admin, "GET", "/readyz"))
        .await
        .unwrap();
    assert!(body.contains("token expires in"), "{body}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("SIGHUP: re-reading the secret files")
            && text.contains("token refresh requested (SIGHUP)"),
        "{text}"
    );
    signal(&proxy.0, "-TERM");
    let status = tokio::task::spawn_blocking(move || {
        let s = wait_exit(&mut proxy.0, Duration::from_secs(15));
        (s, proxy)
    })
    .await
    .unwrap()
    .0;
    assert_eq!(status.expect("SIGTERM ends it").code(), Some(0));
}

/// systemd `Type=notify`: the proxy says READY=1 on `$NOTIFY_SOCKET` once its
/// listener is up, and STOPPING=1 when it starts draining.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tells_systemd_when_it_is_ready_and_when_it_stops() {
    let emu = TokenEmulator::start(EmulatorConfig::default()).await;
    let (listen, admin) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut env = entra_env(&emu, listen, admin);
    env.push(("NOTIFY_SOCKET".into(), path.display().to_string()));
    let proxy = Reaper(spawn(&env, Stdio::null()));
    let mut buf = [0u8; 4096];
    let n = socket.recv(&mut buf).expect("a datagram within 20 s");
    let first = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(first.lines().any(|l| l == "READY=1"), "{first:?}");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", listen)).is_ok(),
        "ready means listening"
    );
    signal(&proxy.0, "-TERM");
    let n = socket.recv(&mut buf).expect("a second datagram");
    let second = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(second.lines().any(|l| l == "STOPPING=1"), "{second:?}");
}

/// Clients that resolve `localhost` to ::1 first (Node.js 17+) find the proxy
/// there too with the default listen.address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_listener_answers_on_both_loopbacks() {
    let emu = TokenEmulator::start(EmulatorConfig::default()).await;
    let (listen, admin) = (free_port(), free_port());
    let mut env = entra_env(&emu, listen, admin);
    env.retain(|(k, _)| k != "REDIS_ENTRA_PROXY_LISTEN__ADDRESS");
    env.push((
        "REDIS_ENTRA_PROXY_LISTEN__ADDRESS".into(),
        format!("localhost:{listen}"),
    ));
    let mut proxy = Reaper(spawn(&env, Stdio::null()));
    wait_listening(&mut proxy.0, listen);
    for addr in [format!("127.0.0.1:{listen}"), format!("[::1]:{listen}")] {
        let reply = tokio::task::spawn_blocking(move || {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(&addr)
                .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(b"*1\r\n$4\r\nPING\r\n").unwrap();
            let mut buf = [0u8; 64];
            let n = s.read(&mut buf).unwrap();
            String::from_utf8_lossy(&buf[..n]).into_owned()
        })
        .await
        .unwrap();
        assert!(
            reply.starts_with('-') || reply.starts_with('+'),
            "{reply:?}"
        );
    }
}

/// An upstream outage: every connection retries with backoff and warns each time.
/// With `log.max_per_minute = 3` the log gets three such lines a minute, however
/// many attempts there are; with the limit off (0) the same outage writes more,
/// which shows the attempts happen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_warnings_in_an_outage_are_rate_limited() {
    let emu = TokenEmulator::start(EmulatorConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut runs = Vec::new();
    for limit in ["3", "0"] {
        let (listen, admin) = (free_port(), free_port());
        let mut env = entra_env(&emu, listen, admin);
        env.push(("REDIS_ENTRA_PROXY_LOG__MAX_PER_MINUTE".into(), limit.into()));
        env.push(("REDIS_ENTRA_PROXY_LOG__LEVEL".into(), "info".into()));
        let log = dir.path().join(format!("proxy-{limit}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let mut proxy = Reaper(spawn(&env, file.into()));
        wait_listening(&mut proxy.0, listen);
        runs.push((limit, log, proxy));
    }
    tokio::time::sleep(Duration::from_secs(6)).await;
    let count = |log: &std::path::Path| {
        std::fs::read_to_string(log)
            .unwrap()
            .lines()
            .filter(|l| l.contains("cannot open upstream connection"))
            .count()
    };
    let limited = count(&runs[0].1);
    let unlimited = count(&runs[1].1);
    eprintln!("reconnect warnings in 6 s: {limited} with the limit, {unlimited} without");
    assert!(
        limited <= 3,
        "{limited} reconnect warnings with a limit of 3 a minute"
    );
    assert!(
        unlimited > 3,
        "only {unlimited} warnings without a limit: the outage did not retry"
    );
}

/// The image's defaults file (what its ENTRYPOINT passes with `--defaults`), with
/// its admin port moved to `admin`, written into `dir`.
fn image_defaults(dir: &std::path::Path, admin: u16) -> std::path::PathBuf {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/container/image-defaults.toml"
    ))
    .unwrap();
    assert!(text.contains("\"[::]:9090\""), "{text}");
    let path = dir.join("image-defaults.toml");
    std::fs::write(&path, text.replace(":9090", &format!(":{admin}"))).unwrap();
    path
}

/// What Docker would run as the image's HEALTHCHECK, with the image's defaults
/// (its admin port moved to a free one). The image is built by
/// scripts/check-deploy.sh; here its settings are exercised on the binary it ships.
fn healthcheck(defaults: &std::path::Path, env: &[(String, String)]) -> Option<i32> {
    Command::new(env!("CARGO_BIN_EXE_redis-entra-proxy"))
        .arg("--defaults")
        .arg(defaults)
        .arg("healthcheck")
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .code()
}

/// The image's HEALTHCHECK follows `admin.readiness`: with `listening`, a proxy is
/// healthy while the cache is unreachable; by default (`credential`) not until the
/// cache has accepted a token (tests/entra_readiness.rs: and then it stays healthy
/// through a cache outage); with `upstream` not without a live connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_healthcheck_follows_the_readiness_setting() {
    let emu = TokenEmulator::start(EmulatorConfig::default()).await;
    let mut codes = Vec::new();
    for readiness in [Some("listening"), None, Some("upstream")] {
        let (listen, admin) = (free_port(), free_port());
        let mut env = entra_env(&emu, listen, admin);
        env.retain(|(k, _)| !k.starts_with("REDIS_ENTRA_PROXY_ADMIN__"));
        let dir = tempfile::tempdir().unwrap();
        let defaults = image_defaults(dir.path(), admin);
        if let Some(r) = readiness {
            env.push(("REDIS_ENTRA_PROXY_ADMIN__READINESS".into(), r.into()));
        }
        let mut proxy = Reaper(
            Command::new(env!("CARGO_BIN_EXE_redis-entra-proxy"))
                .arg("--defaults")
                .arg(&defaults)
                .env_clear()
                .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        wait_listening(&mut proxy.0, listen);
        // /startup passes once the first token is in.
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::task::spawn_blocking(move || http(admin, "GET", "/startup"))
            .await
            .unwrap()
            .0
            != 200
        {
            assert!(Instant::now() < deadline, "no first token");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (e, d) = (env.clone(), defaults.clone());
        codes.push(
            tokio::task::spawn_blocking(move || healthcheck(&d, &e))
                .await
                .unwrap(),
        );
        drop(proxy);
        let (e, d) = (env.clone(), defaults.clone());
        let gone = tokio::task::spawn_blocking(move || healthcheck(&d, &e))
            .await
            .unwrap();
        assert_eq!(gone, Some(1), "nothing listening is unhealthy");
    }
    assert_eq!(
        codes,
        vec![Some(0), Some(1), Some(1)],
        "listening: healthy; default and upstream: not, with no cache to accept the token"
    );
}

/// A log shipper that hangs (alive, reading nothing): stderr is a pipe whose
/// buffer fills. Logging must not block the runtime: the proxy keeps answering
/// clients and probes, and stops on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_pipe_nobody_reads_never_blocks_the_proxy() {
    let emu = TokenEmulator::start(EmulatorConfig {
        lifetime: Duration::from_secs(2),
        ..Default::default()
    })
    .await;
    let (listen, admin) = (free_port(), free_port());
    let (_reader, mut writer) = std::io::pipe().unwrap();
    // Full from the start: Linux pipes hold 64 KiB, so every write the proxy
    // makes to stderr would wait for a reader that never comes.
    std::io::Write::write_all(&mut writer, &vec![b'.'; 65536]).unwrap();
    let mut env = entra_env(&emu, listen, admin);
    env.push(("REDIS_ENTRA_PROXY_LOG__LEVEL".into(), "trace".into()));
    env.push(("REDIS_ENTRA_PROXY_LOG__MAX_PER_MINUTE".into(), "0".into()));
    let mut proxy = Reaper(spawn(&env, writer.into()));
    wait_listening(&mut proxy.0, listen);
    let pings = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut answered = 0;
        for _ in 0..200 {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", listen)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(b"*1\r\n$4\r\nPING\r\n*3\r\n$3\r\nGET\r\n$1\r\nk\r\n")
                .unwrap();
            let mut buf = [0u8; 256];
            if s.read(&mut buf).is_ok_and(|n| n > 0) {
                answered += 1;
            }
        }
        answered
    })
    .await
    .unwrap();
    assert_eq!(pings, 200, "every client answered");
    emu.wait_requests(4, Duration::from_secs(30)).await;
    let (status, body) = tokio::task::spawn_blocking(move || http(admin, "GET", "/livez"))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    signal(&proxy.0, "-TERM");
    let status = tokio::task::spawn_blocking(move || {
        let s = wait_exit(&mut proxy.0, Duration::from_secs(15));
        (s, proxy)
    })
    .await
    .unwrap()
    .0;
    assert_eq!(status.expect("SIGTERM ends it").code(), Some(0));
}

/// SIGHUP re-reads `listen.password_file` too: clients that authenticate
/// afterwards need the new password, and the old one is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rereads_the_clients_password_file() {
    let emu = TokenEmulator::start(EmulatorConfig::default()).await;
    let (listen, admin) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let pass_file = dir.path().join("listen-password");
    std::fs::write(&pass_file, "first-client-pass\n").unwrap();
    let mut env = entra_env(&emu, listen, admin);
    env.push((
        "REDIS_ENTRA_PROXY_LISTEN__PASSWORD_FILE".into(),
        pass_file.display().to_string(),
    ));
    let mut proxy = Reaper(spawn(&env, Stdio::null()));
    wait_listening(&mut proxy.0, listen);
    let auth = move |pass: &str| {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", listen)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(format!("AUTH {pass}\r\n").as_bytes()).unwrap();
        let mut buf = [0u8; 256];
        let n = s.read(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let first = tokio::task::spawn_blocking(move || auth("first-client-pass"))
        .await
        .unwrap();
    assert_eq!(first, "+OK\r\n");
    std::fs::write(&pass_file, "second-client-pass\n").unwrap();
    signal(&proxy.0, "-HUP");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = tokio::task::spawn_blocking(move || auth("second-client-pass"))
            .await
            .unwrap();
        if got == "+OK\r\n" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "new password never accepted: {got}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let old = tokio::task::spawn_blocking(move || auth("first-client-pass"))
        .await
        .unwrap();
    assert!(old.starts_with("-WRONGPASS"), "{old}");
    assert!(
        proxy.0.try_wait().unwrap().is_none(),
        "SIGHUP ended the proxy"
    );
}

/// `listen.unix_socket` naming another service's live socket: the proxy refuses to
/// start, and the other service keeps its socket (it used to be deleted and taken
/// over, and removed on exit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_unix_socket_of_another_process_is_never_taken_over() {
    let emu = TokenEmulator::start(EmulatorConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("theirs.sock");
    let theirs = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let (listen, admin) = (free_port(), free_port());
    let mut env = entra_env(&emu, listen, admin);
    env.push((
        "REDIS_ENTRA_PROXY_LISTEN__UNIX_SOCKET".into(),
        path.display().to_string(),
    ));
    let log = dir.path().join("proxy.log");
    let mut child = Reaper(spawn(&env, std::fs::File::create(&log).unwrap().into()));
    let status = wait_exit(&mut child.0, Duration::from_secs(20));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        status.is_some_and(|s| !s.success()),
        "the proxy started on another process's socket: {text}"
    );
    assert!(text.contains("another process"), "{text}");
    // Theirs still: a client reaches their listener.
    std::os::unix::net::UnixStream::connect(&path).unwrap();
    theirs.accept().unwrap();
}

/// A stale socket file (its process died) is replaced; on exit the proxy removes
/// its own socket file, and leaves alone one that another process put there since.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_unix_socket_is_replaced_and_only_our_own_is_removed() {
    let emu = TokenEmulator::start(EmulatorConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let (listen, admin) = (free_port(), free_port());
    let mut env = entra_env(&emu, listen, admin);
    env.push((
        "REDIS_ENTRA_PROXY_LISTEN__UNIX_SOCKET".into(),
        path.display().to_string(),
    ));
    let mut child = Reaper(spawn(&env, Stdio::null()));
    wait_listening(&mut child.0, listen);
    std::os::unix::net::UnixStream::connect(&path).unwrap();
    // Another process takes the path over while the proxy runs (more than a tick
    // of the file system's clock after the proxy made it: see OwnedSocket).
    std::thread::sleep(Duration::from_millis(50));
    std::fs::remove_file(&path).unwrap();
    let _theirs = std::os::unix::net::UnixListener::bind(&path).unwrap();
    signal(&child.0, "-TERM");
    assert!(wait_exit(&mut child.0, Duration::from_secs(20)).is_some());
    assert!(
        std::fs::symlink_metadata(&path).is_ok(),
        "the proxy removed another process's socket file on exit"
    );
}

/// Pointed at a port that does not speak TLS (a plaintext Redis, Azure's 6379), a
/// client's command fails with an error that says so, instead of a timeout or a
/// "cluster node ... reading the cluster topology" that hints at nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_port_is_named_as_such() {
    let plain = common::redis::PlainRedis::start();
    let env: Vec<(String, String)> = [
        ("REDIS_ENTRA_PROXY_UPSTREAM__HOST", "localhost".to_string()),
        ("REDIS_ENTRA_PROXY_UPSTREAM__PORT", plain.port.to_string()),
        ("REDIS_ENTRA_PROXY_UPSTREAM__CONNECT_TIMEOUT", "3s".into()),
        ("REDIS_ENTRA_PROXY_AUTH__SOURCE", "static".into()),
        ("REDIS_ENTRA_PROXY_AUTH__STATIC__PASSWORD", "unused".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let proxy = common::proxy::Proxy::start(&env);
    let reply = tokio::task::spawn_blocking(move || {
        let mut c = common::proxy::Raw::connect(proxy.port);
        let r = c.call(&["PING"]);
        (r, proxy.log_text())
    })
    .await
    .unwrap();
    assert!(
        reply.0.contains("did not speak TLS") && reply.0.contains("plaintext port?"),
        "reply: {}\nlog: {}",
        reply.0,
        reply.1
    );
}

/// `--help` says what each flag does, with its environment variable and TOML key
/// (it used to give the key name only).
#[test]
fn help_describes_every_flag_with_its_env_and_toml_names() {
    let out = Command::new(env!("CARGO_BIN_EXE_redis-entra-proxy"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout).replace('\n', " ");
    let help: String = help.split_whitespace().collect::<Vec<_>>().join(" ");
    for (flag, key) in redis_entra_proxy::config::FLAGS {
        let env = redis_entra_proxy::config::env_name(key);
        let at = help
            .find(&format!("{flag} "))
            .or_else(|| help.find(&format!("{flag}[")))
            .unwrap_or_else(|| panic!("{flag} missing from --help: {help}"));
        let entry = &help[at..];
        let end = entry[flag.len()..]
            .find(" --")
            .map_or(entry.len(), |e| e + flag.len());
        let entry = &entry[..end];
        assert!(
            entry.contains(&env) && entry.contains(&format!("TOML {key}")),
            "{flag}: {entry}"
        );
        // A sentence, not just the key's name.
        let words = entry.split_whitespace().count();
        assert!(words >= 8, "{flag}: {entry}");
    }
}

/// A boolean flag works bare: `--admin-enabled` (it used to need a value).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boolean_flags_work_bare() {
    let emu = TokenEmulator::start(EmulatorConfig::default()).await;
    let (listen, admin) = (free_port(), free_port());
    let mut env = entra_env(&emu, listen, admin);
    env.retain(|(k, _)| !k.starts_with("REDIS_ENTRA_PROXY_ADMIN__"));
    let mut child = Reaper(
        Command::new(env!("CARGO_BIN_EXE_redis-entra-proxy"))
            .args(["--admin-enabled", "--admin-address"])
            .arg(format!("127.0.0.1:{admin}"))
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_listening(&mut child.0, listen);
    let (status, _) = tokio::task::spawn_blocking(move || http(admin, "GET", "/livez"))
        .await
        .unwrap();
    assert_eq!(status, 200);
}
