//! Which environment variables are configuration. Ours have the shape
//! `REDIS_ENTRA_PROXY_<SECTION>__<KEY>`; kubelet also injects variables that merely
//! share the prefix: a Service named `redis-entra-proxy` (or `redis-entra-proxy-x`)
//! in the namespace gives every pod `REDIS_ENTRA_PROXY_SERVICE_HOST`,
//! `REDIS_ENTRA_PROXY_SERVICE_PORT[_<NAME>]`, `REDIS_ENTRA_PROXY_PORT` and
//! `REDIS_ENTRA_PROXY_PORT_<N>_<PROTO>[_PROTO|_PORT|_ADDR]` ("service links").
//! Those are never configuration; any other variable with the prefix still is, so a
//! mistyped key (`REDIS_ENTRA_PROXY_UPSTREAM_HOST`, one underscore) is an error.

use super::ENV_PREFIX;

/// Whether `name=value` is a Kubernetes service-link variable under our prefix:
/// the name has a service link's shape (and none of our keys' `__`), and the value
/// is what kubelet puts there (an IP address, a port number, `tcp://IP:PORT`, a
/// protocol). The value matters: `REDIS_ENTRA_PROXY_UPSTREAM_PORT=6380` is our key
/// mistyped, while a Service `redis-entra-proxy-upstream` would set it to
/// `tcp://10.0.0.9:6380`.
pub fn is_service_link(name: &str, value: &str) -> bool {
    let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
        return false;
    };
    let Some(rest) = rest.strip_prefix('_') else {
        return false;
    };
    if rest.contains("__") {
        return false;
    }
    let t: Vec<&str> = rest.split('_').collect();
    let number = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let proto = |s: &str| matches!(s, "TCP" | "UDP" | "SCTP");
    let ip = value.parse::<std::net::IpAddr>().is_ok();
    let url = ["tcp://", "udp://", "sctp://"]
        .iter()
        .any(|p| value.starts_with(p));
    match t.as_slice() {
        [.., "SERVICE", "HOST"] => ip,
        [.., "SERVICE", "PORT"] => number(value),
        [.., "PORT", n, p, "PROTO"] if number(n) && proto(p) => value.eq_ignore_ascii_case(p),
        [.., "PORT", n, p, "PORT"] if number(n) && proto(p) => number(value),
        [.., "PORT", n, p, "ADDR"] if number(n) && proto(p) => ip,
        [.., "PORT", n, p] if number(n) && proto(p) => url,
        [.., "PORT"] => url,
        // A named port: `..._SERVICE_PORT_<NAME>`.
        _ => t.windows(2).any(|w| w == ["SERVICE", "PORT"]) && number(value),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_links_are_recognised_and_our_keys_are_not() {
        for (name, value) in [
            ("REDIS_ENTRA_PROXY_SERVICE_HOST", "10.0.0.7"),
            ("REDIS_ENTRA_PROXY_SERVICE_HOST", "fd00::7"),
            ("REDIS_ENTRA_PROXY_SERVICE_PORT", "6379"),
            ("REDIS_ENTRA_PROXY_SERVICE_PORT_REDIS", "6379"),
            ("REDIS_ENTRA_PROXY_SERVICE_PORT_ADMIN_HTTP", "9090"),
            ("REDIS_ENTRA_PROXY_PORT", "tcp://10.0.0.7:6379"),
            ("REDIS_ENTRA_PROXY_PORT_6379_TCP", "tcp://10.0.0.7:6379"),
            ("REDIS_ENTRA_PROXY_PORT_6379_TCP_PROTO", "tcp"),
            ("REDIS_ENTRA_PROXY_PORT_6379_TCP_PORT", "6379"),
            ("REDIS_ENTRA_PROXY_PORT_6379_TCP_ADDR", "10.0.0.7"),
            ("REDIS_ENTRA_PROXY_ADMIN_SERVICE_HOST", "10.0.0.8"),
            ("REDIS_ENTRA_PROXY_UPSTREAM_PORT", "tcp://10.0.0.9:6380"),
        ] {
            assert!(is_service_link(name, value), "{name}={value}");
        }
        for (name, value) in [
            ("REDIS_ENTRA_PROXY_UPSTREAM__PORT", "6380"),
            ("REDIS_ENTRA_PROXY_ADMIN__ADDRESS", "tcp://x"),
            ("REDIS_ENTRA_PROXY_UPSTREAM_HOST", "10.0.0.1"),
            ("REDIS_ENTRA_PROXY_UPSTREAM_PORT", "6380"),
            ("REDIS_ENTRA_PROXY_SERVICE_HOST", "cache.example"),
            ("REDIS_ENTRA_PROXY_LISTEN_PASSWORD", "x"),
            ("REDIS_ENTRA_PROXYSERVICE_HOST", "10.0.0.1"),
            ("OTHER_SERVICE_HOST", "10.0.0.1"),
        ] {
            assert!(!is_service_link(name, value), "{name}={value}");
        }
    }

    /// kubelet's service links for a Service named `redis-entra-proxy` (and one
    /// named `redis-entra-proxy-admin`) in the namespace.
    const SERVICE_LINKS: &[(&str, &str)] = &[
        ("REDIS_ENTRA_PROXY_SERVICE_HOST", "10.0.0.7"),
        ("REDIS_ENTRA_PROXY_SERVICE_PORT", "6379"),
        ("REDIS_ENTRA_PROXY_SERVICE_PORT_REDIS", "6379"),
        ("REDIS_ENTRA_PROXY_PORT", "tcp://10.0.0.7:6379"),
        ("REDIS_ENTRA_PROXY_PORT_6379_TCP", "tcp://10.0.0.7:6379"),
        ("REDIS_ENTRA_PROXY_PORT_6379_TCP_PROTO", "tcp"),
        ("REDIS_ENTRA_PROXY_PORT_6379_TCP_PORT", "6379"),
        ("REDIS_ENTRA_PROXY_PORT_6379_TCP_ADDR", "10.0.0.7"),
        ("REDIS_ENTRA_PROXY_ADMIN_SERVICE_HOST", "10.0.0.8"),
        ("REDIS_ENTRA_PROXY_ADMIN_PORT_9090_TCP_ADDR", "10.0.0.8"),
    ];

    #[test]
    fn kubernetes_service_links_are_not_config_but_look_alikes_still_fail() {
        let mut env = SERVICE_LINKS.to_vec();
        env.push(("REDIS_ENTRA_PROXY_UPSTREAM__HOST", "h"));
        let c = super::super::tests::load(&env, None).unwrap();
        assert_eq!(c.upstream.host, "h");
        // One underscore where two belong: ours, mistyped.
        env.push(("REDIS_ENTRA_PROXY_UPSTREAM_PORT", "6380"));
        let e = super::super::tests::load(&env, None).unwrap_err();
        assert!(e.to_string().contains("unknown key `upstream_port`"), "{e}");
    }
}
