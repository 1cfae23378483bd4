#!/usr/bin/env bash
# Installs what the quick start and the tests need and the machine lacks:
# redis-server (built with TLS), redis-tools (redis-cli, redis-benchmark) and the
# openssl command; then the client libraries of the client matrix (install-clients.sh).
set -euo pipefail
need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || need+=(redis-tools)
command -v redis-benchmark >/dev/null 2>&1 || need+=(redis-tools)
# The client-certificate test makes its RSA key with the openssl command.
command -v openssl >/dev/null 2>&1 || need+=(openssl)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "installing: ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
redis-server --version
"$(dirname "$0")/install-clients.sh"
