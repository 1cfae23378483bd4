#!/usr/bin/env bash
# Throughput through the proxy in front of a local six-node TLS Redis Cluster
# (scripts/local-cluster.sh) next to `redis-benchmark --cluster --tls` straight
# to the shards, in one sitting on this machine (loopback only, bounded: -n).
# Usage: scripts/bench-cluster.sh [requests]   Prints a Markdown table.
# Each run is repeated REPS times (default 3), direct and proxy alternating;
# the table shows medians of the figures and of the per-pair ratios.
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
errors=$(grep -c -E ' (WARN|ERROR) ' "$work/proxy.log" || true)
echo "proxy log warnings/errors during the runs: $errors"
echo "runs with an error reply: $(grep -c 'per second' "$work/errors" 2>/dev/null || echo 0)"
