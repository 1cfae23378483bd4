"""Checks on deploy/kubernetes/*.yaml beyond schema validity: what the proxy's
sidecar needs to work and to be safe. Run by scripts/check-deploy.sh after
kubernetes-validate; prints one line per problem and exits 1 if there is any.

Memory: the container's memory limit must hold the most that the limits.* (and
listen.max_clients, upstream.*) it sets let clients make the proxy hold:

    base + max_clients * (2 * max_buffered_bytes + max_pubsub_queued_bytes)
         + (pool_size + max_pinned + 1) * per upstream connection

(a client's unfinished command and its unread replies are each bounded by
max_buffered_bytes, its unread pub/sub messages by max_pubsub_queued_bytes), and
max_bulk_bytes must not exceed max_buffered_bytes. Unset keys take the proxy's
defaults, read from config/redis-entra-proxy.example.toml.

Usage: python3 scripts/check_manifests.py FILE...
       python3 scripts/check_manifests.py --self-test FILE  (the checks catch a
       manifest with the old 128Mi limit and the default buffers)
"""

import copy
import os
import re
import sys

import yaml

ENV = "REDIS_ENTRA_PROXY_"
ADMIN_PORT = 9090
ADMIN_ADDRESS = f"[::]:{ADMIN_PORT}"
MIB = 1024 * 1024
# Resident memory with no client buffers: 13-18 MB measured (bench/RESULTS.md,
# soak), rounded up.
BASE_BYTES = 32 * MIB
# TLS and read buffers of one upstream connection, rounded up.
PER_UPSTREAM_BYTES = 256 * 1024
EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "config", "redis-entra-proxy.example.toml")


def defaults():
    """{env name: default} from the example config's `# env: NAME ... default: V` lines."""
    out = {}
    with open(EXAMPLE) as f:
        for line in f:
            m = re.match(r"#\s*env:\s*(\S+).*default:\s*(\S+)", line)
            if m:
                out[m.group(1)] = m.group(2)
    return out


def quantity(text):
    """A Kubernetes memory quantity ("256Mi", "1Gi", "500M", "1048576") in bytes."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|K|M|G|T)?", str(text).strip())
    if not m:
        raise ValueError(f"cannot read memory quantity {text!r}")
    units = {None: 1, "Ki": 1024, "Mi": MIB, "Gi": 1024 * MIB, "Ti": MIB * MIB,
             "k": 1000, "K": 1000, "M": 10**6, "G": 10**9, "T": 10**12}
    return float(m.group(1)) * units[m.group(2)]


def memory_needed(env):
    """(bytes the settings in `env` let the proxy hold, the formula filled in)."""
    d = defaults()

    def get(key):
        name = ENV + key
        return int(env.get(name) or d[name])

    clients = get("LISTEN__MAX_CLIENTS")
    buffered = get("LIMITS__MAX_BUFFERED_BYTES")
    pubsub = get("LIMITS__MAX_PUBSUB_QUEUED_BYTES")
    upstream = get("UPSTREAM__POOL_SIZE") + get("UPSTREAM__MAX_PINNED") + 1
    total = BASE_BYTES + clients * (2 * buffered + pubsub) + upstream * PER_UPSTREAM_BYTES
    how = (f"{clients} clients x (2 x {buffered / MIB:g} MiB + {pubsub / MIB:g} MiB) + "
           f"{upstream} upstream connections x {PER_UPSTREAM_BYTES // 1024} KiB + "
           f"{BASE_BYTES // MIB} MiB base = {total / MIB:.0f} MiB")
    return total, how
DEFAULT_GRACE_S = 30.0
POD_TEMPLATE_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"}


def seconds(text):
    """A humantime duration as the proxy accepts it ("30s", "1m", "500ms") in seconds."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    total = 0.0
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h)", text)
    if not parts or "".join(n + u for n, u in parts) != text.replace(" ", ""):
        raise ValueError(f"cannot read duration {text!r}")
    for number, unit in parts:
        total += float(number) * units[unit]
    return total


def image_pinned(image):
    if "@sha256:" in image:
        return True
    name = image.rsplit("/", 1)[-1]
    return ":" in name and name.split(":", 1)[1] not in ("", "latest")


def port_number(container, port):
    if isinstance(port, int):
        return port
    for p in container.get("ports", []):
        if p.get("name") == port:
            return p.get("containerPort")
    return None


def check_proxy(where, container, native, pod, problems):
    env = {e["name"]: e.get("value") for e in container.get("env", [])}

    def need(cond, message):
        if not cond:
            problems.append(f"{where}: {message}")

    if native:
        need(container.get("restartPolicy") == "Always",
             "a native sidecar needs restartPolicy: Always")
    need(env.get(ENV + "UPSTREAM__HOST"), "UPSTREAM__HOST is not set")
    need(env.get(ENV + "AUTH__ENTRA__CREDENTIAL") == "workload-identity",
         "AUTH__ENTRA__CREDENTIAL should be workload-identity")
    need(env.get(ENV + "ADMIN__ENABLED") == "true", "ADMIN__ENABLED should be \"true\"")
    need(env.get(ENV + "ADMIN__ADDRESS") == ADMIN_ADDRESS,
         f"ADMIN__ADDRESS should be {ADMIN_ADDRESS} (kubelet probes come from outside the "
         "pod's loopback, over IPv4 or IPv6)")
    for probe, path in (("startupProbe", "/startup"), ("livenessProbe", "/livez"),
                        ("readinessProbe", "/readyz")):
        get = (container.get(probe) or {}).get("httpGet") or {}
        need(get.get("path") == path, f"{probe} should GET {path}")
        need(port_number(container, get.get("port")) == ADMIN_PORT,
             f"{probe} should use the admin port {ADMIN_PORT}")
    res = container.get("resources") or {}
    need((res.get("requests") or {}).get("cpu"), "no CPU request")
    need((res.get("requests") or {}).get("memory"), "no memory request")
    limit = (res.get("limits") or {}).get("memory")
    need(limit, "no memory limit")
    if limit:
        needed, how = memory_needed(env)
        need(quantity(limit) >= needed,
             f"memory limit {limit} is less than the limits.* it sets let clients make the "
             f"proxy hold: {how}")
        d = defaults()
        bulk = int(env.get(ENV + "LIMITS__MAX_BULK_BYTES") or d[ENV + "LIMITS__MAX_BULK_BYTES"])
        buffered = int(env.get(ENV + "LIMITS__MAX_BUFFERED_BYTES")
                       or d[ENV + "LIMITS__MAX_BUFFERED_BYTES"])
        need(bulk <= buffered, f"LIMITS__MAX_BULK_BYTES {bulk} exceeds LIMITS__MAX_BUFFERED_BYTES {buffered}")
    sc = container.get("securityContext") or {}
    pod_sc = pod.get("securityContext") or {}
    need(sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, "runAsNonRoot is not true")
    need(sc.get("readOnlyRootFilesystem") is True, "readOnlyRootFilesystem is not true")
    need(sc.get("allowPrivilegeEscalation") is False, "allowPrivilegeEscalation is not false")
    need("ALL" in ((sc.get("capabilities") or {}).get("drop") or []),
         "capabilities do not drop ALL")

    grace = seconds(env.get(ENV + "SHUTDOWN__GRACE") or f"{DEFAULT_GRACE_S}s")
    delay = seconds(env.get(ENV + "SHUTDOWN__MIN_DELAY") or "0s")
    pod_grace = pod.get("terminationGracePeriodSeconds", 30)
    need(pod_grace > grace + delay,
         f"terminationGracePeriodSeconds {pod_grace} is not longer than "
         f"shutdown.min_delay + shutdown.grace ({delay + grace:g}s)")


def self_test(path):
    """The memory check must catch the manifest as it was: 128Mi and default buffers."""
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    for doc in docs:
        spec = (doc.get("spec") or {}).get("template", {}).get("spec", {})
        for c in (spec.get("initContainers") or []) + (spec.get("containers") or []):
            if "redis-entra-proxy" not in c.get("image", ""):
                continue
            old = copy.deepcopy(c)
            old["env"] = [e for e in old["env"]
                          if not e["name"].startswith((ENV + "LIMITS__", ENV + "LISTEN__MAX_CLIENTS"))]
            old["resources"]["limits"]["memory"] = "128Mi"
            problems = []
            check_proxy("self-test", old, "restartPolicy" in old, spec, problems)
            memory = [p for p in problems if "memory limit 128Mi" in p]
            if not memory:
                print("FAIL self-test: a 128Mi limit with the default buffers was not caught")
                return 1
            print(f"self-test: caught {memory[0]}")
            return 0
    print(f"FAIL self-test: no redis-entra-proxy container in {path}")
    return 1


def main(paths):
    problems = []
    accounts = {}
    pods = []
    seen = {"native": 0, "classic": 0}
    for path in paths:
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        for doc in docs:
            kind = doc.get("kind")
            name = doc.get("metadata", {}).get("name")
            if kind == "ServiceAccount":
                accounts[name] = doc
            elif kind in POD_TEMPLATE_KINDS:
                pods.append((f"{path}: {kind}/{name}", doc["spec"]["template"]))
            elif kind == "Pod":
                pods.append((f"{path}: Pod/{name}", doc))
    for where, template in pods:
        pod = template.get("spec", {})
        labels = template.get("metadata", {}).get("labels", {})
        if labels.get("azure.workload.identity/use") != "true":
            problems.append(f"{where}: pod label azure.workload.identity/use: \"true\" is missing")
        account = accounts.get(pod.get("serviceAccountName"))
        if not account:
            problems.append(f"{where}: serviceAccountName does not name a ServiceAccount in deploy/")
        elif not account["metadata"].get("annotations", {}).get("azure.workload.identity/client-id"):
            problems.append(f"{where}: its ServiceAccount lacks azure.workload.identity/client-id")
        found = 0
        for key, native in (("initContainers", True), ("containers", False)):
            for c in pod.get(key) or []:
                if not image_pinned(c.get("image", "")):
                    problems.append(f"{where}: image {c.get('image')!r} needs a tag other than latest")
                if "redis-entra-proxy" in c.get("image", ""):
                    found += 1
                    seen["native" if native else "classic"] += 1
                    check_proxy(f"{where}: {key}/{c['name']}", c, native, pod, problems)
        if found != 1:
            problems.append(f"{where}: expected one redis-entra-proxy container, found {found}")
    for style, count in seen.items():
        if count == 0:
            problems.append(f"no {style} sidecar example in {', '.join(paths)}")
    for p in problems:
        print(f"FAIL {p}")
    print(f"manifest checks: {len(pods)} pod templates, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--self-test"]:
        sys.exit(self_test(sys.argv[2]))
    sys.exit(main(sys.argv[1:]))
