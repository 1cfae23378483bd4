#!/usr/bin/env bash
# What OpenTelemetry export costs with a dead collector: bench/otel.sh
#
# One TLS redis-server and three proxies in front of it (static credential),
# all on loopback: OTLP off; OTLP on with the collector's port closed
# (metrics every 1 s, the default 1 % of commands traced); OTLP on, dead
# collector, every command traced. `redis-benchmark -t get,set -n $N` runs
# through each, targets interleaved within each repetition, $REPS repetitions.
# Prints a Markdown table of the median requests/s per target and the ratio to
# "off"; copy it into bench/OTEL.md. Stops everything it started.
#
# Environment: N (default 100000), REPS (default 3), CLIENTS (default 50),
# PROXY_BIN (default target/release/redis-entra-proxy, built if absent).
# Ports 17380-17393.
set -euo pipefail
cd "$(dirname "$0")/.."
N="${N:-100000}"
REPS="${REPS:-3}"
CLIENTS="${CLIENTS:-50}"
work=.bench-otel
TLS_PORT=17380
DEAD_PORT=17389
PLAIN_PORT=0
export PLAIN_PORT
# redis_conf, start_proxy, wait_port, cleanup (trap on exit)
. scripts/local-stack.sh
trap 'exit 130' INT TERM
PROXY_BIN="${PROXY_BIN:-$target/release/redis-entra-proxy}"
[ -x "$PROXY_BIN" ] || cargo build --release --quiet --bin redis-entra-proxy
command -v redis-benchmark >/dev/null || scripts/install-deps.sh >/dev/null

rm -rf "$work"; mkdir -p "$work/tls"
# A throwaway CA and a server certificate for localhost.
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=otel-bench-ca \
  -keyout "$work/tls/ca.key" -out "$work/tls/ca.pem" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj /CN=localhost \
  -keyout "$work/tls/server.key" -out "$work/tls/server.csr" 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' > "$work/tls/ext"
openssl x509 -req -in "$work/tls/server.csr" -CA "$work/tls/ca.pem" -CAkey "$work/tls/ca.key" \
  -CAcreateserial -days 2 -extfile "$work/tls/ext" -out "$work/tls/server.pem" 2>/dev/null
pass="bench-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
redis_conf "$TLS_PORT" bench "$pass"
redis-server "$work/redis.conf" &
pids+=($!)
wait_port "$TLS_PORT"
if (exec 3<>/dev/tcp/127.0.0.1/"$DEAD_PORT") 2>/dev/null; then
  echo "port $DEAD_PORT is in use: the dead collector must be a closed port" >&2
  exit 1
fi

auth=(
  REDIS_ENTRA_PROXY_AUTH__SOURCE=static
  REDIS_ENTRA_PROXY_AUTH__USERNAME=bench
  REDIS_ENTRA_PROXY_AUTH__STATIC__PASSWORD="$pass"
  REDIS_ENTRA_PROXY_LOG__LEVEL=warn
)
dead=(
  REDIS_ENTRA_PROXY_OTEL__ENABLED=true
  REDIS_ENTRA_PROXY_OTEL__ENDPOINT="http://127.0.0.1:$DEAD_PORT"
  REDIS_ENTRA_PROXY_OTEL__METRICS_INTERVAL=1s
)
names=(off dead-1pct dead-all)
ports=(17381 17382 17383)
start_proxy 17381 17391 "$work/off.log" "${auth[@]}"
start_proxy 17382 17392 "$work/dead-1pct.log" "${auth[@]}" "${dead[@]}"
start_proxy 17383 17393 "$work/dead-all.log" "${auth[@]}" "${dead[@]}" \
  REDIS_ENTRA_PROXY_OTEL__TRACE_SAMPLE_RATIO=1

: > "$work/runs.csv"
for rep in $(seq 1 "$REPS"); do
  for i in 0 1 2; do
    # Rotate the order between repetitions.
    j=$(( (i + rep) % 3 ))
    redis-benchmark -h 127.0.0.1 -p "${ports[$j]}" -t get,set -n "$N" -c "$CLIENTS" --csv -q \
      | tr -d '"' | awk -F, -v t="${names[$j]}" -v r="$rep" 'NR>1 {print r","t","$1","$2}' \
      >> "$work/runs.csv"
  done
done
for name in "${names[@]}"; do
  grep -c "OpenTelemetry export of" "$work/$name.log" | sed "s/^/$name: export failure lines: /" || true
done

python3 - "$work/runs.csv" "$N" "$CLIENTS" "$REPS" <<'PY'
import csv, statistics, sys
runs = list(csv.reader(open(sys.argv[1])))
med = {}
for t in ("off", "dead-1pct", "dead-all"):
    for test in ("SET", "GET"):
        vals = [float(r[3]) for r in runs if r[1] == t and r[2] == test]
        med[(t, test)] = statistics.median(vals) if vals else float("nan")
print(f"N={sys.argv[2]}, {sys.argv[3]} clients, median of {sys.argv[4]} interleaved repetitions\n")
print("| target | SET req/s | GET req/s | SET vs off | GET vs off |")
print("|---|---|---|---|---|")
for t in ("off", "dead-1pct", "dead-all"):
    s, g = med[(t, "SET")], med[(t, "GET")]
    print(f"| {t} | {s:,.0f} | {g:,.0f} | {s / med[('off', 'SET')]:.2f} | {g / med[('off', 'GET')]:.2f} |")
PY
