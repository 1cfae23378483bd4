#!/usr/bin/env bash
# Resident memory of the proxy with the Kubernetes manifests' limits
# (deploy/kubernetes/*.yaml: 32 clients, 2 MiB per value, 2 MiB buffered per
# client, 30 pinned connections, a 256Mi memory limit), against the memory
# formula scripts/check_manifests.py applies. Loopback only, bounded: a fixed
# number of requests and clients, each load step a few seconds.
#   1. idle, after start;
#   2. redis-benchmark: 32 clients SET and GET values of 2,000,000 bytes;
#   3. the worst case the limits allow: 32 clients each send a value as large as
#      allowed, then pipeline GETs of it and read nothing, so the proxy holds
#      what it may for each of them.
# Prints a Markdown table (kB figures from /proc: VmRSS now, VmHWM the peak).
set -euo pipefail
cd "$(dirname "$0")/.."
work=.bench-memory
STACK_AUTH=static
PROXY_PORT="${PROXY_PORT:-6479}"
TLS_PORT="${TLS_PORT:-6480}"
ADMIN_PORT="${ADMIN_PORT:-9190}"
export REDIS_ENTRA_PROXY_LISTEN__MAX_CLIENTS=32
export REDIS_ENTRA_PROXY_LIMITS__MAX_BULK_BYTES=2097152
export REDIS_ENTRA_PROXY_LIMITS__MAX_BUFFERED_BYTES=2097152
export REDIS_ENTRA_PROXY_LIMITS__MAX_PUBSUB_QUEUED_BYTES=2097152
export REDIS_ENTRA_PROXY_UPSTREAM__MAX_PINNED=30
. scripts/local-stack.sh
start_stack >/dev/null
mib() { awk -v k="$1" '/^'"$1"':/ {printf "%.1f", $2 / 1024}' /proc/"$proxy_pid"/status; }
row() { echo "| $1 | $(mib VmRSS) | $(mib VmHWM) |"; }
echo "| load | RSS (MiB) | peak RSS so far (MiB) |"
echo "|---|---|---|"
row "idle after start"
redis-benchmark -p "$PROXY_PORT" -c 32 -n 640 -d 2000000 -t set,get -q >/dev/null 2>&1
row "redis-benchmark -c 32 -n 640 -d 2000000 -t set,get"
# A value just under max_bulk_bytes (2 MiB minus the RESP framing).
value_len=$((2097152 - 64))
python3 - "$PROXY_PORT" "$value_len" "$proxy_pid" <<'PY'
import socket, sys, time
port, n, pid = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
def mib(key):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(key + ":"):
            return "%.1f" % (int(line.split()[1]) / 1024)
value = b"v" * n
def cmd(*args):
    out = b"*%d\r\n" % len(args)
    for a in args:
        out += b"$%d\r\n%s\r\n" % (len(a), a)
    return out
setup = socket.create_connection(("127.0.0.1", port))
setup.sendall(cmd(b"SET", b"big", value))
setup.settimeout(10)
assert setup.recv(16).startswith(b"+OK")
stuck = []
for _ in range(31):
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.setblocking(False)
    try:
        for _ in range(64):
            s.send(cmd(b"GET", b"big"))
    except BlockingIOError:
        pass
    stuck.append(s)
time.sleep(5)
print(f"| {len(stuck)} clients with unread 2 MiB GET replies, held | {mib('VmRSS')} | {mib('VmHWM')} |")
PY
row "after those clients left"
echo
echo "formula (scripts/check_manifests.py): 32 MiB + 32 x (2 x 2 MiB + 2 MiB) + 33 x 256 KiB = 232 MiB; manifests' limit 256 MiB"
