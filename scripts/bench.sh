#!/usr/bin/env bash
# Throughput through the proxy next to the same run straight against the TLS
# port, in one sitting on this machine (loopback only, bounded: -n requests).
# Usage: scripts/bench.sh [requests]   Prints a Markdown table; also RSS of the proxy.
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-100000}"
work=.bench
# Entra tokens from the emulator, long enough that no rotation lands in a run.
TOKEN_LIFETIME="${TOKEN_LIFETIME:-3600}"
. scripts/local-stack.sh
start_stack >/dev/null
direct=(--tls --cacert "$work/tls/ca.pem" -p "$TLS_PORT" --user admin -a "$admin_pass")
rps() { # prints "set get" requests per second
  redis-benchmark "$@" -n "$n" -t set,get -q 2>/dev/null | tr '\r' '\n' | awk '/requests per second/ {printf "%s ", $2} END {print ""}'
}
echo "| run | direct TLS SET | proxy SET | ratio | direct TLS GET | proxy GET | ratio |"
echo "|---|---|---|---|---|---|---|"
for args in "-c 50" "-c 50 -P 16" "-c 1" "-c 10 -k 0"; do
  # shellcheck disable=SC2086
  read -r dset dget < <(rps "${direct[@]}" $args)
  # shellcheck disable=SC2086
  read -r pset pget < <(rps -p "$PROXY_PORT" $args)
  awk -v a="$args" -v ds="$dset" -v ps="$pset" -v dg="$dget" -v pg="$pget" \
    'BEGIN { printf "| %s | %.0f | %.0f | %.2fx | %.0f | %.0f | %.2fx |\n", a, ds, ps, ps/ds, dg, pg, pg/dg }'
done
echo
echo "proxy RSS after the runs: $(awk '/VmRSS/ {print $2, $3}' /proc/"$proxy_pid"/status)"
