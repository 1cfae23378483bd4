#!/usr/bin/env bash
# The benchmark, one command: bench/run.sh
#
# Installs what it needs from Debian (redis-server, redis-tools, haproxy,
# stunnel4), then starts on loopback: one redis-server with a TLS port and a
# plaintext port (the ceiling), the proxy (Entra tokens from the emulator,
# valid an hour: no rotation during a run), a second proxy whose tokens are
# valid 8 s (a rotation about every 5 s), haproxy and stunnel (TCP in, TLS out
# to the same server: what users would run instead). Every workload runs
# against each target, targets interleaved within each repetition and the
# order rotated between repetitions; the ratios are to direct TLS in the same
# repetition. Writes $OUT/results.csv (every run) and $OUT/results.md (medians),
# and stops everything it started, on success and on failure.
#
# Environment: REPS (default 3), N (base request count, default 100000),
# WORKLOADS (space-separated subset of: c50 p16 c1 k0 v1k v100k rot tx fanout
# idle; default all), OUT (default bench/results, committed), PROXY_BIN (another build of the
# proxy). Ports 16379-16395 (TLS_PORT, PLAIN_PORT, ... below).
set -euo pipefail
cd "$(dirname "$0")/.."
REPS="${REPS:-3}"
N="${N:-100000}"
WORKLOADS="${WORKLOADS:-c50 p16 c1 k0 v1k v100k rot tx fanout idle}"
OUT="${OUT:-bench/results}"
work=.bench-run
TLS_PORT="${TLS_PORT:-16380}"
PLAIN_PORT="${PLAIN_PORT:-16381}"
PROXY_PORT="${PROXY_PORT:-16379}"
ADMIN_PORT="${ADMIN_PORT:-16390}"
ROT_PORT="${ROT_PORT:-16384}"
ROT_ADMIN_PORT="${ROT_ADMIN_PORT:-16391}"
HAPROXY_PORT="${HAPROXY_PORT:-16382}"
STUNNEL_PORT="${STUNNEL_PORT:-16383}"
TOKEN_LIFETIME=3600
STACK_AUTH=entra
export PLAIN_PORT
# 10,000 idle clients: descriptors for the load generator and the proxies.
ulimit -n "$(ulimit -Hn)"
[ "$(ulimit -n)" = unlimited ] || [ "$(ulimit -n)" -ge 12000 ] || {
  echo "10,000 idle clients need 12000 open files; the hard limit is $(ulimit -Hn)" >&2
  exit 1
}
export REDIS_ENTRA_PROXY_LISTEN__MAX_CLIENTS=15000
# pids, cleanup (on exit), wait_port, admin_get, redis_conf, start_stack,
# start_emulator, start_proxy
. scripts/local-stack.sh
trap 'exit 130' INT TERM
want() { [[ " $WORKLOADS " == *" $1 "* ]]; }

need=()
command -v haproxy >/dev/null 2>&1 || need+=(haproxy)
command -v stunnel4 >/dev/null 2>&1 || need+=(stunnel4)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "installing: ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
cargo build --release --quiet --example bench_load
load="$target/release/examples/bench_load"

start_stack
main_pid=$proxy_pid
start_emulator bench-rot- 8 "$work/endpoint-rot" "$work/emulator-rot.log"
start_proxy "$ROT_PORT" "$ROT_ADMIN_PORT" "$work/proxy-rot.log" \
  REDIS_ENTRA_PROXY_AUTH__SOURCE=entra \
  REDIS_ENTRA_PROXY_AUTH__ENTRA__CREDENTIAL=managed-identity \
  REDIS_ENTRA_PROXY_AUTH__ENTRA__IMDS_ENDPOINT="$(cat "$work/endpoint-rot")"
rot_pid=$proxy_pid
wait_port "$PLAIN_PORT"

# haproxy and stunnel: plain TCP in, TLS out with the server's certificate
# verified against the test CA, as a user would set them up.
cat > "$work/haproxy.cfg" <<CFG
global
  maxconn 9000
defaults
  mode tcp
  timeout connect 5s
  timeout client 600s
  timeout server 600s
listen redis
  bind 127.0.0.1:$HAPROXY_PORT
  server r 127.0.0.1:$TLS_PORT ssl verify required ca-file $PWD/$work/tls/ca.pem sni str(localhost) verifyhost localhost
CFG
haproxy -f "$work/haproxy.cfg" -db > "$work/haproxy.log" 2>&1 &
pids+=($!)
cat > "$work/stunnel.conf" <<CFG
foreground = yes
pid =
[redis]
client = yes
accept = 127.0.0.1:$STUNNEL_PORT
connect = 127.0.0.1:$TLS_PORT
CAfile = $PWD/$work/tls/ca.pem
verifyChain = yes
checkHost = localhost
sni = localhost
CFG
stunnel4 "$work/stunnel.conf" > "$work/stunnel.log" 2>&1 &
pids+=($!)
wait_port "$HAPROXY_PORT"
wait_port "$STUNNEL_PORT"

# How each target is reached. The direct, plaintext, haproxy and stunnel
# targets log in as the server's admin user; the proxies need no password.
ca="$work/tls/ca.pem"
declare -A bench_args load_args
bench_args[plain]="-p $PLAIN_PORT --user admin -a $admin_pass"
bench_args[direct]="--tls --cacert $ca -p $TLS_PORT --user admin -a $admin_pass"
bench_args[proxy]="-p $PROXY_PORT"
bench_args[proxy_rot]="-p $ROT_PORT"
bench_args[haproxy]="-p $HAPROXY_PORT --user admin -a $admin_pass"
bench_args[stunnel]="-p $STUNNEL_PORT --user admin -a $admin_pass"
load_args[plain]="--addr 127.0.0.1:$PLAIN_PORT --user admin"
load_args[direct]="--addr 127.0.0.1:$TLS_PORT --tls $ca --user admin"
load_args[proxy]="--addr 127.0.0.1:$PROXY_PORT"
load_args[haproxy]="--addr 127.0.0.1:$HAPROXY_PORT --user admin"
load_args[stunnel]="--addr 127.0.0.1:$STUNNEL_PORT --user admin"
export BENCH_PASS="$admin_pass"

mkdir -p "$OUT"
csv="$OUT/results.csv"
echo "workload,args,target,rep,test,rps,p50_ms,p99_ms" > "$csv"
# Rotate the order of the targets by one at each repetition.
rotated() { # rep target...
  local r=$1; shift
  local a=("$@") n=$#
  for i in $(seq 0 $((n - 1))); do echo "${a[$(((i + r) % n))]}"; done
}
# redis-benchmark, one line per test: test,rps,p50,p99 (redis-benchmark 7's --csv).
bench() { # workload rep target args...
  local w=$1 rep=$2 t=$3; shift 3
  # shellcheck disable=SC2086
  redis-benchmark ${bench_args[$t]} "$@" --csv 2>/dev/null | tr -d '"' | awk -F, -v w="$w" -v a="$*" -v t="$t" -v r="$rep" \
    '$1 != "test" && NF >= 7 {printf "%s,\"%s\",%s,%s,%s,%s,%s,%s\n", w, a, t, r, $1, $2, $5, $7}' >> "$csv"
}
run_bench() { # workload targets-string args...
  local w=$1 targets=$2; shift 2
  echo "==> $w: redis-benchmark $* against: $targets"
  for rep in $(seq 1 "$REPS"); do
    # shellcheck disable=SC2086
    for t in $(rotated "$rep" $targets); do bench "$w" "$rep" "$t" "$@"; done
  done
}
metric() { # admin-port metric-name: the sum over its labels
  ADMIN_PORT=$1 admin_get /metrics | awk -v m="$2" 'index($0, m) == 1 && $1 !~ /_created/ {s += $NF} END {print s + 0}'
}
rss_kb() { awk '/VmRSS/ {print $2}' /proc/"$1"/status; }

all="plain direct proxy haproxy stunnel"
want c50 && run_bench c50 "$all" -c 50 -n "$N" -t set,get
want p16 && run_bench p16 "$all" -c 50 -P 16 -n $((N * 5)) -t set,get
want c1 && run_bench c1 "$all" -c 1 -n $((N / 5)) -t set,get
want k0 && run_bench k0 "$all" -c 10 -k 0 -n $((N / 25)) -t set,get
want v1k && run_bench v1k "$all" -c 50 -d 1024 -n "$N" -t set,get
want v100k && run_bench v100k "$all" -c 10 -d 102400 -n $((N / 20)) -t set,get
if want rot; then
  before=$(metric "$ROT_ADMIN_PORT" redis_entra_proxy_reauths_total)
  t0=$SECONDS
  run_bench rot "direct proxy proxy_rot" -c 50 -n $((N * 5)) -t set,get
  after=$(metric "$ROT_ADMIN_PORT" redis_entra_proxy_reauths_total)
  gens=$(grep -c 'issued token generation' "$work/emulator-rot.log" || true)
  echo "rotation proxy: $((after - before)) re-AUTHs in $((SECONDS - t0)) s ($gens token generations issued since start)" | tee "$OUT/rotation.txt"
fi
# Transactions alone, and transactions each followed by a plain GET, 8 clients.
loadrow() { # workload rep target test load-output
  local rate
  rate=$(sed -n "s/.*$4_per_s=\([0-9.]*\).*/\1/p" <<<"$5")
  echo "$1,bench_load,$3,$2,$4,$rate,," >> "$csv"
}
if want tx; then
  echo "==> tx, mixed: bench_load, 8 clients, 5 s each"
  for rep in $(seq 1 "$REPS"); do
    for t in $(rotated "$rep" plain direct proxy); do
      for mode in tx mixed; do
        # shellcheck disable=SC2086
        o=$("$load" "$mode" ${load_args[$t]} --clients 8 --seconds 5)
        echo "  $t $mode: $o"
        loadrow "$mode" "$rep" "$t" tx "$o"
      done
    done
  done
fi
if want fanout; then
  echo "==> fanout: 1 publisher, 1000 subscribers of one channel, 200 messages"
  for rep in $(seq 1 "$REPS"); do
    for t in $(rotated "$rep" direct proxy); do
      # shellcheck disable=SC2086
      o=$("$load" fanout ${load_args[$t]} --clients 1000 --max-ops 200 --seconds 60)
      echo "  $t: $o"
      loadrow fanout "$rep" "$t" deliveries "$o"
    done
  done
fi
if want idle; then
  # Mostly idle clients with a light load (a GET every 10 ms on one of them in
  # turn), through the main proxy: its RSS before, while they are connected,
  # and 5 s after they left, and its upstream connections meanwhile.
  idle_md="$OUT/idle.md"
  echo "| clients | RSS before | RSS with the clients | RSS 5 s after they left | upstream connections (with / after) | errors |" > "$idle_md"
  echo "|---|---|---|---|---|---|" >> "$idle_md"
  for clients in 1000 10000; do
    echo "==> idle: $clients clients through the proxy"
    r0=$(rss_kb "$main_pid")
    "$load" idle ${load_args[proxy]} --clients "$clients" --seconds 10 > "$work/idle.out" 2>&1 &
    lp=$!
    for _ in $(seq 1 1200); do grep -q '^ready' "$work/idle.out" && break; kill -0 "$lp" 2>/dev/null || break; sleep 0.1; done
    grep -q '^ready' "$work/idle.out" || { cat "$work/idle.out" >&2; exit 1; }
    sleep 5
    r1=$(rss_kb "$main_pid")
    u1=$(metric "$ADMIN_PORT" redis_entra_proxy_upstream_connections)
    wait "$lp"
    sleep 5
    r2=$(rss_kb "$main_pid")
    u2=$(metric "$ADMIN_PORT" redis_entra_proxy_upstream_connections)
    errs=$(sed -n 's/.*errors=\([0-9]*\).*/\1/p' "$work/idle.out")
    echo "| $clients | $((r0 / 1024)) MB | $((r1 / 1024)) MB | $((r2 / 1024)) MB | $u1 / $u2 | $errs |" | tee -a "$idle_md"
  done
fi
echo "proxy RSS at the end: $(($(rss_kb "$main_pid") / 1024)) MB" | tee "$OUT/rss.txt"
python3 bench/table.py "$csv" > "$OUT/results.md"
cat "$OUT/results.md"
