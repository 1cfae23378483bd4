#!/usr/bin/env python3
"""Hostile and fault phases against a running proxy (driven by scripts/hostile.sh).

Standard library only, loopback only, every loop bounded in count and time.
One canary client runs a checked INCR/GET loop the whole time; per phase the
driver records the proxy's RSS (before, peak sampled every 100 ms, 5 s after),
the canary's errors and latency, whether the proxy is still up, its
errors_total from /metrics, and new panics in its log. One CSV row per phase.

  hostile.py run --port P --admin-port A --proxy-pid PID --redis-pid PID \
      --redis-conf FILE --redis-pid-file FILE --proxy-log FILE --run N --csv OUT
  hostile.py report --csv OUT --machine FILE --command CMD > bench/HOSTILE.md
"""
import argparse
import csv
import os
import socket
import sys
import threading
import time

from hostile_phases import PHASES, Conn, RedisError, rss_kb

SETTLE_S = 5.0  # "after" is sampled this long after a phase ended
SAMPLE_S = 0.1

FIELDS = [
    "variant", "run", "phase", "seconds", "rss_before_kb", "rss_peak_kb", "rss_after_kb",
    "after_over_start", "canary_ops", "canary_errors", "canary_p99_ms",
    "canary_max_ms", "proxy_up", "errors_total_delta", "error_kinds",
    "panics", "outcome",
]



def proxy_up(pid):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("State:"):
                    return "Z" not in line.split()[1]
    except OSError:
        return False
    return False


def metrics(admin_port):
    """errors_total by kind from /metrics ({} if the admin server does not answer)."""
    try:
        s = socket.create_connection(("127.0.0.1", admin_port), timeout=5)
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        data = b""
        while True:
            c = s.recv(65536)
            if not c:
                break
            data += c
        s.close()
    except OSError:
        return None
    kinds = {}
    for line in data.decode(errors="replace").splitlines():
        if line.startswith("redis_entra_proxy_errors_total{"):
            label = line[line.find('kind="') + 6:]
            kinds[label[:label.find('"')]] = float(line.rsplit(" ", 1)[1])
    return kinds


def panics(log):
    try:
        with open(log, errors="replace") as f:
            return sum(1 for line in f if "panicked" in line)
    except OSError:
        return 0


class Sampler(threading.Thread):
    """RSS of the proxy every 100 ms; peak since the last reset."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, 0, threading.Event()
        self.lock = threading.Lock()

    def reset(self):
        with self.lock:
            self.peak = rss_kb(self.pid)

    def run(self):
        while not self.stop.wait(SAMPLE_S):
            r = rss_kb(self.pid)
            with self.lock:
                self.peak = max(self.peak, r)


class Canary(threading.Thread):
    """INCR canary:n then check the value (and a GET every 10th op); any wrong
    reply, error reply, timeout or lost connection is one error, after which
    it reconnects and re-reads the counter. Stats per phase (reset by `take`)."""

    def __init__(self, port):
        super().__init__(daemon=True)
        self.port, self.stop = port, threading.Event()
        self.lock = threading.Lock()
        self.lat, self.errors, self.samples = [], 0, []
        self.conn, self.expect = None, None

    def _connect(self):
        self.conn = Conn(self.port, timeout=10)
        v = self.conn.call("GET", "canary:n")
        if isinstance(v, RedisError):
            raise ConnectionError(v)
        self.expect = int(v or 0)

    def _record(self, ms, err, what=""):
        with self.lock:
            self.lat.append(ms)
            if err:
                self.errors += 1
                if len(self.samples) < 3:
                    self.samples.append(what[:120])

    def take(self):
        with self.lock:
            lat, errs, samples = self.lat, self.errors, self.samples
            self.lat, self.errors, self.samples = [], 0, []
        return lat, errs, samples

    def run(self):
        i = 0
        while not self.stop.is_set():
            t = time.monotonic()
            try:
                if self.conn is None:
                    self._connect()
                v = self.conn.call("INCR", "canary:n")
                if isinstance(v, RedisError) or int(v) != self.expect + 1:
                    raise ValueError("INCR gave %r, expected %d" % (v, self.expect + 1))
                self.expect += 1
                i += 1
                if i % 10 == 0:
                    g = self.conn.call("GET", "canary:n")
                    if g != str(self.expect).encode():
                        raise ValueError("GET gave %r, expected %d" % (g, self.expect))
                self._record((time.monotonic() - t) * 1000, False)
            except (OSError, ValueError, ConnectionError) as e:
                self._record((time.monotonic() - t) * 1000, True, "%s: %s" % (type(e).__name__, e))
                if self.conn:
                    self.conn.close()
                self.conn = None
                self.stop.wait(0.1)
            self.stop.wait(0.005)


def p(values, q):
    if not values:
        return 0.0
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


# ---------------------------------------------------------------- phases


def run(a):
    sampler = Sampler(a.proxy_pid)
    sampler.start()
    canary = Canary(a.port)
    canary.start()
    time.sleep(3)  # warm up: pools dialled, canary running
    canary.take()
    start = rss_kb(a.proxy_pid)
    rows = []
    names = a.only.split(",") if a.only else [n for n, _ in PHASES]
    for name, fn in PHASES:
        if name not in names:
            continue
        before = rss_kb(a.proxy_pid)
        m0, p0 = metrics(a.admin_port) or {}, panics(a.proxy_log)
        sampler.reset()
        canary.take()
        t0 = time.monotonic()
        try:
            outcome = fn(a)
        except Exception as e:  # a phase that could not finish is a finding, not a crash
            outcome = "PHASE FAILED: %s: %s" % (type(e).__name__, e)
        secs = time.monotonic() - t0
        time.sleep(SETTLE_S)
        after = rss_kb(a.proxy_pid)
        lat, errs, samples = canary.take()
        m1 = metrics(a.admin_port)
        up = proxy_up(a.proxy_pid) and m1 is not None
        m1 = m1 or {}
        delta = {k: v - m0.get(k, 0) for k, v in m1.items() if v - m0.get(k, 0)}
        if samples:
            outcome += " | canary saw: " + " / ".join(samples)
        row = {
            "variant": a.variant, "run": a.run, "phase": name, "seconds": "%.1f" % secs,
            "rss_before_kb": before, "rss_peak_kb": max(sampler.peak, before, after),
            "rss_after_kb": after, "after_over_start": "%.2f" % (after / start if start else 0),
            "canary_ops": len(lat), "canary_errors": errs,
            "canary_p99_ms": "%.1f" % p(lat, 0.99), "canary_max_ms": "%.1f" % max(lat or [0]),
            "proxy_up": "yes" if up else "NO",
            "errors_total_delta": int(sum(delta.values())),
            "error_kinds": " ".join("%s=%d" % (k, v) for k, v in sorted(delta.items())),
            "panics": panics(a.proxy_log) - p0, "outcome": outcome,
        }
        rows.append(row)
        print("%-22s rss %6d -> %6d -> %6d kB  canary err %d p99 %s ms  up %s  errors+%d  %s"
              % (name, before, row["rss_peak_kb"], after, errs, row["canary_p99_ms"],
                 row["proxy_up"], row["errors_total_delta"], outcome), file=sys.stderr, flush=True)
        if not up:
            break
    end = rss_kb(a.proxy_pid)
    rows.append({"variant": a.variant, "run": a.run, "phase": "end (all clients gone)", "rss_before_kb": start,
                 "rss_peak_kb": "", "rss_after_kb": end,
                 "after_over_start": "%.2f" % (end / start if start else 0),
                 "proxy_up": "yes" if proxy_up(a.proxy_pid) else "NO",
                 "outcome": "RSS at the start of the run (after warm-up) and at its end"})
    canary.stop.set()
    sampler.stop.set()
    canary.join(timeout=15)
    new = not os.path.exists(a.csv) or os.path.getsize(a.csv) == 0
    with open(a.csv, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow(r)


def report(a):
    with open(a.csv) as f:
        rows = list(csv.DictReader(f))
    with open(a.machine) as f:
        machine = f.read().strip()
    out = sys.stdout
    out.write("# Hostile and fault runs\n\n")
    out.write("Generated by `%s` (scripts/hostile.sh and scripts/hostile.py); raw figures in "
              "[hostile.csv](hostile.csv). Loopback only: one TLS redis-server 7.0.15, the proxy "
              "(release build, auth.source = static; limits as each variant says), the driver in Python. "
              "Each variant and run starts a fresh stack.\n\n" % a.command)
    out.write("## Machine\n\n%s\n\n" % machine)
    out.write(__doc_figures__)
    variants = []
    for r in rows:
        if r["variant"] not in variants:
            variants.append(r["variant"])
    cols = [k for k in FIELDS[1:-1] if k != "error_kinds"]
    for v in variants:
        out.write("\n## Results: %s\n\n" % v)
        out.write("| run | phase | s | RSS before kB | peak kB | 5 s after kB | after/start | canary ops | "
                  "canary errors | canary p99 ms | canary max ms | proxy up | errors_total + | panics |\n")
        out.write("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
        for r in rows:
            if r["variant"] == v:
                out.write("| %s |\n" % " | ".join(r[k] for k in cols))
    out.write("\n## What each phase did and saw\n\n")
    for r in rows:
        kinds = " (%s)" % r["error_kinds"] if r.get("error_kinds") else ""
        out.write("- %s, run %s, **%s**: %s%s\n" % (r["variant"], r["run"], r["phase"], r["outcome"], kinds))


__doc_figures__ = """## What the figures mean

- **RSS before / peak / 5 s after**: the proxy's VmRSS (`/proc/PID/status`) just before
  the phase, the highest value sampled every 100 ms from its start until 5 s after it
  ended, and the value 5 s after it ended. **after/start**: RSS 5 s after the phase
  divided by RSS at the start of the run (after a 3 s warm-up with the canary running).
- **canary**: one client doing `INCR canary:n` and checking the value (plus a checked
  `GET` every 10th), about 150 ops/s, for the whole run. **ops** and **errors** count
  its commands during the phase and the 5 s after it; an error is an error reply, a
  wrong value, a 10 s timeout or a lost connection (it then reconnects and re-reads
  the counter). **p99 / max** are its latencies in that window.
- **proxy up**: the process is alive and its admin server answers `/metrics`.
- **errors_total +**: growth of the sum of `redis_entra_proxy_errors_total` during the
  phase and its 5 s; the kinds are listed below the table.
- **panics**: new lines with `panicked` in the proxy's log.
- In the upstream phases the canary's errors are expected: the server is stopped or
  gone; what matters there is that they are clear errors, bounded in time, and that
  service comes back by itself.
"""


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--port", type=int, required=True)
    r.add_argument("--admin-port", type=int, required=True)
    r.add_argument("--proxy-pid", type=int, required=True)
    r.add_argument("--redis-pid", type=int, required=True)
    r.add_argument("--redis-conf", required=True)
    r.add_argument("--redis-pid-file", required=True)
    r.add_argument("--proxy-log", required=True)
    r.add_argument("--run", type=int, default=1)
    r.add_argument("--variant", default="default")
    r.add_argument("--csv", required=True)
    r.add_argument("--only", default="", help="comma-separated phase names")
    rep = sub.add_parser("report")
    rep.add_argument("--csv", required=True)
    rep.add_argument("--machine", required=True)
    rep.add_argument("--command", required=True)
    a = ap.parse_args()
    if a.cmd == "run":
        run(a)
    else:
        report(a)


if __name__ == "__main__":
    main()
