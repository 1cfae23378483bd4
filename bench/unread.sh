#!/usr/bin/env bash
# The unread-client case at default settings (issue 19, finding 8): one client
# pipelines 400 GETs of a 1 MB value in one write and reads nothing for 3 s,
# then reads every reply (each checked). The proxy's RSS before, at its peak
# (VmHWM), while the client holds off, and after it left. Release build,
# static credential, local TLS redis-server. Appends to bench/MEMORY.md
# (OUT). Ports TX_TLS_PORT (16480) and TX_PROXY_PORT (16479).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/MEMORY.md}"
work=.bench-unread
TLS_PORT="${TX_TLS_PORT:-16480}"
PROXY_PORT="${TX_PROXY_PORT:-16479}"
. scripts/local-stack.sh
rm -rf "$work"; mkdir -p "$work"
cargo build --release --quiet --bin redis-entra-proxy --example testpki
"$target/release/examples/testpki" "$work/tls" >/dev/null
token="unread-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
redis_conf "$TLS_PORT" bench-identity "$token"
redis-server "$work/redis.conf" &
pids+=($!)
wait_port "$TLS_PORT"
REDIS_ENTRA_PROXY_UPSTREAM__HOST=localhost \
REDIS_ENTRA_PROXY_UPSTREAM__PORT=$TLS_PORT \
REDIS_ENTRA_PROXY_UPSTREAM__CA_FILE="$work/tls/ca.pem" \
REDIS_ENTRA_PROXY_AUTH__SOURCE=static \
REDIS_ENTRA_PROXY_AUTH__USERNAME=bench-identity \
REDIS_ENTRA_PROXY_AUTH__STATIC__PASSWORD="$token" \
REDIS_ENTRA_PROXY_LISTEN__ADDRESS="127.0.0.1:$PROXY_PORT" \
  "$target/release/redis-entra-proxy" 2>"$work/proxy.log" &
proxy_pid=$!
pids+=("$proxy_pid")
wait_port "$PROXY_PORT"
kib() { awk -v f="$1:" '$1 == f {print $2}' /proc/"$proxy_pid"/status; }
result=$(python3 - "$PROXY_PORT" "$proxy_pid" <<'PY'
import socket, sys, time
port, pid = int(sys.argv[1]), sys.argv[2]
def rss(field):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) // 1024
def cmd(*words):
    out = b"*%d\r\n" % len(words)
    for w in words:
        out += b"$%d\r\n%s\r\n" % (len(w), w)
    return out
value = b"v" * (1 << 20)
c = socket.create_connection(("127.0.0.1", port))
c.sendall(cmd(b"SET", b"big", value))
assert c.recv(16) == b"+OK\r\n"
before = rss("VmRSS")
s = socket.create_connection(("127.0.0.1", port))
s.sendall(cmd(b"GET", b"big") * 400)
held = 0
for _ in range(30):
    time.sleep(0.1)
    held = max(held, rss("VmRSS"))
want = b"$1048576\r\n" + value + b"\r\n"
buf = bytearray()
got = 0
s.settimeout(30)
while got < 400:
    chunk = s.recv(1 << 20)
    assert chunk, f"closed after {got} replies"
    buf += chunk
    while len(buf) >= len(want):
        assert bytes(buf[:len(want)]) == want, f"reply {got} differs"
        del buf[:len(want)]
        got += 1
s.close()
c.close()
time.sleep(2)
print(before, held, rss("VmHWM"), rss("VmRSS"), got)
PY
)
read -r before held peak after got <<<"$result"
{
  echo
  echo "## One client that pipelines without reading, default settings (bench/unread.sh)"
  echo
  echo "400 GETs of a 1 MB value in one write, nothing read for 3 s, then all $got"
  echo "replies read and checked; release build, $(date -u +%Y-%m-%d)."
  echo
  echo "| proxy RSS before | highest while unread | peak (VmHWM) | 2 s after it left |"
  echo "|---|---|---|---|"
  echo "| $before MiB | $held MiB | $peak MiB | $after MiB |"
  echo
  echo "Before issue 19 the same client took the proxy to 586 MB (all 400 replies held)."
  echo "Now its commands are read only while its unread replies, and those expected of"
  echo "its commands in flight, stay within the 4 MiB window."
} >> "$OUT"
tail -12 "$OUT"
