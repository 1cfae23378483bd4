#!/usr/bin/env bash
# A clustered cache in trouble, under load: the release build of the proxy in
# front of a local six-node TLS-only Redis Cluster (scripts/local-cluster.sh:
# three primaries, three replicas, ACL users, default user off), Entra tokens
# from the token emulator (each token's ACL user made on every node, again on a
# node that was restarted), about 200 clients (bench/phases_load.rs: writers,
# MULTI/EXEC, BLPOP queues, pub/sub) through these phases, each bounded in time:
#
#   steady; `redis-cli --cluster reshard` of 1000 slots; CLUSTER FAILOVER on a
#   replica; kill -9 of a primary (the proxy's seed node), restarted 15 s later;
#   SIGSTOP of another primary for 15 s, then SIGCONT; steady again.
#
# Per phase: errors seen by clients of the affected shard and of the others
# (counts, distinct texts), slow and hung clients, acknowledged writes lost
# (every one read back from the cluster at the end), the proxy's upstream
# connections per node (before/peak/after) and its RSS. Writes
# bench/CLUSTER-PHASES.md and bench/cluster-phases.csv (scripts/cluster_phases.py).
#
#   scripts/cluster-phases.sh                # about 5 minutes
#   CLIENTS=400 PHASE_SECONDS=40 scripts/cluster-phases.sh
#
# Loopback only. Every node is sent SIGCONT and stopped on exit, whatever
# happened. Not part of .ci/run: it measures, it does not assert.
set -euo pipefail
cd "$(dirname "$0")/.."
work=.cluster-phases
CLUSTER_PORT="${CLUSTER_PORT:-7301}"
PROXY_PORT="${PROXY_PORT:-6679}"
ADMIN_PORT="${ADMIN_PORT:-9390}"
# Long enough for the whole run by default: a token issued while a node is
# frozen could reach that node only after it thaws (a per-node ACL user is the
# emulator's stand-in for Azure's token check), which Azure would not show.
# TOKEN_LIFETIME=60 rotates tokens during the phases too.
TOKEN_LIFETIME="${TOKEN_LIFETIME:-900}"
out_md="${OUT_MD:-bench/CLUSTER-PHASES.md}"
out_csv="${OUT_CSV:-bench/cluster-phases.csv}"
. scripts/local-cluster.sh
started=$(date +%s)

need=8192
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt "$need" ]; then
  ulimit -n "$need" 2>/dev/null || ulimit -n "$(ulimit -Hn)"
fi

# The driver may have restarted a node (its new pid is in server.pid) and may
# have left one stopped: wake every node, then stop it.
stop_all() {
  local f p
  for f in "$work"/node-*/server.pid; do
    [ -s "$f" ] || continue
    p="$(cat "$f")"
    kill -CONT "$p" 2>/dev/null || true
    kill "$p" 2>/dev/null || true
  done
  cleanup
  for f in "$work"/node-*/server.pid; do
    [ -s "$f" ] || continue
    p="$(cat "$f")"
    for _ in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  done
}
trap stop_all EXIT

cargo build --release --quiet --bin redis-entra-proxy --example token_emulator --example phases_load
CLUSTER_ACLFILE=1 start_cluster_nodes
ports=()
for i in 0 1 2 3 4 5; do ports+=($((CLUSTER_PORT + i))); done
echo "==> starting the token emulator (tokens valid ${TOKEN_LIFETIME}s; a user per token on all six nodes)"
TLS_PORT="$CLUSTER_PORT"
emulator_args=(--resync --acl-save)
for p in "${ports[@]:1}"; do emulator_args+=(--redis-port "$p"); done
start_emulator phases-oid- "$TOKEN_LIFETIME" "$work/endpoint" "$work/emulator.log" "${emulator_args[@]}"
start_cluster_proxy REDIS_ENTRA_PROXY_AUTH__SOURCE=entra \
  REDIS_ENTRA_PROXY_AUTH__ENTRA__CREDENTIAL=managed-identity \
  REDIS_ENTRA_PROXY_AUTH__ENTRA__IMDS_ENDPOINT="$(cat "$work/endpoint")"

machine="$work/machine.md"
{
  echo "- CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(nproc) cores (shared with other work; load average at the start: $(cut -d' ' -f1-3 /proc/loadavg))"
  echo "- memory: $(awk '/MemTotal/ {printf "%.0f GB", $2/1048576}' /proc/meminfo); kernel $(uname -r)"
  echo "- $(redis-server --version | cut -d' ' -f1-3); $(rustc --version | cut -d' ' -f1-2); $(python3 --version)"
  echo "- build: release, commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src || echo ' (with uncommitted changes under src/)'), branch $(git rev-parse --abbrev-ref HEAD)"
  echo "- proxy: the example configuration (upstream.cluster = auto, pool_size 2, reply_timeout 30 s, hold 15 s, max_pinned 256); Entra tokens valid ${TOKEN_LIFETIME} s"
  echo "- cluster: cluster-node-timeout 3000 ms, no persistence; the proxy's seed is 127.0.0.1:$CLUSTER_PORT"
  echo "- date: $(date -u +%Y-%m-%d)"
} > "$machine"

ADMIN_PASS="$admin_pass" python3 scripts/cluster_phases.py \
  --proxy-port "$PROXY_PORT" --proxy-pid "$proxy_pid" --proxy-log "$work/proxy.log" \
  --ca "$work/tls/ca.pem" --work "$work" --ports "${ports[@]}" --oid-prefix phases-oid- \
  --driver "${CARGO_TARGET_DIR:-target}/release/examples/phases_load" \
  --clients "${CLIENTS:-200}" --phase-seconds "${PHASE_SECONDS:-30}" \
  --machine "$machine" --md "$out_md" --csv "$out_csv" \
  --command "scripts/cluster-phases.sh${CLIENTS:+ (CLIENTS=$CLIENTS)}${PHASE_SECONDS:+ (PHASE_SECONDS=$PHASE_SECONDS)}"
echo "==> run time: $(( $(date +%s) - started )) s; wrote $out_md and $out_csv"
