#!/usr/bin/env bash
# Quick start against a clustered cache, on this machine, no Azure needed:
#   1. six TLS-only redis-server nodes on 127.0.0.1:$CLUSTER_PORT.. +5 (three
#      primaries, three replicas; tls-cluster, tls-replication; no plaintext
#      port; default user off; the same ACL users on every node), made into a
#      Redis Cluster with `redis-cli --cluster create`, the way Azure Managed
#      Redis's OSS cluster policy presents one,
#   2. redis-entra-proxy on 127.0.0.1:$PROXY_PORT pointed at the first node
#      (upstream.cluster = auto finds out it is a cluster; certificates are
#      checked as `localhost` whatever address the topology names),
#   3. plain `redis-cli -p $PROXY_PORT` doing single-key, cross-slot and
#      whole-database commands as against one Redis, and which node holds what,
#   4. stops what it started. --keep leaves it running until Ctrl-C.
# Static ACL credentials here; scripts/cluster-phases.sh runs the token
# emulator instead (`start_cluster_nodes`, then `start_cluster_proxy` with the
# emulator's settings: it makes each token's user on every node).
# Sourced by scripts/bench-cluster.sh for `start_cluster`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
work="${work:-.local-cluster}"
CLUSTER_PORT="${CLUSTER_PORT:-7101}"
STACK_AUTH=static
TLS_PORT="$CLUSTER_PORT"
. scripts/local-stack.sh

node_cli() { # port args...
  local port=$1; shift
  REDISCLI_AUTH="$admin_pass" redis-cli --tls --cacert "$work/tls/ca.pem" -p "$port" --user admin "$@"
}

start_cluster() {
  start_cluster_nodes
  start_cluster_proxy REDIS_ENTRA_PROXY_AUTH__SOURCE=static \
    REDIS_ENTRA_PROXY_AUTH__USERNAME=quickstart-identity \
    REDIS_ENTRA_PROXY_AUTH__STATIC__PASSWORD="$static_pass"
}

# The six nodes, made a cluster and converged; each node's pid in
# $work/node-N/server.pid (kept current by whoever restarts one).
start_cluster_nodes() {
  scripts/install-deps.sh >/dev/null
  rm -rf "$work"; mkdir -p "$work"
  cargo build --release --quiet --bin redis-entra-proxy
  cargo build --quiet --example testpki
  "${CARGO_TARGET_DIR:-target}"/debug/examples/testpki "$work/tls" >/dev/null
  admin_pass="adm-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
  static_pass="qs-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
  nodes=()
  local i n p
  for i in 0 1 2 3 4 5; do
    local port=$((CLUSTER_PORT + i)) dir="$work/node-$i"
    for p in "$port" $((port + 10000)); do
      if (exec 3<>/dev/tcp/127.0.0.1/"$p") 2>/dev/null; then
        echo "port $p is already in use: set CLUSTER_PORT and run again" >&2
        exit 1
      fi
    done
    mkdir -p "$dir"
    cat > "$dir/redis.conf" <<CONF
port 0
tls-port $port
bind 127.0.0.1
tls-cert-file $PWD/$work/tls/server.pem
tls-key-file $PWD/$work/tls/server.key
tls-ca-cert-file $PWD/$work/tls/ca.pem
tls-auth-clients no
tls-cluster yes
tls-replication yes
cluster-enabled yes
cluster-config-file $PWD/$dir/nodes.conf
cluster-node-timeout 3000
save ""
appendonly no
dir $PWD/$dir
logfile $PWD/$dir/redis.log
maxclients 20000
masteruser admin
masterauth $admin_pass
CONF
    local users="user default off
user admin on >$admin_pass ~* &* +@all
user quickstart-identity on >$static_pass ~* &* +@all"
    if [ "${CLUSTER_ACLFILE:-0}" = 1 ]; then
      # Users in an ACL file, so that `ACL SAVE` keeps the ones made later
      # (token users) for a restart of the node.
      echo "aclfile $PWD/$dir/users.acl" >> "$dir/redis.conf"
      echo "$users" > "$dir/users.acl"
      chmod 600 "$dir/users.acl"
    else
      echo "$users" >> "$dir/redis.conf"
    fi
    chmod 600 "$dir/redis.conf"
    redis-server "$dir/redis.conf" &
    pids+=($!)
    echo $! > "$dir/server.pid"
    nodes+=("127.0.0.1:$port")
  done
  for n in "${nodes[@]}"; do wait_port "${n#*:}"; done
  echo "==> redis-cli --cluster create ${nodes[*]} --cluster-replicas 1"
  REDISCLI_AUTH="$admin_pass" redis-cli --tls --cacert "$work/tls/ca.pem" --user admin \
    --cluster create "${nodes[@]}" --cluster-replicas 1 --cluster-yes > "$work/create.log"
  # Converged: every node serves, and sees three primaries and three replicas
  # (a replica not yet configured shows as a primary without slots).
  for _ in $(seq 1 600); do
    local settled=true
    for n in "${nodes[@]}"; do
      local port=${n#*:}
      node_cli "$port" CLUSTER INFO | grep -q cluster_state:ok || settled=false
      [ "$(node_cli "$port" CLUSTER NODES | grep -c -E ' (myself,)?master ')" = 3 ] || settled=false
      [ "$(node_cli "$port" CLUSTER NODES | grep -c -E ' (myself,)?slave ')" = 3 ] || settled=false
    done
    $settled && break
    sleep 0.1
  done
}

# The proxy in front of the first node, the auth settings as VAR=value
# arguments; returns once it routes by hash slot.
start_cluster_proxy() { # auth-env...
  echo "==> starting redis-entra-proxy on 127.0.0.1:$PROXY_PORT (log: $work/proxy.log)"
  env "$@" \
    REDIS_ENTRA_PROXY_UPSTREAM__HOST=127.0.0.1 \
    REDIS_ENTRA_PROXY_UPSTREAM__SERVER_NAME=localhost \
    REDIS_ENTRA_PROXY_UPSTREAM__PORT="$CLUSTER_PORT" \
    REDIS_ENTRA_PROXY_UPSTREAM__CA_FILE="$work/tls/ca.pem" \
    REDIS_ENTRA_PROXY_LISTEN__ADDRESS="127.0.0.1:$PROXY_PORT" \
    REDIS_ENTRA_PROXY_ADMIN__ENABLED=true \
    REDIS_ENTRA_PROXY_ADMIN__ADDRESS="127.0.0.1:$ADMIN_PORT" \
    "${CARGO_TARGET_DIR:-target}"/release/redis-entra-proxy --config config/redis-entra-proxy.example.toml 2>"$work/proxy.log" &
  pids+=($!)
  proxy_pid=$!
  wait_port "$PROXY_PORT"
  for _ in $(seq 1 100); do
    grep -q "routing commands by hash slot" "$work/proxy.log" && return 0
    sleep 0.1
  done
  echo "the proxy did not find the cluster; see $work/proxy.log" >&2
  exit 1
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  keep=false
  [ "${1:-}" = "--keep" ] && keep=true
  echo "==> building and starting (first build takes a few minutes)"
  start_cluster
  echo "==> what the proxy found:"
  grep -E "upstream.cluster|cluster topology" "$work/proxy.log" | sed 's/^/    /'
  echo "==> plain redis-cli -p $PROXY_PORT, as against one Redis:"
  set -x
  redis-cli -p "$PROXY_PORT" SET user:1 alice
  redis-cli -p "$PROXY_PORT" SET user:2 bob
  redis-cli -p "$PROXY_PORT" MSET city:1 Paris city:2 Oslo city:3 Lima
  redis-cli -p "$PROXY_PORT" MGET user:1 user:2 city:1 city:2 city:3
  redis-cli -p "$PROXY_PORT" DBSIZE
  redis-cli -p "$PROXY_PORT" --scan
  redis-cli -p "$PROXY_PORT" SUNION user:1 city:1
  set +x
  echo "==> where the keys are (straight to each primary):"
  for i in 0 1 2 3 4 5; do
    port=$((CLUSTER_PORT + i))
    role=$(node_cli "$port" ROLE | head -1)
    [ "$role" = master ] || continue
    echo "    127.0.0.1:$port holds: $(node_cli "$port" KEYS '*' | sort | tr '\n' ' ')"
  done
  echo "==> keyspace notifications of every shard, to one plain subscriber (notify-keyspace-events on each node):"
  for i in 0 1 2 3 4 5; do node_cli $((CLUSTER_PORT + i)) CONFIG SET notify-keyspace-events 'E$' >/dev/null; done
  timeout 3 redis-cli -p "$PROXY_PORT" SUBSCRIBE '__keyevent@0__:set' > "$work/notifications" 2>&1 &
  sub=$!
  sleep 1
  redis-cli -p "$PROXY_PORT" SET user:1 alice2 >/dev/null
  redis-cli -p "$PROXY_PORT" SET city:2 Bergen >/dev/null
  redis-cli -p "$PROXY_PORT" SET city:3 Cusco >/dev/null
  wait "$sub" || true
  echo "    SET notified for: $(tail -n +4 "$work/notifications" | grep -v -e message -e __keyevent | tr '\n' ' ')"
  echo "==> redis-benchmark -r 100000 through the proxy (SET, GET, MSET of 10 keys over all shards):"
  redis-benchmark -p "$PROXY_PORT" -r 100000 -n 20000 -t set,get,mset -q 2>&1 | tr '\r' '\n' | grep 'per second'
  if $keep; then
    echo "==> running; redis-cli -p $PROXY_PORT; Ctrl-C stops everything"
    wait
  fi
fi
