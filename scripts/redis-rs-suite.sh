#!/usr/bin/env bash
# redis-rs's own test suite (the `redis` crate's tests/), run once with each test
# talking straight to its own plain redis-server and once with each test talking
# to its own redis-entra-proxy in front of its own TLS-only redis-server, in one
# sitting on this machine (loopback only). Not part of .ci/run (too long and
# timing-sensitive), like scripts/redis-py-suite.sh.
#
#   scripts/redis-rs-suite.sh            # ~12 minutes on 2 cores (first build ~6 more); capped at 40
#
# 1. The `redis` crate $REDISRS_VERSION and `redis-test` $REDISTEST_VERSION from
#    crates.io (`cargo fetch` of a throwaway manifest under target/). The crate as
#    published ships its tests/ and its Cargo.lock but not the path dependency on
#    the redis-test helper crate, so the copy under target/redisrs-suite gets it
#    back as a crates.io dev-dependency, patched to the copy itself (one `redis`),
#    and takes redis-test's pin of tempfile (3.20) instead of its own (=3.21).
#    (The 1.x releases' tests also need an unpublished proc-macro crate, hence 0.32.)
# 2. Each test runs in a process of its own (as redis-rs's CI does with nextest;
#    a hang costs one test, capped at 60 s) and starts its own server through
#    redis-test's RedisServer, which runs `redis-server` from PATH with
#    `--port P --bind 127.0.0.1`.
#    Direct run: the plain redis-server 7.0.15, default user, no TLS.
#    Proxy run: PATH starts with a folder whose `redis-server` is this script
#    (`shim` mode): it starts a TLS-only redis-server on a port of its own
#    (default user off, one ACL user for the proxy, a static password) and then
#    becomes the proxy on 127.0.0.1:P in front of it, so the test's client talks
#    to the proxy, and the test's "kill the server" kills the proxy (and the
#    redis-server with it: setpriv --pdeathsig).
# 3. Compares per test (binary::test name): a test that passed directly and fails
#    through the proxy must be listed in scripts/redis-rs-known-differences.txt,
#    otherwise the script exits 1 (after running such tests once more alone, for
#    timing on a busy machine). The summary goes to $out (default
#    .redisrs/summary.md; bench/redis-rs-suite.md is the written-up copy).
#
# Test binaries left out both ways: cluster, sentinel and module tests (they
# start servers of another shape, which the shim would pass straight to
# redis-server: they would not test the proxy; Debian's redis has no modules).
# Environment: REDISRS_JOBS (tests at a time, default 2), REDISRS_TESTS
# (space-separated test binaries), REDISRS_FILTER (extended regexp on
# "binary<TAB>executable<TAB>test name"), REDISRS_COMPARE_ONLY=1 (compare the
# last run's results again), REDISRS_PROXY (a proxy binary to test instead of
# this checkout's release build) and REDISRS_PROXY_CONFIG (its config file, default
# this checkout's example), PROTOCOL=RESP3 (the suite's clients speak RESP3).
set -euo pipefail
orig_pwd=$PWD
cd "$(dirname "$0")/.."
REDISRS_VERSION=0.32.7
REDISTEST_VERSION=0.12.0
# async-std-comp: test_async has an async-std case not gated on the feature.
FEATURES=tokio-comp,async-std-comp,connection-manager,cache-aio,json,r2d2,bb8
results=.redisrs
target="${CARGO_TARGET_DIR:-target}"
case "$target" in /*) ;; *) target="$PWD/$target" ;; esac
rs_target="$target/redisrs"   # the suite's own build, beside the proxy's
suite=target/redisrs-suite
known=scripts/redis-rs-known-differences.txt
out="${REDISRS_SUMMARY:-$results/summary.md}"

# ---- shim mode: stands in for redis-server, runs TLS redis-server + the proxy ----
if [ "${1:-}" = shim ]; then
  shift
  port="" bind=127.0.0.1 conf="" pass=()
  if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then
    conf=$1; shift
    [ "${conf#/}" != "$conf" ] || conf="$orig_pwd/$conf"
  fi
  while [ $# -gt 0 ]; do
    case "$1" in
      --port) port=$2; shift 2 ;;
      --bind) bind=$2; shift 2 ;;
      --tls-port|--unixsocket|--cluster-enabled|--sentinel)
        # Another shape of server: not something to put the proxy in front of.
        exec "$REDISRS_REAL_SERVER" ${conf:+"$conf"} "${pass[@]}" --port "$port" --bind "$bind" "$@" ;;
      *) pass+=("$1"); shift ;;
    esac
  done
  [ -n "$port" ] && [ "$port" != 0 ] || exec "$REDISRS_REAL_SERVER" ${conf:+"$conf"} "${pass[@]}"
  : "${REDISRS_SHIM_DIR:?shim mode needs REDISRS_SHIM_DIR}"
  dir=$(mktemp -d "$REDISRS_SHIM_DIR/inst.XXXXXX")
  tls="$REDISRS_SHIM_DIR/tls"
  password="rs-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
  listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
  # The upstream's port: below the kernel's ephemeral range, where the tests'
  # own ports (bound to port 0, then released) come from.
  for _ in $(seq 1 50); do
    up=$((20000 + RANDOM % 10000))
    listening "$up" || break
  done
  {
    [ -z "$conf" ] || echo "include $conf"
    echo "port 0"
    echo "tls-port $up"
    echo "bind 127.0.0.1"
    echo "tls-cert-file $tls/server.pem"
    echo "tls-key-file $tls/server.key"
    echo "tls-ca-cert-file $tls/ca.pem"
    echo "tls-auth-clients no"
    echo "user default off"
    echo "user suite-identity on >$password ~* &* +@all"
  } > "$dir/redis.conf"
  chmod 600 "$dir/redis.conf"
  # redis-server dies with this process (pdeathsig), and this process becomes the
  # proxy (exec), so the test's kill of "the server" kills the proxy itself and
  # its wait returns only once the proxy's sockets are closed, as for redis-server.
  setpriv --pdeathsig KILL "$REDISRS_REAL_SERVER" "$dir/redis.conf" "${pass[@]}" &
  for _ in $(seq 1 200); do listening "$up" && break; sleep 0.02; done
  export REDIS_ENTRA_PROXY_AUTH__SOURCE=static \
    REDIS_ENTRA_PROXY_AUTH__USERNAME=suite-identity \
    REDIS_ENTRA_PROXY_AUTH__STATIC__PASSWORD="$password" \
    REDIS_ENTRA_PROXY_UPSTREAM__HOST=localhost \
    REDIS_ENTRA_PROXY_UPSTREAM__PORT="$up" \
    REDIS_ENTRA_PROXY_UPSTREAM__CA_FILE="$tls/ca.pem" \
    REDIS_ENTRA_PROXY_LISTEN__ADDRESS="$bind:$port" \
    REDIS_ENTRA_PROXY_ADMIN__ENABLED=false
  exec "$REDISRS_PROXY_BIN" --config "${REDISRS_PROXY_CONFIG:-config/redis-entra-proxy.example.toml}" \
    2> "$dir/proxy.log"
fi

# The whole script re-runs itself under `timeout` so nothing outlives the cap.
if [ -z "${REDISRS_SUITE_CAPPED:-}" ]; then
  REDISRS_SUITE_CAPPED=1 exec timeout --kill-after=10 2400 "$0" "$@"
fi

scripts/install-deps.sh >/dev/null
command -v setpriv >/dev/null || { echo "setpriv (util-linux) is needed" >&2; exit 1; }
echo "==> redis $REDISRS_VERSION and redis-test $REDISTEST_VERSION from crates.io"
fetch=target/redisrs-fetch
if [ ! -f "$suite/.prepared-$REDISRS_VERSION" ]; then
  rm -rf "$fetch" "$suite"; mkdir -p "$fetch/src"
  cat > "$fetch/Cargo.toml" <<TOML
[package]
name = "redisrs-fetch"
version = "0.0.0"
edition = "2021"
publish = false
[dependencies]
redis = "=$REDISRS_VERSION"
redis-test = "=$REDISTEST_VERSION"
TOML
  echo 'fn main() {}' > "$fetch/src/main.rs"
  (cd "$fetch" && cargo fetch -q)
  crate_dir=$(cd "$fetch" && cargo metadata -q --format-version 1 | python3 -c '
import json, sys
m = json.load(sys.stdin)
print(next(p["manifest_path"] for p in m["packages"] if p["name"] == "redis").rsplit("/", 1)[0])')
  cp -r "$crate_dir" "$suite"
  chmod -R u+w "$suite"
  # redis-test pins tempfile =3.20.0, this redis =3.21.0: let the suite take redis-test's.
  sed -i '/^\[dev-dependencies.tempfile\]/,/^version/ s/^version = .*/version = "3.20"/' "$suite/Cargo.toml"
  cat >> "$suite/Cargo.toml" <<TOML

# Added by scripts/redis-rs-suite.sh: the published crate drops its path
# dev-dependency on redis-test; take it from crates.io, built against this copy.
[dev-dependencies.redis-test]
version = "=$REDISTEST_VERSION"

[patch.crates-io]
redis = { path = "." }
TOML
  touch "$suite/.prepared-$REDISRS_VERSION"
fi

default_tests="parser test_acl test_async test_basic test_bignum test_cache test_geospatial
  test_script test_streams test_types"
tests=(${REDISRS_TESTS:-$default_tests})
echo "==> building the suite's tests (features $FEATURES) and the proxy"
test_args=()
for t in "${tests[@]}"; do test_args+=(--test "$t"); done
if ! (cd "$suite" && CARGO_TARGET_DIR="$rs_target" cargo test -q --no-run \
       --features "$FEATURES" "${test_args[@]}") > target/redisrs-build.log 2>&1; then
  grep -A8 '^error' target/redisrs-build.log | head -n 40 >&2
  echo "building the suite failed; see target/redisrs-build.log" >&2
  exit 1
fi
cargo build --quiet --example testpki
if [ -n "${REDISRS_PROXY:-}" ]; then
  proxy_bin=$(realpath "$REDISRS_PROXY")   # another build of the proxy, e.g. of another branch
  # ... with its own checkout's example config (its keys may differ from this one's)
  export REDISRS_PROXY_CONFIG="${REDISRS_PROXY_CONFIG:-$PWD/config/redis-entra-proxy.example.toml}"
else
  cargo build --release --quiet --bin redis-entra-proxy
  proxy_bin="$target/release/redis-entra-proxy"
fi

# REDISRS_COMPARE_ONLY=1 compares (and retries) the results of the last run again.
compare_only="${REDISRS_COMPARE_ONLY:-}"
if [ -z "$compare_only" ]; then
  rm -rf "$results"; mkdir -p "$results/shim"
  "$target/debug/examples/testpki" "$results/shim/tls" >/dev/null
fi

# redis-test runs `redis-server` from PATH; the proxy run puts this one first.
mkdir -p "$results/shim/bin"
printf '#!/bin/sh\nexec "%s" shim "$@"\n' "$PWD/scripts/redis-rs-suite.sh" > "$results/shim/bin/redis-server"
chmod +x "$results/shim/bin/redis-server"
real_server=$(command -v redis-server)

# Each test in a process of its own, as redis-rs's CI runs them (cargo-nextest):
# the runtime preference the async tests set is per process, and a hang or a
# crash costs one test. $REDISRS_JOBS (default 2) tests at a time.
list_tests() {
(cd "$suite" && CARGO_TARGET_DIR="$rs_target" cargo test -q --no-run --message-format=json \
   --features "$FEATURES" "${test_args[@]}" 2>/dev/null) | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["target"]["name"] + "\t" + m["executable"])' > "$results/executables.tsv"
: > "$results/tests.tsv"
while IFS=$'\t' read -r bin exe; do
  (cd "$suite" && "$exe" --list 2>/dev/null) | sed -n 's/: test$//p' \
    | while read -r t; do printf '%s\t%s\t%s\n' "$bin" "$exe" "$t"; done >> "$results/tests.tsv"
done < "$results/executables.tsv"
if [ -n "${REDISRS_FILTER:-}" ]; then
  grep -E -- "$REDISRS_FILTER" "$results/tests.tsv" > "$results/tests.sel" || true
  mv "$results/tests.sel" "$results/tests.tsv"
fi
}
[ -n "$compare_only" ] || list_tests

run_one() { # dir bin exe test [env...]
  local dir=$1 bin=$2 exe=$3 t=$4; shift 4
  local log rc status msg
  log="$dir/logs/$bin.$(printf '%s' "$t" | md5sum | cut -c1-12).log"
  rc=0
  (cd "$suite" && env RUST_BACKTRACE=0 "$@" timeout --kill-after=5 60 "$exe" --exact "$t" --test-threads=1) \
    > "$log" 2>&1 < /dev/null || rc=$?
  if grep -q '^test result: ok\. 1 passed' "$log"; then status=passed
  elif grep -q '^test result: ok\. 0 passed; 0 failed; 1 ignored' "$log"; then status=skipped
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status=failed; msg="hang: no result in 60 s"
  else status=failed
  fi
  if [ "$status" = failed ] && [ -z "${msg:-}" ]; then
    msg=$(grep -A3 'panicked at' "$log" | sed -n '2,4p' | grep -v '^stack backtrace' | tr '\n' ' ' | cut -c1-200)
    [ -n "$msg" ] || msg="exit status $rc, no panic message"
  fi
  printf '%s::%s\t%s\t%s\n' "$bin" "$t" "$status" "${msg:-}" >> "$dir/results.tsv"
}

run_suite() { # name list [env...]
  local name=$1 list=$2; shift 2
  local dir="$results/$name" n=0
  echo "==> redis-rs suite: $name ($(wc -l < "$list") tests, ${REDISRS_JOBS:-2} at a time)"
  mkdir -p "$dir/logs"; : > "$dir/results.tsv"
  while IFS=$'\t' read -r bin exe t; do
    run_one "$dir" "$bin" "$exe" "$t" "$@" &
    n=$((n + 1))
    if [ "$n" -ge "${REDISRS_JOBS:-2}" ]; then wait -n || true; n=$((n - 1)); fi
  done < "$list"
  wait || true
  printf '  passed: %s, failed: %s, skipped: %s\n' "$(grep -c $'\tpassed\t' "$dir/results.tsv")" \
    "$(grep -c $'\tfailed\t' "$dir/results.tsv")" "$(grep -c $'\tskipped\t' "$dir/results.tsv")"
}

shim_env=(PATH="$PWD/$results/shim/bin:$PATH" REDISRS_REAL_SERVER="$real_server"
  REDISRS_SHIM_DIR="$PWD/$results/shim" REDISRS_PROXY_BIN="$proxy_bin")
# The shim must work before 300 tests wait on it: one server through it, PING.
shim_check() {
  local port=$((30000 + RANDOM % 2000)) pid ok=""
  env "${shim_env[@]}" "$results/shim/bin/redis-server" --save "" --port "$port" --bind 127.0.0.1 \
    --logfile "$PWD/$results/shim/check.log" > /dev/null 2>&1 &
  pid=$!
  for _ in $(seq 1 100); do
    if [ "$(redis-cli -p "$port" ping 2>/dev/null)" = PONG ]; then ok=1; break; fi
    sleep 0.1
  done
  kill -9 "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  if [ -z "$ok" ]; then
    echo "the proxy did not answer PING through the shim; its log:" >&2
    cat "$(ls -td "$results"/shim/inst.* | head -n 1)/proxy.log" >&2
    exit 1
  fi
}
if [ -z "$compare_only" ]; then
  run_suite direct "$results/tests.tsv"
  shim_check
  run_suite proxy "$results/tests.tsv" "${shim_env[@]}"
fi

# Compare per test; a test that fails only through the proxy and is not a known
# difference runs once more alone (timing-sensitive tests on a busy 2-core
# machine) and counts as a failure only if it fails again.
compare() { # retry-dir or ""
  python3 - "$results" "$known" "$out" "$REDISRS_VERSION" "${PROTOCOL:-RESP2}" "$1" <<'PY'
import os, sys
results, known_file, out, version, protocol, retry_dir = sys.argv[1:]

def load(run_dir):
    res = {}
    path = os.path.join(run_dir, "results.tsv")
    if os.path.exists(path):
        for line in open(path):
            test_id, status, message = (line.rstrip("\n").split("\t") + ["", ""])[:3]
            res[test_id] = [status, message]
    return res

direct = load(os.path.join(results, "direct"))
proxy = load(os.path.join(results, "proxy"))
retried = load(retry_dir) if retry_dir else {}
flaky = sorted(t for t, (st, _) in retried.items() if st == "passed" and proxy.get(t, ["missing"])[0] != "passed")
for t in flaky:
    proxy[t] = ["passed", ""]
known = {}
for line in open(known_file):
    line = line.strip()
    if line and not line.startswith("#"):
        test_id, _, reason = line.partition(" ")
        known[test_id] = reason.strip()

def counts(r):
    c = {"passed": 0, "failed": 0, "skipped": 0}
    for status, _ in r.values():
        c[status] += 1
    return c

cd, cp = counts(direct), counts(proxy)
proxy_only = sorted(t for t, (s, _) in direct.items() if s == "passed" and proxy.get(t, ["missing"])[0] != "passed")
unexpected = [t for t in proxy_only if t not in known]
fixed = sorted(t for t, (s, _) in proxy.items() if s == "passed" and direct.get(t, ["missing"])[0] == "failed")
stale = sorted(t for t in known if t not in proxy_only)
lines = [f"# redis-rs (redis crate {version}) suite, {protocol}: direct vs through redis-entra-proxy", "",
         "| run | passed | failed | skipped |", "|---|---|---|---|",
         f"| direct (plain redis-server) | {cd['passed']} | {cd['failed']} | {cd['skipped']} |",
         f"| through the proxy | {cp['passed']} | {cp['failed']} | {cp['skipped']} |", "",
         f"Passed directly, not through the proxy: {len(proxy_only)} "
         f"({len(proxy_only) - len(unexpected)} known, {len(unexpected)} unexpected).", ""]
for t in proxy_only:
    status, message = proxy.get(t, ["missing", "not run through the proxy"])
    tag = "known: " + known[t] if t in known else "UNEXPECTED"
    lines.append(f"- `{t}` [{status}] {tag}\n  - {message}")
failed_direct = sorted(t for t, (s, _) in direct.items() if s == "failed")
if failed_direct:
    lines += ["", f"Failed directly (not compared): {len(failed_direct)}", ""]
    lines += [f"- `{t}`: {direct[t][1]}" for t in failed_direct]
if fixed:
    lines += ["", f"Failed directly, passed through the proxy: {len(fixed)}", ""]
    lines += [f"- `{t}`" for t in fixed]
if stale:
    lines += ["", f"Listed as known differences but not failing through the proxy this run: {len(stale)}", ""]
    lines += [f"- `{t}`" for t in stale]
if flaky:
    lines += ["", f"Failed through the proxy, passed when run again alone: {len(flaky)}", ""]
    lines += [f"- `{t}`" for t in flaky]
os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
with open(out, "w") as f:
    f.write("\n".join(lines) + "\n")
print("\n".join(lines[2:8]))
with open(os.path.join(results, "unexpected.txt"), "w") as f:
    f.write("".join(t + "\n" for t in unexpected))
if not direct or not proxy:
    print("a run produced no results; see the logs in " + results, file=sys.stderr)
    sys.exit(1)
if unexpected:
    print(f"\n{len(unexpected)} test(s) pass directly but fail through the proxy and are not in {known_file}:")
    for t in unexpected:
        print(f"  {t}  [{proxy.get(t, ['missing', ''])[1]}]")
    sys.exit(1)
print("\nno unexpected differences")
PY
}

echo "==> comparing (summary: $out)"
if ! compare ""; then
  [ -s "$results/unexpected.txt" ] || exit 1
  echo "==> running the $(wc -l < "$results/unexpected.txt") unexpected failure(s) once more, one binary at a time"
  grep -F -f <(sed 's/^[^:]*:://' "$results/unexpected.txt") "$results/tests.tsv" \
    | while IFS=$'\t' read -r bin exe t; do
        grep -qxF "$bin::$t" "$results/unexpected.txt" && printf '%s\t%s\t%s\n' "$bin" "$exe" "$t"
      done > "$results/retry.tsv" || true
  REDISRS_JOBS=1 run_suite retry "$results/retry.tsv" "${shim_env[@]}"
  compare "$results/retry"
fi
