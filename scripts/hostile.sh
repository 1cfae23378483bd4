#!/usr/bin/env bash
# Hostile and fault runs: malformed input, slowloris, 5,000 idle clients, 400
# unread pipelined GETs of a 1 MB value, a MONITOR client that never reads, the
# upstream paused (SIGSTOP) and killed then restarted, while one canary client
# runs a checked INCR/GET loop. Loopback only; every phase bounded in count and
# time (scripts/hostile.py). Writes bench/HOSTILE.md and bench/hostile.csv.
#
#   scripts/hostile.sh [runs]      # default 2, each on a fresh stack
#   ONLY=malformed,slowloris scripts/hostile.sh 1   # some phases only
#   EXTRA=0 scripts/hostile.sh    # without the comparison runs (32 MiB reply
#                                 # buffer; jemalloc preloaded, when installed)
#
# Not part of .ci/run: it takes a few minutes and measures, it does not assert.
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-2}"
work=.hostile
PROXY_PORT="${PROXY_PORT:-6579}"
TLS_PORT="${TLS_PORT:-6580}"
ADMIN_PORT="${ADMIN_PORT:-9290}"
STACK_AUTH=static
out_md="${OUT_MD:-bench/HOSTILE.md}"
out_csv="${OUT_CSV:-bench/hostile.csv}"
. scripts/local-stack.sh

# 5,000 client sockets in the driver and as many in the proxy (both inherit this).
need=12000
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt "$need" ]; then
  ulimit -n "$need" 2>/dev/null || ulimit -n "$(ulimit -Hn)"
fi
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt "$need" ]; then
  echo "ulimit -n is $(ulimit -n) (hard $(ulimit -Hn)): 5,000 idle clients need about $need" >&2
  exit 1
fi

# The driver restarts redis-server itself (upstream-kill-restart) and leaves the
# new pid here; stop that one too.
stop_all() {
  if [ -s "$work/redis.pid" ]; then
    local p; p="$(cat "$work/redis.pid")"
    kill "$p" 2>/dev/null || true
    # Not our child: wait for it by polling (it writes its log as it stops).
    for _ in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    rm -f "$work/redis.pid"
  fi
  cleanup
}
trap stop_all EXIT

tmp_csv="$(mktemp)"
# run_variant LABEL RUNS [VAR=value...]: RUNS runs, each on a fresh stack, with
# the variables set for the stack's processes (the proxy reads its REDIS_ENTRA_PROXY_*).
run_variant() {
  local label=$1 n=$2; shift 2
  for run in $(seq 1 "$n"); do
    echo "==> $label: run $run of $n" >&2
    pids=()
    for kv in "$@"; do export "${kv?}"; done
    start_stack >/dev/null
    for kv in "$@"; do unset "${kv%%=*}"; done
    python3 scripts/hostile.py run --port "$PROXY_PORT" --admin-port "$ADMIN_PORT" \
      --proxy-pid "$proxy_pid" --redis-pid "${pids[0]}" --redis-conf "$work/redis.conf" \
      --redis-pid-file "$work/redis.pid" --proxy-log "$work/proxy.log" \
      --variant "$label" --run "$run" --csv "$tmp_csv" --only "${ONLY:-}"
    if grep -q panicked "$work/proxy.log"; then
      mkdir -p "$work-logs"; cp "$work/proxy.log" "$work-logs/proxy-$run.log"
      echo "the proxy panicked ($label, run $run): see $work-logs/proxy-$run.log" >&2
    fi
    stop_all 2>/dev/null
  done
}

allocator="system (glibc malloc)"
grep -qE '^(tikv-)?jemallocator|^mimalloc' Cargo.toml && allocator="$(grep -oE '^(tikv-)?jemallocator|^mimalloc' Cargo.toml | head -1)"
run_variant "as built (allocator: $allocator; default limits)" "$runs"
if [ "${EXTRA:-1}" = 1 ]; then
  # Comparisons, one run each: what 32 MiB of buffered replies per client does
  # to the unread GETs, and what jemalloc does to the idle rounds.
  run_variant "limits.max_buffered_bytes = 32 MiB" 1 \
    REDIS_ENTRA_PROXY_LIMITS__MAX_BUFFERED_BYTES=33554432
  jemalloc=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2
  if [ -e "$jemalloc" ]; then
    run_variant "jemalloc 5.3 by LD_PRELOAD (comparison; redis-server preloaded too)" 1 LD_PRELOAD="$jemalloc"
  fi
fi

machine="$(mktemp)"
{
  echo "- CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(nproc) cores (shared with other work)"
  echo "- memory: $(awk '/MemTotal/ {printf "%.0f GB", $2/1048576}' /proc/meminfo); kernel $(uname -r)"
  echo "- $(redis-server --version | cut -d' ' -f1-3); $(rustc --version | cut -d' ' -f1-2); $(python3 --version)"
  echo "- proxy allocator: $allocator"
  echo "- ulimit -n for the driver and the proxy: $(ulimit -n)"
  echo "- date: $(date -u +%Y-%m-%d)"
} > "$machine"
mkdir -p "$(dirname "$out_md")"
cp "$tmp_csv" "$out_csv"
# The "## Findings" section is written by hand: kept across runs.
findings="$(mktemp)"
[ -e "$out_md" ] && awk '/^## Findings/ {f = 1} f' "$out_md" > "$findings"
python3 scripts/hostile.py report --csv "$out_csv" --machine "$machine" \
  --command "scripts/hostile.sh $runs" > "$out_md"
if [ -s "$findings" ]; then { echo; cat "$findings"; } >> "$out_md"; fi
rm -f "$tmp_csv" "$machine" "$findings"
echo "wrote $out_md and $out_csv" >&2
