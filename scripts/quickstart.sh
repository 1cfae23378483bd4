#!/usr/bin/env bash
# Quick start, end to end on this machine, no Azure needed:
#   1. installs redis-server when missing,
#   2. starts a local redis-server with TLS only (no plaintext port), the default
#      user off and one ACL user standing in for the Entra identity,
#   3. starts redis-entra-proxy on 127.0.0.1:6379 from config/redis-entra-proxy.example.toml
#      (the environment points it at the local server with a static credential),
#   4. shows plain `redis-cli -p 6379` (no password, no TLS) doing PING, SET, GET,
#   5. stops what it started. Pass --keep to leave both running (Ctrl-C stops them).
set -euo pipefail
cd "$(dirname "$0")/.."
keep=false
[ "${1:-}" = "--keep" ] && keep=true
. scripts/local-stack.sh
echo "==> building and starting (first build takes a few minutes)"
start_stack

echo "==> redis-cli -p 6379 (plain RESP, no password, no TLS)"
set -x
redis-cli -p 6379 PING
redis-cli -p 6379 SET greeting "hello from redis-entra-proxy"
redis-cli -p 6379 GET greeting
set +x
echo "==> the same key read straight from the TLS port with the identity's credential:"
REDISCLI_AUTH="$token" redis-cli --tls --cacert "$work/tls/ca.pem" -p "$TLS_PORT" --user quickstart-identity GET greeting

if $keep; then
  echo "==> running; try: redis-cli -p 6379   (Ctrl-C stops both)"
  wait
fi
echo "==> done; stopping redis-entra-proxy and redis-server"
