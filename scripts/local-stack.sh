# Sourced by quickstart.sh, bench.sh and redis-py-suite.sh: a local TLS-only
# redis-server and redis-entra-proxy in front of it on 127.0.0.1:$PROXY_PORT.
#
# STACK_AUTH=entra (the default): the proxy takes Entra tokens from the
# token-endpoint emulator (examples/token_emulator.rs, IMDS shape), tokens valid
# for $TOKEN_LIFETIME seconds (default 15). Each token generation is its own ACL
# user, deleted when its token expires, so Redis closes any connection the proxy
# did not re-AUTH in time, as Azure does.
# STACK_AUTH=static: one fixed ACL user and password (an access key's stand-in).
#
# Sets $work, $TLS_PORT, $PROXY_PORT, $ADMIN_PORT, $admin_pass (the redis-server's
# `admin` user, for direct runs), $proxy_pid; `cleanup` stops everything.
# bench/run.sh starts more of each with `start_emulator` and `start_proxy`.
set -euo pipefail
work="${work:-.quickstart}"
TLS_PORT="${TLS_PORT:-6380}"
PROXY_PORT="${PROXY_PORT:-6379}"
ADMIN_PORT="${ADMIN_PORT:-9090}"
STACK_AUTH="${STACK_AUTH:-entra}"
TOKEN_LIFETIME="${TOKEN_LIFETIME:-15}"
# Where cargo puts its builds. Everything the stack runs is built once, in the
# release profile: the proxy and the two helper examples share its dependencies
# (a debug build of the examples beside it doubled a first run's build time).
target="${CARGO_TARGET_DIR:-target}"
examples="$target/release/examples"
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

# GET a path of the proxy's admin server (no curl needed): prints the body.
admin_get() {
  exec 5<>/dev/tcp/127.0.0.1/"$ADMIN_PORT"
  printf 'GET %s HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n' "$1" >&5
  sed '1,/^\r$/d' <&5
  exec 5<&-
}

# $work/redis.conf for a TLS-only redis-server on port $1 (no plaintext port
# unless $PLAIN_PORT names one, default user off) with an ACL user per "name password" pair that follows.
redis_conf() { # port [user password]...
  local port=$1; shift
  cat > "$work/redis.conf" <<CONF
port ${PLAIN_PORT:-0}
tls-port $port
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
CONF
  while [ $# -ge 2 ]; do
    echo "user $1 on >$2 ~* &* +@all" >> "$work/redis.conf"
    shift 2
  done
  chmod 600 "$work/redis.conf"
}

# redis-cli straight to the TLS port as the server's admin user.
direct_cli() {
  REDISCLI_AUTH="$admin_pass" redis-cli --tls --cacert "$work/tls/ca.pem" -p "$TLS_PORT" --user admin "$@"
}

# The token-endpoint emulator for $TLS_PORT's server: tokens valid $2 seconds,
# ACL users named "$1<generation>"; its IMDS endpoint URL ends up in $3.
# More emulator arguments may follow (a cluster: `--redis-port P` for every
# other node, `--resync`).
start_emulator() { # oid-prefix lifetime endpoint-file log [emulator args...]
  EMULATOR_REDIS_ADMIN_PASSWORD="$admin_pass" "$examples/token_emulator" \
    --redis-port "$TLS_PORT" --ca "$work/tls/ca.pem" --lifetime "$2" \
    --oid-prefix "$1" --endpoint-file "$3" "${@:5}" > "$4" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 100); do [ -s "$3" ] && break; sleep 0.1; done
  [ -s "$3" ] || { echo "the token emulator did not start; see $4" >&2; exit 1; }
}

# The proxy on 127.0.0.1:$1 in front of $TLS_PORT, admin on $2, log in $3, the
# auth settings as VAR=value arguments after those; sets $proxy_pid and
# returns once /readyz says ready. Any other REDIS_ENTRA_PROXY_* variable in
# the caller's environment applies too.
start_proxy() { # port admin-port log auth-env...
  local port=$1 admin=$2 log=$3; shift 3
  env "$@" \
  REDIS_ENTRA_PROXY_UPSTREAM__HOST=localhost \
  REDIS_ENTRA_PROXY_UPSTREAM__PORT="$TLS_PORT" \
  REDIS_ENTRA_PROXY_UPSTREAM__CA_FILE="$work/tls/ca.pem" \
  REDIS_ENTRA_PROXY_LISTEN__ADDRESS="127.0.0.1:$port" \
  REDIS_ENTRA_PROXY_ADMIN__ENABLED=true \
  REDIS_ENTRA_PROXY_ADMIN__ADDRESS="127.0.0.1:$admin" \
    "${PROXY_BIN:-$target/release/redis-entra-proxy}" --config config/redis-entra-proxy.example.toml 2>"$log" &
  pids+=($!)
  proxy_pid=$!
  for _ in $(seq 1 "${READY_TRIES:-100}"); do
    (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null && break
    sleep 0.1
  done
  # Ready: a credential and a healthy upstream connection.
  for _ in $(seq 1 "${READY_TRIES:-100}"); do
    ADMIN_PORT=$admin admin_get /readyz 2>/dev/null | grep -q '^ready' && return 0
    sleep 0.1
  done
  echo "the proxy did not become ready: $(ADMIN_PORT=$admin admin_get /readyz 2>/dev/null); see $log" >&2
  exit 1
}

start_stack() {
  case "$STACK_AUTH" in
    entra|static) ;;
    *) echo "STACK_AUTH must be entra or static, not '$STACK_AUTH'" >&2; exit 64 ;;
  esac
  scripts/install-deps.sh >/dev/null
  rm -rf "$work"; mkdir -p "$work"
  cargo build --release --quiet --bin redis-entra-proxy --example testpki --example token_emulator
  "$examples/testpki" "$work/tls" >/dev/null
  for port in "$PROXY_PORT" "$TLS_PORT" "$ADMIN_PORT"; do
    if (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null; then
      echo "port $port is already in use (a local redis?): stop it and run again" >&2
      exit 1
    fi
  done
  # Throwaway passwords for the server's admin and the static identity, never printed.
  admin_pass="adm-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
  static_pass="qs-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
  if [ "$STACK_AUTH" = static ]; then
    redis_conf "$TLS_PORT" admin "$admin_pass" quickstart-identity "$static_pass"
  else
    redis_conf "$TLS_PORT" admin "$admin_pass"
  fi
  echo "==> starting redis-server with TLS only on 127.0.0.1:$TLS_PORT (default user off)"
  redis-server "$work/redis.conf" &
  pids+=($!)
  wait_port "$TLS_PORT"
  local auth_env
  if [ "$STACK_AUTH" = entra ]; then
    echo "==> starting the token-endpoint emulator (IMDS shape; tokens valid ${TOKEN_LIFETIME}s; log: $work/emulator.log)"
    start_emulator quickstart-oid- "$TOKEN_LIFETIME" "$work/endpoint" "$work/emulator.log"
    auth_env=(
      REDIS_ENTRA_PROXY_AUTH__SOURCE=entra
      REDIS_ENTRA_PROXY_AUTH__ENTRA__CREDENTIAL=managed-identity
      REDIS_ENTRA_PROXY_AUTH__ENTRA__IMDS_ENDPOINT="$(cat "$work/endpoint")"
    )
  else
    auth_env=(
      REDIS_ENTRA_PROXY_AUTH__SOURCE=static
      REDIS_ENTRA_PROXY_AUTH__USERNAME=quickstart-identity
      REDIS_ENTRA_PROXY_AUTH__STATIC__PASSWORD="$static_pass"
    )
  fi
  echo "==> starting redis-entra-proxy on 127.0.0.1:$PROXY_PORT, admin on 127.0.0.1:$ADMIN_PORT (auth: $STACK_AUTH; log: $work/proxy.log)"
  start_proxy "$PROXY_PORT" "$ADMIN_PORT" "$work/proxy.log" "${auth_env[@]}"
}
