#!/usr/bin/env bash
# Two (or more) proxy builds against one local TLS-only redis-server, in one
# sitting: every repetition runs direct, then each build, so all of them see
# the same machine load. Prints, per run, the median requests/s (SET and GET
# averaged) and the median of each build's per-repetition ratio to direct.
# Usage: scripts/bench-ab.sh BINARY... (e.g. a copy of an older build, then
#        target/release/redis-entra-proxy). REPS (default 9) repetitions.
# Ports: TLS_PORT (default 16380) and 16390, 16391, ... for the builds.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: $0 BINARY..." >&2; exit 64; }
reps="${REPS:-9}"
tls_port="${TLS_PORT:-16380}"
work=.bench-ab
# pids, cleanup (on exit), wait_port, redis_conf
. scripts/local-stack.sh
scripts/install-deps.sh >/dev/null
rm -rf "$work"; mkdir -p "$work"
cargo run --quiet --example testpki -- "$work/tls" >/dev/null
token="ab-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
redis_conf "$tls_port" bench-identity "$token"
redis-server "$work/redis.conf" &
pids+=($!)
wait_port "$tls_port"
ports=()
for i in $(seq 0 $(($# - 1))); do
  bin="${*:$((i + 1)):1}"
  port=$((16390 + i))
  REDIS_ENTRA_PROXY_UPSTREAM__HOST=localhost \
  REDIS_ENTRA_PROXY_UPSTREAM__PORT=$tls_port \
  REDIS_ENTRA_PROXY_UPSTREAM__CA_FILE="$work/tls/ca.pem" \
  REDIS_ENTRA_PROXY_AUTH__SOURCE=static \
  REDIS_ENTRA_PROXY_AUTH__USERNAME=bench-identity \
  REDIS_ENTRA_PROXY_AUTH__STATIC__PASSWORD="$token" \
  REDIS_ENTRA_PROXY_LISTEN__ADDRESS="127.0.0.1:$port" \
    "$bin" --config config/redis-entra-proxy.example.toml 2>"$work/proxy$i.log" &
  pids+=($!)
  wait_port "$port"
  ports+=("$port")
done
direct=(--tls --cacert "$work/tls/ca.pem" -p "$tls_port" --user bench-identity -a "$token")
rps() { # mean of the SET and GET requests per second
  redis-benchmark "$@" -t set,get -q 2>/dev/null | tr '\r' '\n' |
    awk '/requests per second/ {s += $2; k++} END {printf "%.0f\n", s / k}'
}
median() { sort -g | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }
# Fewer requests than scripts/bench.sh: many short alternating runs.
for spec in "-c 1@4000" "-c 50@20000" "-c 50 -P 16@100000" "-c 10 -k 0@2000"; do
  args=${spec%@*}
  n=${spec##*@}
  rm -f "$work"/r_*
  for _ in $(seq 1 "$reps"); do
    # shellcheck disable=SC2086
    d=$(rps "${direct[@]}" -n "$n" $args)
    echo "$d" >> "$work/r_direct"
    for j in "${!ports[@]}"; do
      # shellcheck disable=SC2086
      p=$(rps -p "${ports[$j]}" -n "$n" $args)
      echo "$p" >> "$work/r_p$j"
      awk -v p="$p" -v d="$d" 'BEGIN {print p / d}' >> "$work/r_q$j"
    done
  done
  line="$args: direct $(median < "$work/r_direct")/s"
  for j in "${!ports[@]}"; do
    line="$line | build $((j + 1)): $(median < "$work/r_p$j")/s, ratio $(median < "$work/r_q$j" | awk '{printf "%.2f", $1}')x"
  done
  echo "$line"
done
for j in "${!ports[@]}"; do
  echo "build $((j + 1)) RSS: $(awk '/VmRSS/ {print $2, $3}' /proc/"${pids[$((j + 1))]}"/status)"
done
