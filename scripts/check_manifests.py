"""Checks on deploy/kubernetes/*.yaml beyond schema validity: what the proxy's
sidecar needs to work and to be safe. Run by scripts/check-deploy.sh after
kubernetes-validate; prints one line per problem and exits 1 if there is any.

Usage: python3 scripts/check_manifests.py FILE...
"""

import re
import sys

import yaml

ENV = "REDIS_ENTRA_PROXY_"
ADMIN_PORT = 9090
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
    need(env.get(ENV + "ADMIN__ADDRESS") == f"0.0.0.0:{ADMIN_PORT}",
         f"ADMIN__ADDRESS should be 0.0.0.0:{ADMIN_PORT} (kubelet probes come from outside the pod's loopback)")
    for probe, path in (("startupProbe", "/startup"), ("livenessProbe", "/livez"),
                        ("readinessProbe", "/readyz")):
        get = (container.get(probe) or {}).get("httpGet") or {}
        need(get.get("path") == path, f"{probe} should GET {path}")
        need(port_number(container, get.get("port")) == ADMIN_PORT,
             f"{probe} should use the admin port {ADMIN_PORT}")
    res = container.get("resources") or {}
    need((res.get("requests") or {}).get("cpu"), "no CPU request")
    need((res.get("requests") or {}).get("memory"), "no memory request")
    need((res.get("limits") or {}).get("memory"), "no memory limit")
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
    sys.exit(main(sys.argv[1:]))
