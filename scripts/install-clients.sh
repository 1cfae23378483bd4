#!/usr/bin/env bash
# Installs the client libraries of the client matrix (tests/clients.rs), each
# at a pinned version, from its ordinary registry:
#   redis-py           PyPI   -> target/clients/venv
#   node-redis, ioredis npm   -> target/clients/node/node_modules
#   phpredis, redis-rb  Debian (php-redis, ruby-redis, with php-cli and ruby)
# Idempotent: what is there at the pinned version is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
REDISPY_VERSION=7.0.1
NODE_REDIS_VERSION=5.9.0
IOREDIS_VERSION=5.8.2
dest=target/clients
mkdir -p "$dest"

deb=()
dpkg-query -W -f='${Status}' php-redis 2>/dev/null | grep -q "ok installed" || deb+=(php-cli php-redis)
dpkg-query -W -f='${Status}' ruby-redis 2>/dev/null | grep -q "ok installed" || deb+=(ruby ruby-redis)
if [ ${#deb[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "installing: ${deb[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${deb[@]}" >/dev/null
fi

venv=$dest/venv
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
if [ "$("$venv/bin/python" -c 'import redis; print(redis.__version__)' 2>/dev/null || true)" != "$REDISPY_VERSION" ]; then
  echo "installing redis-py $REDISPY_VERSION into $venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "redis==$REDISPY_VERSION"
fi
node_dir=$dest/node
mkdir -p "$node_dir"
have() { node -e "console.log(require('./$node_dir/node_modules/$1/package.json').version)" 2>/dev/null || true; }
if [ "$(have redis)" != "$NODE_REDIS_VERSION" ] || [ "$(have ioredis)" != "$IOREDIS_VERSION" ]; then
  command -v npm >/dev/null 2>&1 || {
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
  }
  echo "installing node-redis $NODE_REDIS_VERSION and ioredis $IOREDIS_VERSION into $node_dir"
  [ -f "$node_dir/package.json" ] || echo '{"name":"client-matrix","private":true}' >"$node_dir/package.json"
  (cd "$node_dir" && npm install --no-audit --no-fund --silent \
    "redis@$NODE_REDIS_VERSION" "ioredis@$IOREDIS_VERSION")
fi
echo "client matrix: redis-py $REDISPY_VERSION, node-redis $NODE_REDIS_VERSION, ioredis $IOREDIS_VERSION," \
  "php-redis $(dpkg-query -W -f='${Version}' php-redis), ruby-redis $(dpkg-query -W -f='${Version}' ruby-redis)"
