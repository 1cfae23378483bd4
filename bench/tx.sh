#!/usr/bin/env bash
# Transactions at full speed: what a pooled client library does, one
# `MULTI; INCR; SET; EXEC` (one write) then a `GET`, in a loop
# (`bench_load mixed`), from 1 and 8 clients, through the proxy and straight
# to the same TLS redis-server, alternating within each repetition. Then, at
# one client, the proxy's system calls (strace -c -f) and context switches
# (/proc/<pid>/task/*/status) per command. Writes bench/TX.md.
#
# Environment: REPS (default 5), SECS (seconds per run, default 3), OPS
# (transactions for the syscall count, default 2000), PROXY_BIN (another
# build), OUT (default bench/TX.md). Ports TX_TLS_PORT (16480) and
# TX_PROXY_PORT (16479). Loopback only; every run bounded by SECS.
set -euo pipefail
cd "$(dirname "$0")/.."
REPS="${REPS:-5}"
SECS="${SECS:-3}"
OPS="${OPS:-2000}"
OUT="${OUT:-bench/TX.md}"
work=.bench-tx
TLS_PORT="${TX_TLS_PORT:-16480}"
PROXY_PORT="${TX_PROXY_PORT:-16479}"
# pids, cleanup (on exit), wait_port, redis_conf
. scripts/local-stack.sh
rm -rf "$work"; mkdir -p "$work"
cargo build --release --quiet --bin redis-entra-proxy --example bench_load --example testpki
bin="${PROXY_BIN:-$target/release/redis-entra-proxy}"
load="$target/release/examples/bench_load"
"$target/release/examples/testpki" "$work/tls" >/dev/null
token="tx-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
redis_conf "$TLS_PORT" bench-identity "$token"
redis-server "$work/redis.conf" &
pids+=($!)
wait_port "$TLS_PORT"
REDIS_ENTRA_PROXY_UPSTREAM__HOST=localhost \
REDIS_ENTRA_PROXY_UPSTREAM__PORT=$TLS_PORT \
REDIS_ENTRA_PROXY_UPSTREAM__CA_FILE="$work/tls/ca.pem" \
REDIS_ENTRA_PROXY_AUTH__SOURCE=static \
REDIS_ENTRA_PROXY_AUTH__USERNAME=bench-identity \
REDIS_ENTRA_PROXY_AUTH__STATIC__PASSWORD="$token" \
REDIS_ENTRA_PROXY_LISTEN__ADDRESS="127.0.0.1:$PROXY_PORT" \
  "$bin" --config config/redis-entra-proxy.example.toml 2>"$work/proxy.log" &
proxy_pid=$!
pids+=("$proxy_pid")
wait_port "$PROXY_PORT"
export BENCH_PASS="$token"
direct=(--addr "127.0.0.1:$TLS_PORT" --tls "$work/tls/ca.pem" --user bench-identity)
proxy=(--addr "127.0.0.1:$PROXY_PORT")
rate() { sed -n 's/.*tx_per_s=\([0-9.]*\).*/\1/p'; }
median() { sort -g | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }
ctxt() { # voluntary + involuntary context switches of every proxy thread
  cat /proc/"$proxy_pid"/task/*/status 2>/dev/null |
    awk '/ctxt_switches/ {s += $2} END {print s + 0}'
}
rows=()
for c in 1 8; do
  rm -f "$work"/r_*
  for rep in $(seq 1 "$REPS"); do
    d=$("$load" mixed "${direct[@]}" --clients "$c" --seconds "$SECS" | rate)
    p=$("$load" mixed "${proxy[@]}" --clients "$c" --seconds "$SECS" | rate)
    echo "clients $c rep $rep: direct $d/s proxy $p/s"
    echo "$d" >> "$work/r_d"; echo "$p" >> "$work/r_p"
    awk -v p="$p" -v d="$d" 'BEGIN {print p / d}' >> "$work/r_q"
  done
  rows+=("| $c | $(median < "$work/r_d") | $(median < "$work/r_p") | $(median < "$work/r_q" | awk '{printf "%.2f", $1}')x |")
done
# Per command at one client: 5 commands per loop (MULTI, INCR, SET, EXEC, GET).
cmds=$((OPS * 5))
before=$(ctxt)
"$load" mixed "${proxy[@]}" --clients 1 --max-ops "$OPS" --seconds 60 >/dev/null
after=$(ctxt)
ctx_per=$(awk -v a="$after" -v b="$before" -v n="$cmds" 'BEGIN {printf "%.2f", (a - b) / n}')
sys_per="n/a (strace not installed)"
if command -v strace >/dev/null; then
  strace -c -f -p "$proxy_pid" -o "$work/strace.txt" &
  strace_pid=$!
  sleep 1
  "$load" mixed "${proxy[@]}" --clients 1 --max-ops "$OPS" --seconds 60 >/dev/null
  kill -INT "$strace_pid"; wait "$strace_pid" 2>/dev/null || true
  calls=$(awk '$NF == "total" {print $4}' "$work/strace.txt")
  sys_per=$(awk -v c="$calls" -v n="$cmds" 'BEGIN {printf "%.2f", c / n}')
fi
rss=$(awk '/VmRSS/ {print $2}' /proc/"$proxy_pid"/status)
{
  echo "# Mixed transactions + GET (bench/tx.sh)"
  echo
  echo "Each loop: \`MULTI; INCR; SET; EXEC\` in one write, then \`GET\` (bench_load mixed)."
  echo "Direct TLS and the proxy alternate within each of $REPS repetitions of ${SECS} s;"
  echo "the ratio is the median of the per-repetition ratios. $(nproc) cores, $(date -u +%Y-%m-%d)."
  echo
  echo "| clients | direct TLS tx/s | proxy tx/s | proxy / direct |"
  echo "|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
  echo
  echo "At 1 client, $OPS loops ($cmds commands) through the proxy:"
  echo
  echo "- system calls per command (strace -c -f): $sys_per"
  echo "- context switches per command (all proxy threads): $ctx_per"
  echo "- proxy RSS at the end: $((rss / 1024)) MB"
} > "$OUT"
cat "$OUT"
