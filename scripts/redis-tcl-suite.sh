#!/usr/bin/env bash
# Redis's own Tcl test suite (`./runtest` in external-server mode), unit by unit,
# through redis-entra-proxy in front of a local TLS redis-server with an ACL user,
# and at the same time straight against a twin plain redis-server with the same
# config, so that "fails through the proxy" is told apart from "fails on this
# server anyway". Loopback only; everything it starts is stopped on exit.
#
#   scripts/redis-tcl-suite.sh /tmp/redis-src      # or REDIS_SRC=/tmp/redis-src
#
# The source tree must be the local server's version (`redis-server --version`;
# 7.0.x here): its tests check 7.0 behaviour. Get one outside this repository,
# e.g. `git archive 7.0.15 | tar -x -C /tmp/redis-src` from a clone of
# redis/redis. Nothing is built there: the tests only need tclsh (8.5+).
#
# Each unit runs as `./runtest --host 127.0.0.1 --port <port> --single <unit>
# --singledb --durable --tags -needs:repl --timeout $TCL_STALL` against the
# proxy and against the twin, the two at once (same machine load for both):
#   --singledb     the suite's clients do not SELECT 9 (which would pin every
#                  client to a connection of its own): commands take the
#                  proxy's shared, multiplexed connections. TCL_SINGLEDB=0
#                  runs with SELECT 9 instead (the pinned path).
#   --durable      an error outside an assertion fails that test, not the unit.
#   -needs:repl    tests that SYNC from the server (the proxy refuses SYNC/PSYNC).
#   --timeout      the suite's own watchdog: no test finishing for $TCL_STALL s
#                  (default 120) ends the unit; the test in progress is a hang.
# After a hang the unit runs again with the hung test skipped (at most
# $TCL_HANG_RERUNS times, default 3), so one hang does not hide the rest.
# Every run of a unit is bounded by `timeout $TCL_UNIT_TIMEOUT` (default 900 s).
# Between units both servers' CONFIG is put back to what it was at the start
# (a failed test can leave e.g. rdb-key-save-delay set), and FLUSHALL.
#
# Both redis-servers get `enable-debug-command local` (the suite's tests tagged
# needs:debug use DEBUG/OBJECT; Azure refuses DEBUG, so those results say how the
# proxy relays such commands, not what Azure allows).
#
# Output in $TCL_OUT (default .tcl-suite): per unit and side the runtest log,
# results.tsv (unit, side, test, status, message), summary.md (the table and
# every test that passed directly and not through the proxy).
# bench/TCL.md is the written-up copy with a reason for each such test.
# Environment: TCL_UNITS (space-separated, default the list below), STACK_AUTH
# (entra, the default: the token emulator with $TOKEN_LIFETIME-second tokens,
# so connections re-AUTH during the run; or static), PROXY_PORT (7479), TLS_PORT
# (7480), ADMIN_PORT (7490), DIRECT_PORT (7481).
set -euo pipefail
cd "$(dirname "$0")/.."

# The units a proxy can serve: commands and their replies as a client sees them.
UNITS_DEFAULT="
unit/dump
unit/protocol
unit/keyspace
unit/scan
unit/info-command
unit/type/string
unit/type/incr
unit/type/list
unit/type/list-2
unit/type/list-3
unit/type/set
unit/type/zset
unit/type/hash
unit/type/stream
unit/type/stream-cgroups
unit/sort
unit/expire
unit/other
unit/multi
unit/quit
unit/pubsub
unit/pubsubshard
unit/slowlog
unit/scripting
unit/functions
unit/introspection
unit/introspection-2
unit/bitops
unit/bitfield
unit/geo
unit/hyperloglog
unit/tracking
unit/pause
"
# Left out, with the reason:
#   unit/printver          prints the server's version; no tests.
#   unit/auth, unit/acl, unit/acl-v2, unit/info, unit/aofrw, unit/limits,
#   unit/obuf-limits, unit/memefficiency, unit/pendingquerybuf, unit/wait,
#   unit/shutdown, unit/oom-score-adj
#                          every test is tagged external:skip (they restart the
#                          server with their own config: requirepass, ACL files,
#                          maxclients, persistence, OOM scores, shutdown).
#   unit/maxmemory, unit/lazyfree, unit/latency-monitor
#                          server internals: eviction and memory accounting,
#                          background freeing, the event loop's latency.
#   unit/querybuf, unit/replybufsize, unit/client-eviction
#                          the server's per-connection buffers: through a proxy
#                          the server's connections are the proxy's, not the
#                          client's, so what they measure is not the client's.
#   unit/networking        CONFIG SET port/bind, I/O threads: server internals.
#   unit/tls               the server's own TLS listener (the proxy's clients
#                          speak plain RESP; TLS upstream is covered by tests/).
#   unit/cluster, unit/cluster-scripting, unit/cluster/*
#                          need a server started in cluster mode.
#   unit/violations        large-memory tests (over 100 MB per value).
#   integration/*          replication, persistence (AOF/RDB), redis-cli and
#                          redis-benchmark against servers the suite starts.

REDIS_SRC="${1:-${REDIS_SRC:-}}"
[ -n "$REDIS_SRC" ] && [ -f "$REDIS_SRC/tests/test_helper.tcl" ] || {
  echo "usage: $0 <redis source tree> (or REDIS_SRC); it needs tests/test_helper.tcl" >&2
  exit 64
}
REDIS_SRC="$(cd "$REDIS_SRC" && pwd)"
command -v tclsh >/dev/null || { echo "tclsh (8.5 or later) is needed" >&2; exit 1; }
src_version="$(sed -n 's/^#define REDIS_VERSION "\(.*\)"/\1/p' "$REDIS_SRC/src/version.h")"
server_version="$(redis-server --version | sed -n 's/.* v=\([0-9.]*\).*/\1/p')"
if [ "${src_version%.*}" != "${server_version%.*}" ]; then
  echo "the tests are Redis $src_version, the local redis-server is $server_version:" \
    "use the sources of the same major.minor (git archive ${server_version} ...)" >&2
  exit 1
fi

out="$(pwd)/${TCL_OUT:-.tcl-suite}"
work="${TCL_OUT:-.tcl-suite}/stack"   # local-stack.sh wipes $work in start_stack
PROXY_PORT="${PROXY_PORT:-7479}"
TLS_PORT="${TLS_PORT:-7480}"
ADMIN_PORT="${ADMIN_PORT:-7490}"
DIRECT_PORT="${DIRECT_PORT:-7481}"
STALL="${TCL_STALL:-120}"
UNIT_TIMEOUT="${TCL_UNIT_TIMEOUT:-900}"
HANG_RERUNS="${TCL_HANG_RERUNS:-3}"
UNITS="${TCL_UNITS:-$UNITS_DEFAULT}"
proxy_skip="$(pwd)/scripts/redis-tcl-proxy-skip.txt"
singledb=(--singledb)
[ "${TCL_SINGLEDB:-1}" = 1 ] || singledb=()

redis_bin="$(command -v redis-server || true)"
redis-server() {
  exec "${redis_bin:-/usr/bin/redis-server}" "$@" --enable-debug-command local
}
. scripts/local-stack.sh
rm -rf "$out"; mkdir -p "$out/logs"
if (exec 3<>/dev/tcp/127.0.0.1/"$DIRECT_PORT") 2>/dev/null; then
  echo "port $DIRECT_PORT is already in use: stop what listens there or set DIRECT_PORT" >&2
  exit 1
fi

stop_runs() {
  local f
  for f in "$out"/direct.pid "$out"/proxy.pid; do
    [ -s "$f" ] && kill -- "-$(cat "$f")" 2>/dev/null || true
  done
  # a script left running, or a CLIENT PAUSE a test left, holds off SIGTERM
  if [ -n "${admin_pass:-}" ]; then
    for cli in plain_cli direct_cli; do
      timeout 5 "$cli" script kill >/dev/null 2>&1 || true
      timeout 5 "$cli" function kill >/dev/null 2>&1 || true
      timeout 5 "$cli" client unpause >/dev/null 2>&1 || true
      timeout 5 "$cli" shutdown nosave >/dev/null 2>&1 || true
    done
  fi
  # what this script started: SIGTERM, then after 5 s SIGKILL (a server a
  # test left paused or out of memory did not always exit on SIGTERM)
  local p alive
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for _ in $(seq 1 50); do
    alive=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  cleanup
}
trap stop_runs EXIT
started=$(date +%s)
start_stack >/dev/null

# The twin: the stack's redis.conf with a plaintext port instead of TLS and the
# default user on without a password (the suite's client does not AUTH; through
# the proxy it need not either).
mkdir -p "$work/direct"
sed -e "s/^port .*/port $DIRECT_PORT/" -e '/^tls-port /d' \
    -e "s#^dir .*#dir $PWD/$work/direct#" -e "s#^logfile .*#logfile $PWD/$work/direct/redis.log#" \
    -e 's/^user default off$/user default on nopass ~* \&* +@all/' \
    "$work/redis.conf" > "$work/direct.conf"
chmod 600 "$work/direct.conf"
redis-server "$work/direct.conf" &
pids+=($!)
wait_port "$DIRECT_PORT"

# CONFIG of each server at the start, restored after every unit.
plain_cli() { redis-cli -p "$DIRECT_PORT" "$@"; }
snapshot() { "$1" --raw config get '*' | paste - - > "$2"; }
restore() { # cli snapshot
  local cli=$1 snap=$2 now
  now="$(mktemp)"
  "$cli" script kill >/dev/null 2>&1 || true
  "$cli" function kill >/dev/null 2>&1 || true
  "$cli" config set rdb-key-save-delay 0 >/dev/null 2>&1 || true
  "$cli" client unpause >/dev/null 2>&1 || true
  snapshot "$cli" "$now"
  # lines of the snapshot that differ now: set each back (one at a time: a
  # value CONFIG SET refuses, as "save" on some versions, must not stop the rest)
  { grep -Fxv -f "$now" "$snap" || true; } | while IFS=$'\t' read -r key value; do
    "$cli" config set "$key" "$value" >/dev/null 2>&1 || echo "  could not restore $key" >&2
  done
  rm -f "$now"
  "$cli" function flush >/dev/null 2>&1 || true
  "$cli" flushall >/dev/null 2>&1 || true
}
snapshot plain_cli "$out/direct.config"
snapshot direct_cli "$out/proxy.config"

# One run of a unit against one side; prints the hung test's name, if any.
run_unit() { # unit side port baseport log skip...
  local unit=$1 side=$2 port=$3 base=$4 log=$5; shift 5
  local skips=()
  for s in "$@"; do skips+=(--skiptest "$s"); done
  # timeout leads a process group of its own (runtest's tclsh and the test
  # client it starts); its pid is kept so that an interrupted run stops them.
  (cd "$REDIS_SRC" && exec timeout -k 10 "$UNIT_TIMEOUT" ./runtest --host 127.0.0.1 --port "$port" \
     --baseport "$base" --single "$unit" "${singledb[@]}" --durable --tags -needs:repl \
     --timeout "$STALL" "${skips[@]}" > "$log" 2>&1) &
  echo $! > "$out/$side.pid"
  wait $! || echo "rc=$?" >> "$log"
  rm -f "$out/$side.pid"
  sed -i 's/\x1b\[[0-9;]*m//g' "$log"
  if grep -q '^\[TIMEOUT\]' "$log"; then
    sed -n 's/^.* => (IN PROGRESS) //p' "$log" | head -n 1
  elif grep -q '^rc=124' "$log"; then
    echo "(unit timeout ${UNIT_TIMEOUT}s)"
  fi
}

# A unit on one side, again after each hang with the hung tests skipped.
# Appends to $out/hangs.tsv; the last run's log is what is parsed.
run_side() { # unit side port baseport
  local unit=$1 side=$2 port=$3 base=$4 hung skip=() n=0 log
  if [ "$side" = proxy ]; then
    mapfile -t skip < <(grep -v '^#' "$proxy_skip" | grep . | cut -f1)
  fi
  while :; do
    log="$out/logs/$(echo "$unit" | tr / _).$side.$n.log"
    hung="$(run_unit "$unit" "$side" "$port" "$base" "$log" "${skip[@]}")"
    [ -n "$hung" ] || break
    printf '%s\t%s\t%s\n' "$unit" "$side" "$hung" >> "$out/hangs.tsv"
    n=$((n + 1))
    [ "$n" -le "$HANG_RERUNS" ] && [ "${hung:0:1}" != "(" ] || break
    skip+=("$hung")
  done
  # the logs of every run, in order, for the parser
  printf '%s\n' "$out"/logs/"$(echo "$unit" | tr / _)".$side.*.log > "$out/logs/$(echo "$unit" | tr / _).$side.list"
}

touch "$out/hangs.tsv"
for unit in $UNITS; do
  [ -f "$REDIS_SRC/tests/$unit.tcl" ] || { echo "no such unit: $unit" >&2; exit 64; }
  t0=$(date +%s)
  restore plain_cli "$out/direct.config"
  restore direct_cli "$out/proxy.config"
  run_side "$unit" direct "$DIRECT_PORT" 21111 &
  direct_job=$!
  run_side "$unit" proxy "$PROXY_PORT" 23111
  wait "$direct_job"
  if ! kill -0 "$proxy_pid" 2>/dev/null; then
    echo "redis-entra-proxy exited during $unit; see $work/proxy.log" >&2
    echo "$unit	proxy	(the proxy exited)" >> "$out/hangs.tsv"
    exit 1
  fi
  printf '%-28s %4ss\n' "$unit" "$(( $(date +%s) - t0 ))"
done

python3 - "$out" "$proxy_skip" "$src_version" "$server_version" "$(( $(date +%s) - started ))" "$STACK_AUTH" "${TCL_SINGLEDB:-1}" $UNITS <<'PY'
import collections, os, re, sys
out, skip_file, src_version, server_version, elapsed, auth, singledb, *units = sys.argv[1:]
proxy_skip = dict(line.rstrip("\n").split("\t", 1) for line in open(skip_file)
                  if line.strip() and not line.startswith("#"))

def parse(paths):
    """(test -> (status, message)) over the runs of one unit, the last run winning."""
    results = collections.OrderedDict()
    block_errors = []
    for path in paths:
        seen = collections.Counter()
        lines = open(path, errors="replace").read().splitlines()
        i = 0
        while i < len(lines):
            line = lines[i]
            m = re.match(r"^\[(ok|err|skip|ignore)\]: (.*)$", line)
            if m and not line.startswith("*** "):
                status, rest = m.groups()
                if status == "ok":
                    name = re.sub(r" \(\d+ ms\)$", "", rest)
                    msg = ""
                elif status == "err":
                    fm = re.match(r"^(.*) in tests/\S+\.tcl$", rest)
                    msg = lines[i + 1][:300] if i + 1 < len(lines) else ""
                    if not fm:
                        block_errors.append(rest[:300])
                        i += 1
                        continue
                    name = fm.group(1)
                else:
                    name, msg = rest, ""
                    if status == "ignore":
                        i += 1
                        continue   # tag-filtered blocks: not run on either side
                seen[name] += 1
                key = name if seen[name] == 1 else f"{name} #{seen[name]}"
                results[key] = (status, msg)
            i += 1
    return results, block_errors

hangs = collections.defaultdict(list)
for line in open(os.path.join(out, "hangs.tsv")):
    unit, side, test = line.rstrip("\n").split("\t")
    hangs[(unit, side)].append(test)

rows, diffs, tsv = [], [], []
totals = collections.Counter()
for unit in units:
    res = {}
    for side in ("direct", "proxy"):
        flat = unit.replace("/", "_")
        paths = open(os.path.join(out, "logs", f"{flat}.{side}.list")).read().split()
        res[side] = parse(paths)
        for test, (status, msg) in res[side][0].items():
            tsv.append("\t".join([unit, side, test, status, msg.replace("\t", " ")]))
    def counts(side):
        r, block = res[side]
        c = collections.Counter(s for s, _ in r.values())
        return c["ok"], c["err"] + len(block), len(hangs[(unit, side)]), c["skip"]
    d, p = counts("direct"), counts("proxy")
    for k, v in zip(("d_ok", "d_err", "d_hang", "d_skip", "p_ok", "p_err", "p_hang", "p_skip"), d + p):
        totals[k] += v
    rows.append(f"| {unit} | {d[0]} | {d[1]} | {d[2]} | {p[0]} | {p[1]} | {p[2]} | {p[3]} |")
    direct, proxy = res["direct"][0], res["proxy"][0]
    for test, (status, _) in direct.items():
        if status != "ok":
            continue
        base = re.sub(r" #\d+$", "", test)
        pstatus, pmsg = proxy.get(test, ("not run", ""))
        if pstatus == "skip" and base in proxy_skip:
            pstatus, pmsg = "skipped through the proxy", proxy_skip[base]
        if test in hangs[(unit, "proxy")]:
            pstatus, pmsg = "hang", f"no progress for the watchdog's time"
        if pstatus != "ok":
            diffs.append(f"- {unit}: `{test}` [{pstatus}] {pmsg}")
    for test in hangs[(unit, "proxy")]:
        if test not in direct:
            diffs.append(f"- {unit}: `{test}` [hang through the proxy; not reached directly]")
    for e in res["proxy"][1]:
        if e not in res["direct"][1]:
            diffs.append(f"- {unit}: block error through the proxy: {e}")

lines = [
    f"# Redis {src_version} Tcl suite: direct vs through redis-entra-proxy",
    "",
    f"Server {server_version}; runtest --host/--port (external server), "
    f"{'--singledb' if singledb == '1' else 'SELECT 9'}, --durable, --tags -needs:repl; "
    f"proxy auth {auth}; {len(units)} units; {elapsed} s in all (both sides at once).",
    "",
    "| unit | direct pass | direct fail | direct hang | proxy pass | proxy fail | proxy hang | proxy skipped |",
    "|---|---|---|---|---|---|---|---|",
    *rows,
    f"| **all** | {totals['d_ok']} | {totals['d_err']} | {totals['d_hang']} | "
    f"{totals['p_ok']} | {totals['p_err']} | {totals['p_hang']} | {totals['p_skip']} |",
    "",
    f"Passed directly, not through the proxy: {len(diffs)}",
    "",
    *diffs,
]
open(os.path.join(out, "summary.md"), "w").write("\n".join(lines) + "\n")
open(os.path.join(out, "results.tsv"), "w").write("\n".join(tsv) + "\n")
print("\n".join(lines))
PY
