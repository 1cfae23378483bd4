#!/usr/bin/env bash
# Installs the client libraries of the client matrix (tests/clients.rs), each
# at a pinned version, from its ordinary registry:
#   redis-py           PyPI   -> target/clients/venv
# Idempotent: what is there at the pinned version is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
REDISPY_VERSION=7.0.1
dest=target/clients
mkdir -p "$dest"

venv=$dest/venv
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
if [ "$("$venv/bin/python" -c 'import redis; print(redis.__version__)' 2>/dev/null || true)" != "$REDISPY_VERSION" ]; then
  echo "installing redis-py $REDISPY_VERSION into $venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "redis==$REDISPY_VERSION"
fi
echo "client matrix: redis-py $REDISPY_VERSION"
