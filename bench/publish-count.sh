#!/usr/bin/env bash
# What making PUBLISH's count one Redis's costs (issue 17, finding 7): on a
# single endpoint a shared batch with a PUBLISH waits for the hub's figures
# before its replies go to the client. redis-benchmark pipelines `PUBLISH
# pc:ch m` and, for comparison, `ECHO m` (a command of the same size the proxy
# does not touch), through the proxy and straight to the same TLS
# redis-server, alternating within each repetition; one subscriber to pc:ch on
# each side (through the proxy there, so the hub holds it). The figure is
# PUBLISH/ECHO through the proxy against PUBLISH/ECHO direct. Writes
# bench/PUBLISH_COUNT.md.
#
# Environment: REPS (default 5), N (requests per run, default 100000), P
# (pipeline, default 16), C (clients, default 8), PROXY_BIN (another build),
# BEFORE_BIN (a build from before the change: a second proxy, measured in the
# same repetitions), OUT. Ports PC_TLS_PORT (16580), PC_PROXY_PORT (16579), admin
# ports PC_ADMIN_PORT (16589) and PC_BEFORE_ADMIN_PORT (16588),
# PC_BEFORE_PORT (16578). Loopback only; every run bounded by N requests.
set -euo pipefail
cd "$(dirname "$0")/.."
REPS="${REPS:-5}"
N="${N:-100000}"
P="${P:-16}"
C="${C:-8}"
OUT="${OUT:-bench/PUBLISH_COUNT.md}"
work=.bench-publish-count
TLS_PORT="${PC_TLS_PORT:-16580}"
PROXY_PORT="${PC_PROXY_PORT:-16579}"
# pids, cleanup (on exit), wait_port, redis_conf
. scripts/local-stack.sh
rm -rf "$work"; mkdir -p "$work"
cargo build --release --quiet --bin redis-entra-proxy --example testpki
"$target/release/examples/testpki" "$work/tls" >/dev/null
token="pc-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
redis_conf "$TLS_PORT" bench-identity "$token"
redis-server "$work/redis.conf" &
pids+=($!)
wait_port "$TLS_PORT"
static_auth=(REDIS_ENTRA_PROXY_AUTH__SOURCE=static REDIS_ENTRA_PROXY_AUTH__USERNAME=bench-identity
  REDIS_ENTRA_PROXY_AUTH__STATIC__PASSWORD="$token")
start_proxy "$PROXY_PORT" "${PC_ADMIN_PORT:-16589}" "$work/proxy.log" "${static_auth[@]}"
BEFORE_PORT="${PC_BEFORE_PORT:-16578}"
if [ -n "${BEFORE_BIN:-}" ]; then
  PROXY_BIN="$BEFORE_BIN" start_proxy "$BEFORE_PORT" "${PC_BEFORE_ADMIN_PORT:-16588}" \
    "$work/before.log" "${static_auth[@]}"
fi
export REDISCLI_AUTH="$token"
direct=(--tls --cacert "$work/tls/ca.pem" -p "$TLS_PORT" --user bench-identity)
proxy=(-p "$PROXY_PORT")
# One subscriber on each side, reading everything.
redis-cli "${proxy[@]}" SUBSCRIBE pc:ch >/dev/null &
pids+=($!)
redis-cli "${direct[@]}" SUBSCRIBE pc:ch >/dev/null &
pids+=($!)
if [ -n "${BEFORE_BIN:-}" ]; then
  redis-cli -p "$BEFORE_PORT" SUBSCRIBE pc:ch >/dev/null &
  pids+=($!)
fi
sleep 1
rps() { # direct|proxy command...
  local side=$1; shift
  local args=("${proxy[@]}")
  [ "$side" = direct ] && args=("${direct[@]}" -a "$token")
  [ "$side" = before ] && args=(-p "$BEFORE_PORT")
  redis-benchmark -q -n "$N" -P "$P" -c "$C" "${args[@]}" "$@" 2>/dev/null |
    tr '\r' '\n' | sed -n 's/.*: \([0-9.]*\) requests per second.*/\1/p' | tail -1
}
median() { sort -g | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }
for rep in $(seq 1 "$REPS"); do
  dp=$(rps direct PUBLISH pc:ch m)
  de=$(rps direct ECHO m)
  pp=$(rps proxy PUBLISH pc:ch m)
  pe=$(rps proxy ECHO m)
  if [ -n "${BEFORE_BIN:-}" ]; then
    bp=$(rps before PUBLISH pc:ch m)
    be=$(rps before ECHO m)
    echo "$bp" >> "$work/bp"; echo "$be" >> "$work/be"
    awk -v a="$pp" -v b="$pe" -v c="$bp" -v d="$be" 'BEGIN {print (a / b) / (c / d)}' >> "$work/qb"
  fi
  echo "rep $rep: direct PUBLISH $dp ECHO $de; proxy PUBLISH $pp ECHO $pe; before ${bp:-} ${be:-}"
  for v in dp de pp pe; do echo "${!v}" >> "$work/$v"; done
  awk -v a="$pp" -v b="$pe" -v c="$dp" -v d="$de" 'BEGIN {print (a / b) / (c / d)}' >> "$work/q"
done
{
  echo "# PUBLISH's count made one Redis's: its cost (bench/publish-count.sh)"
  echo
  echo "redis-benchmark -P $P -c $C -n $N, one subscriber of pc:ch per side; direct TLS and"
  echo "the proxy alternate within each of $REPS repetitions; medians. $(nproc) cores,"
  echo "load average $(cut -d' ' -f1 /proc/loadavg) at the end, $(date -u +%Y-%m-%d). Proxy: ${PROXY_BIN:-this build}."
  echo
  echo "| | PUBLISH req/s | ECHO req/s | PUBLISH / ECHO |"
  echo "|---|---|---|---|"
  sides="d p"; [ -n "${BEFORE_BIN:-}" ] && sides="d b p"
  for side in $sides; do
    pub=$(median < "$work/${side}p"); echo_=$(median < "$work/${side}e")
    case $side in d) name="direct TLS" ;; b) name="proxy before the change" ;; *) name="proxy" ;; esac
    echo "| $name | $pub | $echo_ | $(awk -v a="$pub" -v b="$echo_" 'BEGIN {printf "%.2f", a / b}') |"
  done
  echo
  echo "Proxy's PUBLISH/ECHO over direct's (median of the per-repetition ratios):"
  echo "$(median < "$work/q" | awk '{printf "%.2f", $1}')."
  if [ -n "${BEFORE_BIN:-}" ]; then
    echo
    echo "This build's PUBLISH/ECHO over the build before the change's:"
    echo "$(median < "$work/qb" | awk '{printf "%.2f", $1}')."
  fi
} > "$OUT"
cat "$OUT"
