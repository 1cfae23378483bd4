//! A real Redis Cluster on loopback for the cluster tests: six TLS-only
//! redis-server processes (three primaries, three replicas), `tls-cluster yes`
//! and `tls-replication yes`, no plaintext port, the default user off and the
//! same ACL users on every node (the proxy's, and one per Azure access
//! policy: [`super::policies`]).
//!
//! One cluster per variant per test binary ([`shared`]): made by the first test
//! that asks, then used by every other. Test binaries end without running the
//! destructors of statics, so the servers are children of one thread that lives
//! as long as the process and they get `SIGKILL` when it goes
//! (`PR_SET_PDEATHSIG`, which also covers a crashed or killed test run); a
//! process-exit hook kills them and removes their directory on a normal exit.

use super::certs::{self, TestPki};
use super::redis::{free_port, ADMIN_PASSWORD};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The ACL user the proxy authenticates as on every node.
pub const USER: &str = "proxyuser";
pub const PASSWORD: &str = "cluster-token-1";

/// How nodes name themselves in `CLUSTER SHARDS`/`SLOTS` and in redirections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Announce {
    /// `127.0.0.1`: the proxy must still verify the certificate as the cache's name.
    Ip,
    /// `cluster-announce-hostname localhost` + `cluster-preferred-endpoint-type hostname`.
    Hostname,
}

pub struct Cluster {
    /// TLS ports of the six nodes (first three started as primaries).
    pub ports: Vec<u16>,
    pub pki: TestPki,
    pub dir: PathBuf,
    pub announce: Announce,
}

static IP: OnceLock<Cluster> = OnceLock::new();
static HOSTNAME: OnceLock<Cluster> = OnceLock::new();
/// Every node's pid and every cluster's directory, for the exit hook.
static PIDS: Mutex<Vec<u32>> = Mutex::new(Vec::new());
static DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// The cluster of this variant, made on first use.
pub fn shared(announce: Announce) -> &'static Cluster {
    let cell = match announce {
        Announce::Ip => &IP,
        Announce::Hostname => &HOSTNAME,
    };
    cell.get_or_init(|| Cluster::create(announce))
}

extern "C" fn kill_all_at_exit() {
    if let Ok(pids) = PIDS.lock() {
        for &pid in pids.iter() {
            // SAFETY: kill(2) on our own children's pids; no memory involved.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
        }
    }
    if let Ok(dirs) = DIRS.lock() {
        for d in dirs.iter() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// Start `redis-server conf` from the one long-lived spawner thread, with
/// SIGKILL as its parent-death signal (the parent being that thread, which
/// ends only with the process).
fn spawn_node(conf: PathBuf) -> u32 {
    type SpawnRequest = (PathBuf, mpsc::Sender<u32>);
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let tx = SPAWNER.get_or_init(|| {
        // SAFETY: registering a plain extern "C" function.
        unsafe {
            libc::atexit(kill_all_at_exit);
        }
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("cluster-spawner".into())
            .spawn(move || {
                let mut children = Vec::new();
                while let Ok((conf, back)) = rx.recv() {
                    let mut cmd = Command::new("redis-server");
                    cmd.arg(&conf).stdout(Stdio::null()).stderr(Stdio::null());
                    // SAFETY: prctl is async-signal-safe; nothing else runs here.
                    unsafe {
                        cmd.pre_exec(|| {
                            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                                return Err(std::io::Error::last_os_error());
                            }
                            Ok(())
                        });
                    }
                    let child = cmd.spawn().expect("start redis-server");
                    let pid = child.id();
                    PIDS.lock().unwrap().push(pid);
                    children.push(child);
                    let _ = back.send(pid);
                }
                // The channel is in a static: this loop never ends before the process.
            })
            .expect("spawner thread");
        Mutex::new(tx)
    });
    let (back_tx, back_rx) = mpsc::channel();
    tx.lock().unwrap().send((conf, back_tx)).unwrap();
    back_rx.recv().expect("spawner answered")
}

/// The names a node's certificate covers: the cache's host name only, as on
/// Azure, where the topology names shards by IP addresses the certificate
/// does not cover (nodes and redis-cli check the chain, not the name; the
/// proxy checks `upstream.server_name`).
const CERT_NAMES: &[&str] = &["localhost"];

impl Cluster {
    fn create(announce: Announce) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("redis-cluster-")
            .tempdir()
            .unwrap()
            .keep();
        DIRS.lock().unwrap().push(dir.clone());
        let pki = certs::make(&dir, "cluster", CERT_NAMES);
        // Six client ports and six bus ports, all distinct.
        let mut all = Vec::new();
        while all.len() < 12 {
            let p = free_port();
            if !all.contains(&p) {
                all.push(p);
            }
        }
        let ports = all[..6].to_vec();
        let bus_ports = all[6..].to_vec();
        let cluster = Cluster {
            ports,
            pki,
            dir,
            announce,
        };
        for (&port, &bus) in cluster.ports.iter().zip(&bus_ports) {
            cluster.start_node(port, bus);
        }
        for &port in &cluster.ports {
            cluster.wait_ready(port);
        }
        let mut args: Vec<String> = vec!["--cluster".into(), "create".into()];
        args.extend(cluster.ports.iter().map(|p| format!("127.0.0.1:{p}")));
        args.extend(["--cluster-replicas", "1", "--cluster-yes"].map(String::from));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = cluster.cli_raw(None, &refs);
        assert!(
            out.contains("All 16384 slots covered"),
            "cluster create failed: {out}"
        );
        cluster.wait_converged();
        cluster
    }

    fn node_dir(&self, port: u16) -> PathBuf {
        self.dir.join(format!("node-{port}"))
    }

    fn start_node(&self, port: u16, bus: u16) {
        let nd = self.node_dir(port);
        std::fs::create_dir_all(&nd).unwrap();
        let announce = match self.announce {
            Announce::Ip => String::new(),
            Announce::Hostname => {
                "cluster-announce-hostname localhost\ncluster-preferred-endpoint-type hostname\n"
                    .into()
            }
        };
        let conf = format!(
            "port 0\ntls-port {port}\nbind 127.0.0.1\ntls-cert-file {cert}\ntls-key-file {key}\n\
             tls-ca-cert-file {ca}\ntls-auth-clients no\ntls-cluster yes\ntls-replication yes\n\
             cluster-enabled yes\ncluster-config-file {nodes}\ncluster-port {bus}\n\
             cluster-node-timeout 3000\n{announce}save \"\"\nappendonly no\ndir {dir}\n\
             daemonize no\nuser default off\n\
             user admin on >{ADMIN_PASSWORD} ~* &* +@all\nuser {USER} on >{PASSWORD} ~* &* +@all\n\
             {policies}masteruser admin\nmasterauth {ADMIN_PASSWORD}\nlogfile {log}\n",
            cert = self.pki.cert_pem.display(),
            key = self.pki.key_pem.display(),
            ca = self.pki.ca_pem.display(),
            nodes = nd.join("nodes.conf").display(),
            dir = nd.display(),
            log = nd.join("redis.log").display(),
            policies = super::policies::conf_lines(),
        );
        let path = nd.join("redis.conf");
        std::fs::write(&path, conf).unwrap();
        spawn_node(path);
    }

    fn wait_ready(&self, port: u16) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = self.cli(port, &["PING"]);
            if out.trim() == "PONG" {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node {port} did not start: {out}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every node says `cluster_state:ok` and sees all six nodes.
    pub fn wait_converged(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ok = self.ports.iter().all(|&p| {
                let info = self.cli(p, &["CLUSTER", "INFO"]);
                info.contains("cluster_state:ok") && info.contains("cluster_known_nodes:6")
            });
            if ok {
                return;
            }
            assert!(Instant::now() < deadline, "cluster did not converge");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn cli_raw(&self, port: Option<u16>, args: &[&str]) -> String {
        let mut cmd = Command::new("redis-cli");
        cmd.args(["--tls", "--cacert"]).arg(&self.pki.ca_pem).args([
            "--user",
            "admin",
            "--pass",
            ADMIN_PASSWORD,
            "--no-auth-warning",
        ]);
        if let Some(p) = port {
            cmd.args(["-h", "127.0.0.1", "-p", &p.to_string()]);
        }
        let out = cmd.args(args).output().expect("run redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    }

    /// redis-cli as `admin` against one node.
    pub fn cli(&self, port: u16, args: &[&str]) -> String {
        self.cli_raw(Some(port), args)
    }

    /// `redis-cli --cluster <args>` (reshard, check, ...).
    pub fn cluster_cli(&self, args: &[&str]) -> String {
        let mut all = vec!["--cluster"];
        all.extend_from_slice(args);
        self.cli_raw(None, &all)
    }

    /// One node's address for `redis-cli --cluster` and for the proxy.
    pub fn seed(&self) -> String {
        format!("127.0.0.1:{}", self.ports[0])
    }

    /// TLS ports of the nodes that are primaries now.
    pub fn primaries(&self) -> Vec<u16> {
        self.ports
            .iter()
            .copied()
            .filter(|&p| self.cli(p, &["ROLE"]).starts_with("master"))
            .collect()
    }

    /// Run the same command on every node (ACL users for token generations).
    pub fn on_every_node(&self, args: &[&str]) {
        for &p in &self.ports {
            let out = self.cli(p, args);
            assert!(!out.starts_with("ERR"), "node {p}: {out}");
        }
    }

    /// Remove every key from every primary (tests share the cluster).
    pub fn flush(&self) {
        for p in self.primaries() {
            self.cli(p, &["FLUSHALL"]);
        }
    }

    /// Every primary has a replica and every replica's link to its primary
    /// is up (a replica that never synced does not take over when its
    /// primary dies; a restarted node takes a moment to become a replica).
    pub fn wait_replicas_synced(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ok = self.ports.iter().all(|&p| {
                let info = self.cli(p, &["INFO", "replication"]);
                // A primary with its replica, or a replica linked to its primary.
                (info.contains("role:master") && !info.contains("connected_slaves:0"))
                    || info.contains("master_link_status:up")
            });
            if ok {
                return;
            }
            assert!(Instant::now() < deadline, "replicas did not sync");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The process id of the node on `port`.
    pub fn pid(&self, port: u16) -> i32 {
        self.cli(port, &["INFO", "server"])
            .lines()
            .find_map(|l| l.strip_prefix("process_id:"))
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("no pid for node {port}"))
    }

    /// Send `signal` to the node on `pid` (SIGKILL, SIGSTOP, SIGCONT).
    pub fn signal(&self, pid: i32, signal: i32) {
        // SAFETY: kill(2) on one of this test process's redis-server children.
        unsafe {
            libc::kill(pid, signal);
        }
    }

    /// Start the node on `port` again after it was killed (same config and
    /// nodes.conf: it rejoins the cluster, as a replica if it was failed over).
    pub fn restart(&self, port: u16) {
        spawn_node(self.node_dir(port).join("redis.conf"));
        self.wait_ready(port);
    }

    pub fn log_path(&self, port: u16) -> PathBuf {
        self.node_dir(port).join("redis.log")
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// A proxy in front of `cluster` ([`proxy_env`]) with `extra` settings.
pub fn proxy_with(c: &Cluster, extra: &[(&str, &str)]) -> super::proxy::Proxy {
    let mut env = proxy_env(c);
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    super::proxy::Proxy::start(&env)
}

/// Environment for a proxy in front of `cluster` with the static credential,
/// the certificate checked as `localhost` whatever the topology names.
pub fn proxy_env(cluster: &Cluster) -> Vec<(String, String)> {
    [
        ("REDIS_ENTRA_PROXY_UPSTREAM__HOST", "127.0.0.1".to_string()),
        (
            "REDIS_ENTRA_PROXY_UPSTREAM__SERVER_NAME",
            "localhost".into(),
        ),
        (
            "REDIS_ENTRA_PROXY_UPSTREAM__PORT",
            cluster.ports[0].to_string(),
        ),
        (
            "REDIS_ENTRA_PROXY_UPSTREAM__CA_FILE",
            cluster.pki.ca_pem.display().to_string(),
        ),
        ("REDIS_ENTRA_PROXY_AUTH__SOURCE", "static".into()),
        ("REDIS_ENTRA_PROXY_AUTH__USERNAME", USER.into()),
        ("REDIS_ENTRA_PROXY_AUTH__STATIC__PASSWORD", PASSWORD.into()),
        ("REDIS_ENTRA_PROXY_UPSTREAM__CONNECT_TIMEOUT", "3s".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}
