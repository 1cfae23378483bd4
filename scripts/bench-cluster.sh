#!/usr/bin/env bash
# Throughput through the proxy in front of a local six-node TLS Redis Cluster
# (scripts/local-cluster.sh) next to `redis-benchmark --cluster --tls` straight
# to the shards, in one sitting on this machine (loopback only, bounded: -n).
# Usage: scripts/bench-cluster.sh [requests]   Prints Markdown tables.
# Each run is repeated REPS times (default 3), direct and proxy alternating;
# the table shows medians of the figures and of the per-pair ratios.
# Then the cost of a command in thread hops at -c 1 (syscalls, futex calls and
# context switches of the proxy per command, on the cluster path and on one
# endpoint) and of idle clients (RSS and threads with IDLE clients connected,
# default 5000). HOPS_ONLY=1 skips the throughput runs.
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-100000}"
reps="${REPS:-3}"
work=.bench-cluster
. scripts/local-cluster.sh
start_cluster >/dev/null
direct=(--cluster --tls --cacert "$work/tls/ca.pem" -h 127.0.0.1 -p "$CLUSTER_PORT" --user admin -a "$admin_pass")
# Requests per second from wall-clock time around each run, measured the same
# way for both sides (connection setup and, for --cluster, its topology query
# included). Any error reply in a run is kept in $work/errors.
rps() { # prints "set get" requests per second
  local out
  for t in set get; do
    local start end
    start=$(date +%s.%N)
    out=$(redis-benchmark "$@" -n "$n" -r 100000 -t "$t" -q 2>&1 | tr '\r' '\n')
    end=$(date +%s.%N)
    if grep -q -i -E 'error|moved|crossslot' <<<"$out"; then echo "$out" >> "$work/errors"; fi
    awk -v n="$n" -v s="$start" -v e="$end" 'BEGIN { printf "%.0f ", n / (e - s) }'
  done
  echo
}
median() { sort -g | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }
throughput() {
echo "| run | direct cluster TLS SET | proxy SET | ratio | direct cluster TLS GET | proxy GET | ratio |"
echo "|---|---|---|---|---|---|---|"
for args in "-c 50" "-c 50 -P 16" "-c 1"; do
  samples=()
  for _ in $(seq 1 "$reps"); do
    # shellcheck disable=SC2086
    read -r dset dget < <(rps "${direct[@]}" $args)
    # shellcheck disable=SC2086
    read -r pset pget < <(rps -p "$PROXY_PORT" $args)
    samples+=("$dset $pset $dget $pget")
  done
  col() { printf '%s\n' "${samples[@]}" | awk -v c="$1" '{print $c}' | median; }
  ratio() { printf '%s\n' "${samples[@]}" | awk -v d="$1" -v p="$2" '{print $p / $d}' | median; }
  awk -v a="$args" -v ds="$(col 1)" -v ps="$(col 2)" -v rs="$(ratio 1 2)" \
    -v dg="$(col 3)" -v pg="$(col 4)" -v rg="$(ratio 3 4)" \
    'BEGIN { printf "| %s | %.0f | %.0f | %.2fx | %.0f | %.0f | %.2fx |\n", a, ds, ps, rs, dg, pg, rg }'
done
echo
echo "proxy RSS after the runs: $(awk '/VmRSS/ {print $2, $3}' /proc/"$proxy_pid"/status)"
}
[ -n "${HOPS_ONLY:-}" ] || throughput

# Context switches so far of every thread of process $1.
ctxsw() {
  cat /proc/"$1"/task/*/status 2>/dev/null |
    awk '/^(voluntary|nonvoluntary)_ctxt_switches/ {s += $2} END {print s}'
}
# Per command through the proxy on port $1 (pid $2), one client, one command
# at a time (SET and GET of redis-benchmark's one key, HOPS_N of each):
# "context-switches syscalls futex". Context switches from /proc without a
# tracer; syscalls from `strace -f -c` on a second run (strace slows it).
hops() {
  local port=$1 pid=$2 m=${HOPS_N:-20000} a b st
  redis-benchmark -p "$port" -c 1 -n 2000 -t set,get -q >/dev/null 2>&1
  a=$(ctxsw "$pid")
  redis-benchmark -p "$port" -c 1 -n "$m" -t set,get -q >/dev/null 2>&1
  b=$(ctxsw "$pid")
  strace -f -c -q -p "$pid" -o "$work/strace.$port" &
  st=$!
  sleep 1
  redis-benchmark -p "$port" -c 1 -n "$m" -t set,get -q >/dev/null 2>&1
  kill -INT "$st"
  wait "$st" 2>/dev/null || true
  awk -v m="$m" -v cs="$((b - a))" '
    $NF == "total" { total = $4 } $NF == "futex" { futex = $4 }
    END { printf "%.2f %.2f %.2f\n", cs / (2 * m), total / (2 * m), futex / (2 * m) }' "$work/strace.$port"
}
# One endpoint: a second proxy with upstream.cluster = off in front of the
# primary that holds redis-benchmark's key (no -r: one key, one slot).
owner=
for i in 0 1 2 3 4 5; do
  port=$((CLUSTER_PORT + i))
  if ! node_cli "$port" EXISTS key:__rand_int__ 2>&1 | grep -q MOVED; then owner=$port; fi
done
single_port=$((PROXY_PORT + 50))
env REDIS_ENTRA_PROXY_AUTH__SOURCE=static \
  REDIS_ENTRA_PROXY_AUTH__USERNAME=quickstart-identity \
  REDIS_ENTRA_PROXY_AUTH__STATIC__PASSWORD="$static_pass" \
  REDIS_ENTRA_PROXY_UPSTREAM__HOST=127.0.0.1 \
  REDIS_ENTRA_PROXY_UPSTREAM__SERVER_NAME=localhost \
  REDIS_ENTRA_PROXY_UPSTREAM__PORT="$owner" \
  REDIS_ENTRA_PROXY_UPSTREAM__CLUSTER=off \
  REDIS_ENTRA_PROXY_UPSTREAM__CA_FILE="$work/tls/ca.pem" \
  REDIS_ENTRA_PROXY_LISTEN__ADDRESS="127.0.0.1:$single_port" \
  "${CARGO_TARGET_DIR:-target}"/release/redis-entra-proxy --config config/redis-entra-proxy.example.toml 2>"$work/proxy-single.log" &
single_pid=$!
pids+=("$single_pid")
wait_port "$single_port"
echo
echo "Per command at -c 1 (SET and GET of one key, ${HOPS_N:-20000} each; the proxy's threads):"
echo
echo "| path | context switches | syscalls | of which futex |"
echo "|---|---|---|---|"
read -r cs sc fx < <(hops "$PROXY_PORT" "$proxy_pid")
echo "| cluster (upstream.cluster = auto) | $cs | $sc | $fx |"
read -r cs sc fx < <(hops "$single_port" "$single_pid")
echo "| one endpoint (upstream.cluster = off) | $cs | $sc | $fx |"

# Idle clients: IDLE connections to the cluster proxy, each after one GET
# (so each has its shared connection), then left open.
idle=${IDLE:-5000}
mem() { awk '/^VmRSS/ {r = $2} /^Threads/ {t = $2} END {print r, t}' /proc/"$1"/status; }
read -r rss0 thr0 < <(mem "$proxy_pid")
python3 - "$PROXY_PORT" "$idle" "$proxy_pid" <<'PY' >"$work/idle"
import socket, sys, time
port, n, pid = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
socks = []
for i in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"*2\r\n$3\r\nGET\r\n$%d\r\nidle:%d\r\n" % (len(str(i)) + 5, i))
    socks.append(s)
for s in socks:
    s.settimeout(20)
    assert s.recv(64).startswith(b"$-1"), "a reply"
time.sleep(2)
print(open("/proc/%s/status" % pid).read())
for s in socks:
    s.close()
PY
rss1=$(awk '/^VmRSS/ {print $2}' "$work/idle")
thr1=$(awk '/^Threads/ {print $2}' "$work/idle")
echo
echo "$idle idle clients (one GET each, then open): RSS ${rss0} kB -> ${rss1} kB" \
  "($(( (rss1 - rss0) * 1024 / idle )) bytes per client), threads $thr0 -> $thr1"
errors=$(grep -c -E ' (WARN|ERROR) ' "$work/proxy.log" || true)
echo "proxy log warnings/errors during the runs: $errors"
echo "runs with an error reply: $(grep -c 'per second' "$work/errors" 2>/dev/null || echo 0)"
