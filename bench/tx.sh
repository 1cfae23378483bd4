#!/usr/bin/env bash
# Transactions at full speed: what pooled client libraries do, in a loop
# (`bench_load MODE`), from 1 and 8 clients, straight to a TLS redis-server
# and through the proxy (and through a second build of it, BEFORE_BIN, when
# given), the targets alternating within each repetition:
#
# - mixed: `MULTI; INCR; SET; EXEC` (one write), then a `GET`;
# - get: the `GET` alone (the plain path, to compare the ratios with);
# - watch: `WATCH k`, `GET k`, `MULTI; SET k; EXEC` (one write);
# - watch-mixed: the same, then a plain `GET`.
#
# For each proxy run, the new upstream TLS connections (the server's
# total_connections_received) and RESET commands (cmdstat_reset) it caused.
# Then, at one client, each build's system calls (strace -c -f) and context
# switches (/proc/<pid>/task/*/status) per command. Writes bench/TX.md.
#
# Environment: REPS (default 5), SECS (seconds per run, default 3), OPS
# (loops for the per-command counts, default 2000), MODES (default
# "mixed get watch watch-mixed"), PROXY_BIN (the build measured), BEFORE_BIN
# (a build to compare with), OUT (default bench/TX.md). Ports TX_TLS_PORT
# (16480), TX_PROXY_PORT (16479), TX_BEFORE_PORT (16478), admin ports
# TX_ADMIN_PORT (16477), TX_BEFORE_ADMIN_PORT (16476). Loopback only; every
# run bounded by SECS.
set -euo pipefail
cd "$(dirname "$0")/.."
REPS="${REPS:-5}"
SECS="${SECS:-3}"
OPS="${OPS:-2000}"
MODES="${MODES:-mixed get watch watch-mixed}"
OUT="${OUT:-bench/TX.md}"
work=.bench-tx
TLS_PORT="${TX_TLS_PORT:-16480}"
PROXY_PORT="${TX_PROXY_PORT:-16479}"
BEFORE_PORT="${TX_BEFORE_PORT:-16478}"
ADMIN_PORT="${TX_ADMIN_PORT:-16477}"
BEFORE_ADMIN_PORT="${TX_BEFORE_ADMIN_PORT:-16476}"
# pids, cleanup (on exit), wait_port, redis_conf, start_proxy
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
declare -A pid_of
start() { # name port admin-port binary
  PROXY_BIN="$4" start_proxy "$2" "$3" "$work/$1.log" \
    REDIS_ENTRA_PROXY_AUTH__SOURCE=static \
    REDIS_ENTRA_PROXY_AUTH__USERNAME=bench-identity \
    REDIS_ENTRA_PROXY_AUTH__STATIC__PASSWORD="$token"
  pid_of[$1]=$proxy_pid
}
targets=(direct proxy)
start proxy "$PROXY_PORT" "$ADMIN_PORT" "$bin"
if [ -n "${BEFORE_BIN:-}" ]; then
  start before "$BEFORE_PORT" "$BEFORE_ADMIN_PORT" "$BEFORE_BIN"
  targets=(direct before proxy)
fi
export BENCH_PASS="$token"
args() {
  case $1 in
    direct) echo "--addr 127.0.0.1:$TLS_PORT --tls $work/tls/ca.pem --user bench-identity" ;;
    proxy) echo "--addr 127.0.0.1:$PROXY_PORT" ;;
    before) echo "--addr 127.0.0.1:$BEFORE_PORT" ;;
  esac
}
# One INFO field of the server (each call is one more connection to it).
info() {
  REDISCLI_AUTH="$token" redis-cli --no-auth-warning --tls --cacert "$work/tls/ca.pem" \
    -p "$TLS_PORT" --user bench-identity INFO "$1" | tr -d '\r' |
    sed -n "s/^$2//p" | sed 's/,.*//'
}
rate() { sed -n 's/.*tx_per_s=\([0-9.]*\).*/\1/p'; }
count() { sed -n 's/.*transactions=\([0-9]*\).*/\1/p'; }
median() { sort -g | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }
ctxt() { # voluntary + involuntary context switches of every thread of pid $1
  cat /proc/"$1"/task/*/status 2>/dev/null |
    awk '/ctxt_switches/ {s += $2} END {print s + 0}'
}
rows=()
for mode in $MODES; do
  for c in 1 8; do
    rm -f "$work"/r_*
    for rep in $(seq 1 "$REPS"); do
      line="$mode clients $c rep $rep:"
      for t in "${targets[@]}"; do
        if [ "$t" != direct ]; then
          conns=$(info stats total_connections_received:)
          resets=$(info commandstats cmdstat_reset:calls=); resets=${resets:-0}
        fi
        # shellcheck disable=SC2046
        out=$("$load" "$mode" $(args "$t") --clients "$c" --seconds "$SECS")
        r=$(rate <<< "$out")
        echo "$r" >> "$work/r_$t"
        line+=" $t $r/s"
        if [ "$t" != direct ]; then
          n=$(count <<< "$out")
          # Less the two INFO connections made since the first figure.
          new=$(( $(info stats total_connections_received:) - conns - 2 ))
          rs=$(info commandstats cmdstat_reset:calls=); rs=$(( ${rs:-0} - resets ))
          awk -v r="$r" -v d="$(tail -1 "$work/r_direct")" 'BEGIN {print r / d}' >> "$work/r_q_$t"
          echo "$new" >> "$work/r_conn_$t"
          awk -v x="$rs" -v n="$n" 'BEGIN {print x / n}' >> "$work/r_reset_$t"
          line+=" (new conns $new, RESET $rs for $n loops)"
        fi
      done
      echo "$line"
    done
    row="| $mode | $c | $(median < "$work/r_direct")"
    for t in "${targets[@]:1}"; do
      row+=" | $(median < "$work/r_$t") | $(median < "$work/r_q_$t" | awk '{printf "%.2f", $1}')x"
      row+=" | $(median < "$work/r_conn_$t") | $(median < "$work/r_reset_$t" | awk '{printf "%.2f", $1}')"
    done
    rows+=("$row |")
  done
done
# Per command at one client, for each build. Commands per loop: mixed 5
# (MULTI INCR SET EXEC GET), get 1, watch 5 (WATCH GET MULTI SET EXEC),
# watch-mixed 6.
per_cmd=()
for mode in mixed watch-mixed; do
  case $mode in mixed) k=5 ;; watch-mixed) k=6 ;; esac
  cmds=$((OPS * k))
  for t in "${targets[@]:1}"; do
    pid=${pid_of[$t]}
    before=$(ctxt "$pid")
    # shellcheck disable=SC2046
    "$load" "$mode" $(args "$t") --clients 1 --max-ops "$OPS" --seconds 60 >/dev/null
    after=$(ctxt "$pid")
    ctx_per=$(awk -v a="$after" -v b="$before" -v n="$cmds" 'BEGIN {printf "%.2f", (a - b) / n}')
    sys_per="n/a (strace not installed)"
    if command -v strace >/dev/null; then
      strace -c -f -p "$pid" -o "$work/strace.txt" &
      strace_pid=$!
      sleep 1
      # shellcheck disable=SC2046
      "$load" "$mode" $(args "$t") --clients 1 --max-ops "$OPS" --seconds 60 >/dev/null
      kill -INT "$strace_pid"; wait "$strace_pid" 2>/dev/null || true
      calls=$(awk '$NF == "total" {print $4}' "$work/strace.txt")
      sys_per=$(awk -v c="$calls" -v n="$cmds" 'BEGIN {printf "%.2f", c / n}')
    fi
    rss=$(awk '/VmRSS/ {print $2}' /proc/"$pid"/status)
    per_cmd+=("| $mode | $t | $sys_per | $ctx_per | $((rss / 1024)) MB |")
  done
done
{
  echo "# Transactions from pooled clients (bench/tx.sh)"
  echo
  echo "Loops (\`bench_load MODE\`): \`mixed\` = \`MULTI; INCR; SET; EXEC\` in one write, then"
  echo "\`GET\`; \`get\` = the \`GET\` alone; \`watch\` = \`WATCH k\`, \`GET k\`, \`MULTI; SET k; EXEC\`"
  echo "in one write; \`watch-mixed\` = the same, then a plain \`GET\`. Each step waits for its"
  echo "replies. Targets alternate within each of $REPS repetitions of ${SECS} s; the"
  echo "ratio to direct TLS is the median of the per-repetition ratios; new conns: new"
  echo "upstream TLS connections per run (median), RESET/loop: RESET commands the server"
  echo "counted per loop. $(nproc) cores, $(date -u +%Y-%m-%d)."
  echo
  if [ "${#targets[@]}" -eq 3 ]; then
    echo "| loop | clients | direct TLS loops/s | before loops/s | before / direct | before new conns | before RESET/loop | proxy loops/s | proxy / direct | new conns | RESET/loop |"
    echo "|---|---|---|---|---|---|---|---|---|---|---|"
  else
    echo "| loop | clients | direct TLS loops/s | proxy loops/s | proxy / direct | new conns | RESET/loop |"
    echo "|---|---|---|---|---|---|---|"
  fi
  printf '%s\n' "${rows[@]}"
  echo
  echo "At 1 client, $OPS loops through each build (mixed: 5 commands a loop, watch-mixed: 6):"
  echo
  echo "| loop | build | system calls / command (strace -c -f) | context switches / command (all threads) | RSS after |"
  echo "|---|---|---|---|---|"
  printf '%s\n' "${per_cmd[@]}"
} > "$OUT"
cat "$OUT"
