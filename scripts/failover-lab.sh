#!/usr/bin/env bash
# An Azure-style failover by hand: a primary and a replica TLS redis-server
# (the replica `replicaof` the primary over TLS), the failover front of the
# tests (examples/failover_front.rs) standing in for the cache's endpoint, and
# redis-entra-proxy in front of that. A redis-cli client runs an INCR loop
# through the proxy the whole time and counts what it sees.
#
#   scripts/failover-lab.sh [planned|planned-quiet|unplanned|blip]
#
# planned        AzureRedisEvents NodeMaintenanceStarting $STARTING_AHEAD s
#                ahead and NodeMaintenanceStart $START_AHEAD s ahead, then the
#                front closes every connection and refuses new ones for $GAP s,
#                the replica is promoted (REPLICAOF NO ONE, the old primary
#                replicates from it), and NodeMaintenanceFailoverComplete and
#                NodeMaintenanceEnded follow (Azure: ~20 s, <5 s, 9-10 s: the
#                defaults below).
# planned-quiet  the same steps without the notices (Azure Managed Redis today).
# unplanned      kill -9 of the primary; the replica promoted $GAP s later.
# blip           the front closes everything and refuses for $GAP s, then the
#                same server again.
#
# AZURE_EVENTS=off runs the proxy without following the notices.
# Ports (loopback): proxy $PROXY_PORT, admin $ADMIN_PORT, front $FRONT_PORT,
# servers $PRIMARY_PORT and $REPLICA_PORT. Everything stops on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
scenario="${1:-planned}"
STARTING_AHEAD="${STARTING_AHEAD:-20}"
START_AHEAD="${START_AHEAD:-5}"
GAP="${GAP:-10}"
AFTER="${AFTER:-5}"
work="${work:-.failover-lab}"
PROXY_PORT="${PROXY_PORT:-16379}"
ADMIN_PORT="${ADMIN_PORT:-19090}"
FRONT_PORT="${FRONT_PORT:-16380}"
PRIMARY_PORT="${PRIMARY_PORT:-16381}"
REPLICA_PORT="${REPLICA_PORT:-16382}"
case "$scenario" in
  planned|planned-quiet|unplanned|blip) ;;
  *) echo "usage: $0 [planned|planned-quiet|unplanned|blip]" >&2; exit 64 ;;
esac
# The proxy goes to the front, which local-stack.sh calls the TLS port.
TLS_PORT="$FRONT_PORT"
# shellcheck source=local-stack.sh
source scripts/local-stack.sh
PROXY_BIN="${PROXY_BIN:-$target/debug/redis-entra-proxy}"

scripts/install-deps.sh >/dev/null
rm -rf "$work"; mkdir -p "$work"
cargo build --quiet --bin redis-entra-proxy --example testpki --example failover_front
"$target/debug/examples/testpki" "$work/tls" >/dev/null
for port in "$PROXY_PORT" "$ADMIN_PORT" "$FRONT_PORT" "$PRIMARY_PORT" "$REPLICA_PORT"; do
  if (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null; then
    echo "port $port is already in use: stop it or set the *_PORT variables" >&2
    exit 1
  fi
done
admin_pass="adm-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
lab_pass="lab-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"

server_conf() { # name port [replicaof-port]
  cat > "$work/$1.conf" <<CONF
port 0
tls-port $2
bind 127.0.0.1
tls-cert-file $PWD/$work/tls/server.pem
tls-key-file $PWD/$work/tls/server.key
tls-ca-cert-file $PWD/$work/tls/ca.pem
tls-auth-clients no
tls-replication yes
masteruser admin
masterauth $admin_pass
save ""
appendonly no
dir $PWD/$work
logfile $PWD/$work/$1.log
user default off
user admin on >$admin_pass ~* &* +@all
user lab-identity on >$lab_pass ~* &* +@all
CONF
  [ -z "${3:-}" ] || echo "replicaof 127.0.0.1 $3" >> "$work/$1.conf"
  chmod 600 "$work/$1.conf"
}
cli() { # port args...
  local port=$1; shift
  REDISCLI_AUTH="$admin_pass" redis-cli --tls --cacert "$work/tls/ca.pem" -p "$port" --user admin "$@"
}
notice() { # type seconds-ahead
  local at
  at=$(date -u -d "@$(( $(date +%s) + $2 ))" +%Y-%m-%dT%H:%M:%S)
  cli "$primary" PUBLISH AzureRedisEvents \
    "NotificationType|$1|StartTimeInUTC|$at|IsReplica|False|IPAddress|127.0.0.1|SSLPort|$FRONT_PORT|NonSSLPort|6379" >/dev/null
  echo "    published $1"
}
front() { echo "$*" >&7; sleep 0.1; }
synced() {
  local p r
  for _ in $(seq 1 200); do
    p=$(cli "$primary" INFO replication | tr -d '\r' | sed -n 's/^master_repl_offset://p')
    r=$(cli "$replica" INFO replication | tr -d '\r' | sed -n 's/^slave_repl_offset://p')
    [ -n "$p" ] && [ "$p" = "$r" ] && return 0
    sleep 0.05
  done
  echo "    the replica did not catch up (primary $p, replica $r)" >&2
}
promote() { # old-alive
  cli "$replica" REPLICAOF NO ONE >/dev/null
  [ "$1" = yes ] && cli "$primary" REPLICAOF 127.0.0.1 "$replica" >/dev/null
  local old=$primary; primary=$replica; replica=$old
  front route "$primary"
  echo "    promoted 127.0.0.1:$primary"
}

server_conf primary "$PRIMARY_PORT"
server_conf replica "$REPLICA_PORT" "$PRIMARY_PORT"
redis-server "$work/primary.conf" & pids+=($!); primary_pid=$!
wait_port "$PRIMARY_PORT"
redis-server "$work/replica.conf" & pids+=($!)
wait_port "$REPLICA_PORT"
primary=$PRIMARY_PORT replica=$REPLICA_PORT
mkfifo "$work/front.in"
"$target/debug/examples/failover_front" --port "$FRONT_PORT" --target "$primary" \
  < "$work/front.in" > "$work/front.log" 2>&1 & pids+=($!)
exec 7> "$work/front.in"
wait_port "$FRONT_PORT"
synced
echo "==> proxy on 127.0.0.1:$PROXY_PORT -> front 127.0.0.1:$FRONT_PORT -> primary $primary, replica $replica"
# The host is localhost, not an Azure name: follow AzureRedisEvents explicitly.
start_proxy "$PROXY_PORT" "$ADMIN_PORT" "$work/proxy.log" \
  REDIS_ENTRA_PROXY_UPSTREAM__AZURE_EVENTS="${AZURE_EVENTS:-on}" \
  REDIS_ENTRA_PROXY_AUTH__SOURCE=static REDIS_ENTRA_PROXY_AUTH__USERNAME=lab-identity \
  REDIS_ENTRA_PROXY_AUTH__STATIC__PASSWORD="$lab_pass"

# The client: INCR through the proxy every 20 ms; one line per reply.
( end=$(( $(date +%s) + STARTING_AHEAD + GAP + AFTER + 30 ))
  while [ "$(date +%s)" -lt "$end" ] && [ ! -e "$work/stop" ]; do
    s=$(date +%s%N)
    r=$(redis-cli -p "$PROXY_PORT" INCR lab:counter 2>&1 | tr '\n' ' ')
    echo "$(( ($(date +%s%N) - s) / 1000000 )) $r"
    sleep 0.02
  done > "$work/client.log" ) & pids+=($!); client_pid=$!
sleep 2

echo "==> $scenario"
case "$scenario" in
  planned|planned-quiet)
    [ "$scenario" = planned ] && notice NodeMaintenanceStarting "$STARTING_AHEAD"
    sleep $(( STARTING_AHEAD - START_AHEAD ))
    [ "$scenario" = planned ] && notice NodeMaintenanceStart "$START_AHEAD"
    sleep "$START_AHEAD"
    front refuse; front close; echo "    front: every connection closed, new ones refused"
    synced; promote yes
    sleep "$GAP"; front accept; echo "    front: accepting again (to $primary)"
    if [ "$scenario" = planned ]; then
      sleep 1 # Azure publishes these once the endpoint reaches the new primary
      notice NodeMaintenanceFailoverComplete 0
      notice NodeMaintenanceEnded 0
    fi ;;
  unplanned)
    kill -9 "$primary_pid"; echo "    kill -9 of the primary"
    sleep "$GAP"; promote no ;;
  blip)
    front refuse; front close; echo "    front: every connection closed, new ones refused"
    sleep "$GAP"; front accept; echo "    front: accepting again" ;;
esac
sleep "$AFTER"
touch "$work/stop"; wait "$client_pid" 2>/dev/null || true

total=$(wc -l < "$work/client.log")
errors=$(grep -c -v '^[0-9]* [0-9]' "$work/client.log" || true)
stall=$(sort -n "$work/client.log" | tail -1 | cut -d' ' -f1)
echo "==> client: $total INCRs, $errors errors, longest call ${stall} ms; counter now $(cli "$primary" GET lab:counter)"
grep -v '^[0-9]* [0-9]' "$work/client.log" | cut -d' ' -f2- | sort | uniq -c | head -5 || true
echo "==> the proxy's hold and maintenance metrics:"
admin_get /metrics | grep -E '^redis_entra_proxy_(upstream_held|upstream_hold_(seconds_(sum|count)|dropped)|maintenance|upstream_resent)' || echo "    (none)"
