# Sourced by quickstart.sh and bench.sh: a local TLS-only redis-server with one
# ACL user standing in for the Entra identity, and redis-entra-proxy in front of
# it on 127.0.0.1:6379. Sets $work, $TLS_PORT, $token; `cleanup` stops both.
set -euo pipefail
work="${work:-.quickstart}"
TLS_PORT="${TLS_PORT:-6380}"
PROXY_PORT="${PROXY_PORT:-6379}"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

wait_port() {
  for _ in $(seq 1 200); do
    (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on 127.0.0.1:$1" >&2
  return 1
}

start_stack() {
  scripts/install-deps.sh >/dev/null
  rm -rf "$work"; mkdir -p "$work"
  cargo build --release --quiet --bin redis-entra-proxy
  cargo run --quiet --example testpki -- "$work/tls" >/dev/null
  if (exec 3<>/dev/tcp/127.0.0.1/"$PROXY_PORT") 2>/dev/null; then
    echo "port $PROXY_PORT is already in use (a local redis?): stop it and run again" >&2
    exit 1
  fi
  # A throwaway password for the local stand-in identity, never printed.
  token="qs-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
  cat > "$work/redis.conf" <<CONF
port 0
tls-port $TLS_PORT
bind 127.0.0.1
tls-cert-file $PWD/$work/tls/server.pem
tls-key-file $PWD/$work/tls/server.key
tls-ca-cert-file $PWD/$work/tls/ca.pem
tls-auth-clients no
save ""
appendonly no
dir $PWD/$work
logfile $PWD/$work/redis.log
maxclients 20000
user default off
user quickstart-identity on >$token ~* &* +@all
CONF
  chmod 600 "$work/redis.conf"
  echo "==> starting redis-server with TLS only on 127.0.0.1:$TLS_PORT"
  redis-server "$work/redis.conf" &
  pids+=($!)
  wait_port "$TLS_PORT"
  echo "==> starting redis-entra-proxy on 127.0.0.1:$PROXY_PORT (log: $work/proxy.log)"
  REDIS_ENTRA_PROXY_UPSTREAM__HOST=localhost \
  REDIS_ENTRA_PROXY_UPSTREAM__PORT=$TLS_PORT \
  REDIS_ENTRA_PROXY_UPSTREAM__CA_FILE="$work/tls/ca.pem" \
  REDIS_ENTRA_PROXY_AUTH__SOURCE=static \
  REDIS_ENTRA_PROXY_AUTH__USERNAME=quickstart-identity \
  REDIS_ENTRA_PROXY_AUTH__STATIC__PASSWORD="$token" \
  REDIS_ENTRA_PROXY_LISTEN__ADDRESS="127.0.0.1:$PROXY_PORT" \
    target/release/redis-entra-proxy --config config/redis-entra-proxy.example.toml 2>"$work/proxy.log" &
  pids+=($!)
  proxy_pid=$!
  wait_port "$PROXY_PORT"
}
