#!/usr/bin/env bash
# Quick start, end to end on this machine, no Azure needed:
#   1. installs redis-server when missing,
#   2. starts a local redis-server with TLS only (no plaintext port, default user
#      off), and the token-endpoint emulator standing in for Entra ID: tokens valid
#      15 s, each generation its own ACL user, deleted when its token expires (so
#      Redis closes connections that were not re-authenticated, as Azure does),
#   3. starts redis-entra-proxy on 127.0.0.1:6379 from config/redis-entra-proxy.example.toml
#      (the environment points it at the local server and the emulator's IMDS),
#   4. shows plain `redis-cli -p 6379` (no password, no TLS) doing PING, SET, GET,
#   5. keeps one client connection busy across three token rotations and shows
#      what the proxy did (token refreshes, re-AUTHs, no reconnects, no errors),
#   6. stops what it started. Pass --keep to leave it running (Ctrl-C stops it).
# STACK_AUTH=static uses a fixed password instead of the emulator.
set -euo pipefail
cd "$(dirname "$0")/.."
keep=false
[ "${1:-}" = "--keep" ] && keep=true
. scripts/local-stack.sh
echo "==> building and starting (first build takes a few minutes)"
start_stack

echo "==> redis-cli -p $PROXY_PORT (plain RESP, no password, no TLS)"
set -x
redis-cli -p "$PROXY_PORT" PING
redis-cli -p "$PROXY_PORT" SET greeting "hello from redis-entra-proxy"
redis-cli -p "$PROXY_PORT" GET greeting
set +x
echo "==> the same key read straight from the TLS port (as the server's admin user):"
direct_cli GET greeting

if [ "$STACK_AUTH" = entra ]; then
  secs=$((TOKEN_LIFETIME * 3))
  echo "==> one client connection, one INCR every 3 s for ${secs}s, across token rotations:"
  redis-cli -p "$PROXY_PORT" DEL quickstart:counter >/dev/null
  redis-cli -p "$PROXY_PORT" -r $((secs / 3)) -i 3 INCR quickstart:counter | tr '\n' ' '
  echo
  echo "==> the token emulator's log:"
  sed 's/^/    /' "$work/emulator.log"
  echo "==> the proxy's metrics (admin port $ADMIN_PORT):"
  admin_get /metrics | grep -E '^redis_entra_proxy_(token_refreshes_total|reauths_total|upstream_reconnects_total|errors_total|token_expiry_seconds|ready)[ {]' | sed 's/^/    /' || true
  echo "==> the proxy's upstream connections as the server sees them (user = the current token's oid):"
  direct_cli CLIENT LIST | awk '$0 !~ /user=admin/ {for (i = 1; i <= NF; i++) if ($i ~ /^(id|user|age|cmd)=/) printf "%s ", $i; print ""}' | sed 's/^/    /'
  echo "==> $(admin_get /readyz)"
fi

if $keep; then
  echo "==> running; try: redis-cli -p $PROXY_PORT   (Ctrl-C stops everything)"
  wait
fi
echo "==> done; stopping redis-entra-proxy, the token emulator and redis-server"
