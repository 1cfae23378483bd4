#!/usr/bin/env bash
# Soak: the proxy under steady load while Entra tokens rotate every few seconds,
# on this machine (loopback only, bounded in time). Reports client-visible
# errors, what the proxy counted (token refreshes, re-AUTHs, lost upstream
# connections, errors) and its resident memory over time, as Markdown.
#
#   scripts/soak.sh [seconds]     # default 300; tokens valid TOKEN_LIFETIME=8 s
#
# Load, all through the proxy: redis-benchmark runs back to back (-c 20, SET, GET,
# INCR, LPUSH, LPOP, pipelined -P 4 every other run), and one client connection
# doing INCR once a second for the whole run. Each expired token's ACL user is
# deleted, so a connection the proxy failed to re-AUTH would be closed by Redis.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-300}"
work=.soak
PROXY_PORT="${PROXY_PORT:-6479}"
TLS_PORT="${TLS_PORT:-6480}"
ADMIN_PORT="${ADMIN_PORT:-9190}"
TOKEN_LIFETIME="${TOKEN_LIFETIME:-8}"
STACK_AUTH=entra
. scripts/local-stack.sh
start_stack >/dev/null

rss() { awk '/VmRSS/ {print $2}' /proc/"$proxy_pid"/status; }
metric() { admin_get /metrics | awk -v m="$1" 'index($0, m) == 1 {s += $NF} END {print s + 0}'; }
end=$((SECONDS + secs))
# The long-lived connection: one INCR a second, its replies checked at the end.
redis-cli -p "$PROXY_PORT" DEL soak:tick >/dev/null
redis-cli -p "$PROXY_PORT" -r "$secs" -i 1 INCR soak:tick > "$work/tick.out" 2>&1 &
tick_pid=$!
samples=("| 0 s | $(rss) kB |")
runs=0 requests=0 bench_errors=0
next_sample=$((SECONDS + 30))
while [ $SECONDS -lt $end ]; do
  pipeline=1; [ $((runs % 2)) -eq 1 ] && pipeline=4
  # redis-benchmark stops at the first error reply or lost connection and
  # exits non-zero: a failed run counts as an error with its message kept.
  rc=0
  timeout 120 redis-benchmark -p "$PROXY_PORT" -c 20 -n 20000 -P "$pipeline" \
    -t set,get,incr,lpush,lpop -q > "$work/bench.out" 2>&1 || rc=$?
  runs=$((runs + 1))
  requests=$((requests + 5 * 20000))
  if [ "$rc" -ne 0 ] || tr '\r' '\n' < "$work/bench.out" | grep -qiE '^(ERR|error)|error:'; then
    bench_errors=$((bench_errors + 1))
    tr '\r' '\n' < "$work/bench.out" | tail -n 3 >> "$work/bench-errors.log"
  fi
  if [ $SECONDS -ge $next_sample ]; then
    samples+=("| $((secs - end + SECONDS)) s | $(rss) kB |")
    next_sample=$((SECONDS + 30))
  fi
done
wait "$tick_pid" || true
ticks_ok=$(grep -cE '^\(integer\) [0-9]+$|^[0-9]+$' "$work/tick.out" || true)
ticks_bad=$(grep -cvE '^\(integer\) [0-9]+$|^[0-9]+$' "$work/tick.out" || true)
samples+=("| $secs s (end) | $(rss) kB |")
generations=$(grep -c "issued token generation" "$work/emulator.log" || true)

echo "Soak: ${secs} s, tokens valid ${TOKEN_LIFETIME} s, each expired token's user deleted."
echo
echo "| what | count |"
echo "|---|---|"
echo "| token generations issued | $generations |"
echo "| redis-benchmark runs / requests | $runs / $requests |"
echo "| redis-benchmark runs that failed | $bench_errors |"
echo "| long-lived connection: INCR replies ok / not ok | $ticks_ok / $ticks_bad |"
echo "| token refreshes ok / failed | $(metric 'redis_entra_proxy_token_refreshes_total{outcome="ok"') / $(metric 'redis_entra_proxy_token_refreshes_total{outcome="failed"') |"
echo "| re-AUTHs ok / failed | $(metric 'redis_entra_proxy_reauths_total{outcome="ok"}') / $(metric 'redis_entra_proxy_reauths_total{outcome="failed"}') |"
echo "| upstream connections lost with commands in flight | $(metric 'redis_entra_proxy_errors_total{kind="upstream_lost"}') |"
echo "| upstream reconnects | $(metric 'redis_entra_proxy_upstream_reconnects_total') |"
echo "| errors_total (all kinds) | $(metric 'redis_entra_proxy_errors_total') |"
echo
echo "Proxy resident memory:"
echo
echo "| time | RSS |"
echo "|---|---|"
printf '%s\n' "${samples[@]}"
