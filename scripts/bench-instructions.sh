#!/usr/bin/env bash
# Instructions per command, a cost that does not depend on the machine's load:
# the proxy and haproxy (TCP in, TLS out) each run under
# `valgrind --tool=callgrind` in front of one TLS redis-server on loopback;
# counters are zeroed after a warm-up, redis-benchmark runs a fixed number of
# SET and GET, and the user-space instructions the forwarder executed are
# divided by the commands sent. Kernel time (syscalls) is not counted.
# Usage: scripts/bench-instructions.sh     (perf stat would do the same, but
# `perf stat -e instructions` is not supported on this VM.)
# Prints a Markdown table; leaves the callgrind files in .bench-instr/ for
# `callgrind_annotate`.
set -euo pipefail
cd "$(dirname "$0")/.."
work=.bench-instr
TLS_PORT="${TLS_PORT:-16480}"
PROXY_PORT="${PROXY_PORT:-16479}"
ADMIN_PORT="${ADMIN_PORT:-16490}"
HAPROXY_PORT="${HAPROXY_PORT:-16482}"
# Valgrind makes start-up slow: give the proxy a minute to become ready.
READY_TRIES=600
# pids, cleanup (on exit), wait_port, redis_conf, start_proxy, $target
. scripts/local-stack.sh
trap 'exit 130' INT TERM
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }
command -v haproxy >/dev/null || { echo "needs haproxy (bench/run.sh installs it)" >&2; exit 1; }
scripts/install-deps.sh >/dev/null
cargo build --release --quiet --bin redis-entra-proxy
cargo build --quiet --example testpki
rm -rf "$work"; mkdir -p "$work"
"$target/debug/examples/testpki" "$work/tls" >/dev/null
pass="in-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
redis_conf "$TLS_PORT" admin "$pass"
redis-server "$work/redis.conf" &
pids+=($!)
wait_port "$TLS_PORT"

bin="$(cd "$target/release" && pwd)/redis-entra-proxy"
cat > "$work/vg-proxy" <<SH
#!/bin/sh
exec valgrind --tool=callgrind --callgrind-out-file=$PWD/$work/proxy.%p.cg $bin "\$@"
SH
chmod +x "$work/vg-proxy"
PROXY_BIN="$work/vg-proxy" start_proxy "$PROXY_PORT" "$ADMIN_PORT" "$work/proxy.log" \
  REDIS_ENTRA_PROXY_AUTH__SOURCE=static REDIS_ENTRA_PROXY_AUTH__USERNAME=admin \
  REDIS_ENTRA_PROXY_AUTH__STATIC__PASSWORD="$pass"
vg_proxy=$proxy_pid
cat > "$work/haproxy.cfg" <<CFG
global
  maxconn 1000
defaults
  mode tcp
  timeout connect 5s
  timeout client 600s
  timeout server 600s
listen redis
  bind 127.0.0.1:$HAPROXY_PORT
  server r 127.0.0.1:$TLS_PORT ssl verify required ca-file $PWD/$work/tls/ca.pem sni str(localhost) verifyhost localhost
CFG
valgrind --tool=callgrind --callgrind-out-file="$PWD/$work/haproxy.%p.cg" haproxy -f "$work/haproxy.cfg" -db > "$work/haproxy.log" 2>&1 &
pids+=($!)
vg_haproxy=$!
for _ in $(seq 1 600); do (exec 3<>/dev/tcp/127.0.0.1/"$HAPROXY_PORT") 2>/dev/null && break; sleep 0.1; done

declare -A args
args[proxy]="-p $PROXY_PORT"
args[haproxy]="-p $HAPROXY_PORT --user admin -a $pass"
# Instructions executed by process $1 while redis-benchmark runs $2 commands.
measure() { # pid benchmark-args...
  local pid=$1; shift
  callgrind_control -z "$pid" >/dev/null
  # shellcheck disable=SC2068
  redis-benchmark $@ -q >/dev/null 2>&1
  local before
  before=$(find "$work" -name "*.$pid.cg.*" | wc -l)
  callgrind_control -d "$pid" >/dev/null
  # The dump just made: the newest numbered file of that process, once written.
  local f ir=""
  for _ in $(seq 1 300); do
    if [ "$(find "$work" -name "*.$pid.cg.*" | wc -l)" -gt "$before" ]; then
      f=$(find "$work" -name "*.$pid.cg.*" -printf '%T@ %p\n' | sort -n | tail -1 | cut -d' ' -f2)
      ir=$(awk '/^(summary|totals):/ {print $2; exit}' "$f")
      [ -n "$ir" ] && break
    fi
    sleep 0.1
  done
  echo "${ir:?no callgrind dump from $pid}"
}
echo "| workload | commands | proxy instructions/command | haproxy instructions/command | proxy / haproxy |"
echo "|---|---|---|---|---|"
for spec in "-c 1@2000" "-c 50 -P 16@50000"; do
  wl=${spec%@*}
  n=${spec##*@}
  cmds=$((n * 2)) # SET and GET
  declare -A per
  for t in proxy haproxy; do
    pid=$vg_proxy
    [ "$t" = haproxy ] && pid=$vg_haproxy
    # shellcheck disable=SC2086
    redis-benchmark ${args[$t]} $wl -n 500 -t set,get -q >/dev/null 2>&1 # warm-up
    # shellcheck disable=SC2086
    ir=$(measure "$pid" ${args[$t]} $wl -n "$n" -t set,get)
    per[$t]=$((ir / cmds))
  done
  awk -v w="$wl" -v c="$cmds" -v p="${per[proxy]}" -v h="${per[haproxy]}" \
    'BEGIN {printf "| %s | %d | %d | %d | %.2fx |\n", w, c, p, h, p / h}'
done
