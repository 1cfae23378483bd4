#!/usr/bin/env bash
# Throughput through the proxy next to the same run straight against the TLS
# port, in one sitting on this machine (loopback only, bounded: -n requests).
# Usage: scripts/bench.sh [requests]   Prints a Markdown table; also RSS of the proxy.
# Each run is repeated REPS times (default 3), direct and proxy alternating, and
# the table shows medians: of the direct and proxy figures, and of the ratios
# of each direct/proxy pair (the machine's load drifts between repetitions, so
# a ratio is only meaningful within its pair). TLS_PORT and PROXY_PORT move the
# stack off 6380/6379 (see scripts/local-stack.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-100000}"
reps="${REPS:-3}"
work=.bench
# Entra tokens from the emulator, long enough that no rotation lands in a run.
TOKEN_LIFETIME="${TOKEN_LIFETIME:-3600}"
. scripts/local-stack.sh
start_stack >/dev/null
direct=(--tls --cacert "$work/tls/ca.pem" -p "$TLS_PORT" --user admin -a "$admin_pass")
rps() { # prints "set get" requests per second
  redis-benchmark "$@" -n "$n" -t set,get -q 2>/dev/null | tr '\r' '\n' | awk '/requests per second/ {printf "%s ", $2} END {print ""}'
}
median() { sort -g | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }
echo "| run | direct TLS SET | proxy SET | ratio | direct TLS GET | proxy GET | ratio |"
echo "|---|---|---|---|---|---|---|"
for args in "-c 50" "-c 50 -P 16" "-c 1" "-c 10 -k 0"; do
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
