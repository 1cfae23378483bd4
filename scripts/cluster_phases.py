"""The phases of scripts/cluster-phases.sh: drives the cluster through a
reshard, a CLUSTER FAILOVER, a kill -9 and a SIGSTOP while bench/phases_load.rs
loads the proxy; samples the proxy's connections on every node and its RSS;
reads every acknowledged write back from the cluster; writes the report.

Every wait is bounded in count and time; every node is sent SIGCONT on the way
out. The admin password of the nodes comes from $ADMIN_PASS (never printed).
"""
import argparse
import csv
import os
import re
import select
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hostile_phases import Conn, RedisError, rss_kb  # noqa: E402

SAMPLE_S = 0.5


# ------------------------------------------------------------ cluster access
def crc16(data):
    crc = 0
    for b in data:
        crc ^= b << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def key_slot(key):
    k = key.encode()
    s = k.find(b"{")
    if s >= 0:
        e = k.find(b"}", s + 1)
        if e > s + 1:
            k = k[s + 1:e]
    return crc16(k) % 16384


class NodeConn(Conn):
    """hostile_phases.Conn over TLS, authenticated as the nodes' admin."""

    def __init__(self, port, ca, timeout=2.0):
        ctx = ssl.create_default_context(cafile=ca)
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.s = ctx.wrap_socket(raw, server_hostname="localhost")
        self.buf = b""
        r = self.call("AUTH", "admin", os.environ["ADMIN_PASS"])
        if isinstance(r, RedisError):
            raise ConnectionError("AUTH refused on %d" % port)


class Cluster:
    def __init__(self, a):
        self.a = a
        self.ports = a.ports

    def pid_file(self, port):
        return os.path.join(self.a.work, "node-%d" % self.ports.index(port), "server.pid")

    def pid(self, port):
        with open(self.pid_file(port)) as f:
            return int(f.read().strip())

    def call(self, port, *args, timeout=2.0):
        c = NodeConn(port, self.a.ca, timeout)
        try:
            return c.call(*args)
        finally:
            c.close()

    def any_call(self, *args, skip=()):
        """The first answer from a node that answers (not one of `skip`)."""
        for p in self.ports:
            if p in skip:
                continue
            try:
                r = self.call(p, *args, timeout=1.0)
                if not isinstance(r, RedisError):
                    return r
            except (OSError, ConnectionError):
                pass
        raise ConnectionError("no node answers %s" % args[0])

    def slots(self, skip=()):
        """slot -> primary port, as a node that answers sees it."""
        owner = [None] * 16384
        for r in self.any_call("CLUSTER", "SLOTS", skip=skip):
            port = int(r[2][1])
            for s in range(int(r[0]), int(r[1]) + 1):
                owner[s] = port
        return owner

    def nodes(self, port=None, skip=()):
        """port -> (id, flags, primary id or '-')."""
        text = self.call(port, "CLUSTER", "NODES") if port else self.any_call("CLUSTER", "NODES", skip=skip)
        out = {}
        for line in text.decode().splitlines():
            f = line.split()
            p = int(f[1].split("@")[0].rsplit(":", 1)[1])
            out[p] = (f[0], f[2], f[3])
        return out

    def replicas_of(self, port):
        n = self.nodes(skip=())
        pid = n[port][0]
        return [p for p, (_, flags, m) in n.items() if m == pid and "fail" not in flags]

    def check(self, log):
        """`redis-cli --cluster check` until all nodes agree and every slot is
        covered with no open slot (bounded: 90 tries, about 90 s)."""
        env = dict(os.environ, REDISCLI_AUTH=os.environ["ADMIN_PASS"])
        out = ""
        for i in range(90):
            for p in self.ports:
                try:
                    out = subprocess.run(
                        ["redis-cli", "--tls", "--cacert", self.a.ca, "--user", "admin",
                         "--cluster", "check", "127.0.0.1:%d" % p],
                        env=env, capture_output=True, text=True, timeout=10).stdout
                except subprocess.TimeoutExpired:
                    continue
                break
            if ("All nodes agree about slots configuration" in out
                    and "All 16384 slots covered" in out and "[WARNING]" not in out
                    and "[ERR]" not in out):
                return i
            time.sleep(1)
        log("cluster check did not settle in 90 s: %s" % out[-300:])
        return -1

    def restart(self, port):
        i = self.ports.index(port)
        conf = os.path.join(self.a.work, "node-%d" % i, "redis.conf")
        p = subprocess.Popen(["redis-server", os.path.abspath(conf)], start_new_session=True)
        with open(self.pid_file(port), "w") as f:
            f.write(str(p.pid))
        return p


# ------------------------------------------------------------ sampler
class Sampler(threading.Thread):
    """Every 0.5 s: the proxy's connections on every node (CLIENT LIST lines
    of its token users), connected_clients, the proxy's RSS."""

    def __init__(self, a):
        super().__init__(daemon=True)
        self.a = a
        self.stop = threading.Event()
        self.samples = []  # (t, phase, {port: n or None}, rss_kb)
        self.phase = "start"
        self.conns = {}

    def count(self, port):
        c = self.conns.get(port)
        try:
            if c is None:
                c = self.conns[port] = NodeConn(port, self.a.ca, timeout=0.5)
            r = c.call("CLIENT", "LIST")
            if isinstance(r, RedisError):
                raise ConnectionError(r)
            return sum(1 for line in r.decode().splitlines()
                       if " user=%s" % self.a.oid_prefix in line)
        except (OSError, ConnectionError, ValueError):
            if c is not None:
                c.close()
            self.conns.pop(port, None)
            return None

    def run(self):
        for _ in range(100000):
            if self.stop.is_set():
                break
            t = time.time()
            counts = {p: self.count(p) for p in self.a.ports}
            self.samples.append((t, self.phase, counts, rss_kb(self.a.proxy_pid)))
            self.stop.wait(max(0.0, SAMPLE_S - (time.time() - t)))


# ------------------------------------------------------------ phases
def wait_until(pred, seconds, step=0.2):
    end = time.time() + seconds
    while time.time() < end:
        try:
            if pred():
                return True
        except (OSError, ConnectionError, ValueError, TypeError, IndexError):
            pass
        time.sleep(step)
    return False


def run(a):
    cl = Cluster(a)
    t0 = time.time()

    def log(msg):
        print("[%6.1fs] %s" % (time.time() - t0, msg), flush=True)

    sampler = Sampler(a)
    out = os.path.join(a.work, "load")
    driver = subprocess.Popen(
        [a.driver, "--addr", "127.0.0.1:%d" % a.proxy_port, "--out", out,
         "--clients", str(a.clients), "--slow-ms", str(a.slow_ms),
         "--max-seconds", "1200"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = driver.stdout.readline()
    log("driver: %s" % line.strip())
    sampler.start()
    phases = []  # dicts: name, start, end, action, affected (set of slots)
    stopped = []

    def begin(name, action):
        cl.check(log)
        time.sleep(1)
        sampler.phase = name
        driver.stdin.write("phase %s\n" % name)
        driver.stdin.flush()
        # The driver says when its clients see the new phase; then half a
        # second, so that what was sent before is answered before the fault
        # (events go to the phase their command was sent in).
        if select.select([driver.stdout], [], [], 10)[0]:
            driver.stdout.readline()
        time.sleep(0.5)
        ph = {"name": name, "action": action, "start": time.time(), "affected": set(), "notes": []}
        phases.append(ph)
        log("phase %s: %s" % (name, action))
        return ph

    def hold_until(ph, seconds):
        left = ph["start"] + seconds - time.time()
        if left > 0:
            time.sleep(left)

    def end(ph):
        ph["end"] = time.time()

    P = a.phase_seconds
    try:
        # 1. steady
        ph = begin("steady", "load only")
        hold_until(ph, P)
        end(ph)

        # 2. reshard 1000 slots from the seed's shard to the shard of slot 14000
        before = cl.slots()
        src, dst = before[0], before[14000]
        n = cl.nodes()
        ph = begin("reshard", "redis-cli --cluster reshard: 1000 slots from %d to %d" % (src, dst))
        env = dict(os.environ, REDISCLI_AUTH=os.environ["ADMIN_PASS"])
        t = ph["t_action"] = time.time()
        try:
            r = subprocess.run(
                ["redis-cli", "--tls", "--cacert", a.ca, "--user", "admin", "--cluster", "reshard",
                 "127.0.0.1:%d" % src, "--cluster-from", n[src][0], "--cluster-to", n[dst][0],
                 "--cluster-slots", "1000", "--cluster-yes"],
                env=env, capture_output=True, text=True, timeout=240)
            rc = r.returncode
            with open(os.path.join(a.work, "reshard.log"), "w") as f:
                f.write(r.stdout + r.stderr)
        except subprocess.TimeoutExpired:
            rc = "timeout (240 s)"
        ph["notes"].append("reshard took %.1f s (exit %s)" % (time.time() - t, rc))
        after = cl.slots()
        ph["affected"] = {s for s in range(16384) if before[s] != after[s]}
        ph["notes"].append("%d slots moved" % len(ph["affected"]))
        hold_until(ph, max(P, time.time() - ph["start"] + 10))
        end(ph)

        # 3. CLUSTER FAILOVER on a replica of the shard of slot 8000
        owner = cl.slots()
        prim = owner[8000]
        reps = cl.replicas_of(prim)
        ph = begin("failover", "CLUSTER FAILOVER on %s, replica of %d" % (reps[0] if reps else "?", prim))
        ph["affected"] = {s for s in range(16384) if owner[s] == prim}
        t = ph["t_action"] = time.time()
        r = cl.call(reps[0], "CLUSTER", "FAILOVER")
        ok = wait_until(lambda: cl.slots()[8000] == reps[0], 30)
        ph["notes"].append("CLUSTER FAILOVER answered %s; %d %s after %.1f s" % (
            r, reps[0], "primary" if ok else "NOT primary", time.time() - t))
        hold_until(ph, P)
        end(ph)

        # 4. kill -9 of the primary of slot 3000 (the proxy's seed node), restarted after 15 s
        owner = cl.slots()
        victim = owner[3000]
        ph = begin("kill-9", "kill -9 of primary %d, restarted 15 s later" % victim)
        ph["affected"] = {s for s in range(16384) if owner[s] == victim}
        t = ph["t_action"] = time.time()
        os.kill(cl.pid(victim), signal.SIGKILL)
        ok = wait_until(lambda: cl.slots(skip=(victim,))[3000] != victim, 30)
        ph["notes"].append("replica %s after %.1f s" % ("promoted" if ok else "NOT promoted", time.time() - t))
        hold_until(ph, 15)
        cl.restart(victim)
        t2 = time.time()
        ok = wait_until(lambda: b"master_link_status:up" in cl.call(victim, "INFO", "replication"), 30)
        ph["notes"].append("restarted at +%.0f s; %s after %.1f s" % (
            t2 - t, "replica in sync" if ok else "replica NOT in sync", time.time() - t2))
        hold_until(ph, max(P, 40))
        end(ph)

        # 5. SIGSTOP of the primary of slot 14000 for 15 s
        owner = cl.slots()
        frozen = owner[14000]
        ph = begin("SIGSTOP", "SIGSTOP of primary %d for 15 s, then SIGCONT" % frozen)
        ph["affected"] = {s for s in range(16384) if owner[s] == frozen}
        t = ph["t_action"] = time.time()
        pid = cl.pid(frozen)
        os.kill(pid, signal.SIGSTOP)
        stopped.append(pid)
        ok = wait_until(lambda: cl.slots(skip=(frozen,))[14000] != frozen, 15)
        ph["notes"].append("replica %s after %.1f s" % ("promoted" if ok else "NOT promoted (in 15 s)", time.time() - t))
        hold_until(ph, 15)
        os.kill(pid, signal.SIGCONT)
        stopped.remove(pid)
        hold_until(ph, max(P, 35))
        end(ph)

        # 6. steady again
        ph = begin("after", "load only, after everything")
        hold_until(ph, P)
        end(ph)
    finally:
        for pid in stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except OSError:
                pass
        try:
            driver.stdin.write("stop\n")
            driver.stdin.flush()
        except OSError:
            pass
        try:
            rest = driver.communicate(timeout=120)[0]
            log("driver: %s" % rest.strip().replace("\n", "; "))
        except subprocess.TimeoutExpired:
            driver.kill()
            log("driver did not stop in 120 s: killed")
        sampler.stop.set()
        sampler.join(timeout=10)
    cl.check(log)
    readback = read_back(a, cl, out, log)
    return phases, sampler.samples, readback, time.time() - t0


# ------------------------------------------------------------ read-back
def read_back(a, cl, out, log):
    """Every acknowledged write, straight from the primaries: per phase,
    lost writes, lost increments, queue items lost or consumed twice."""
    writes, counters, pushed, consumed = defaultdict(list), {}, defaultdict(dict), defaultdict(list)
    with open(os.path.join(out, "acked.csv")) as f:
        for row in csv.DictReader(f):
            if row["type"] == "write":
                writes[key_slot(row["key"])].append(
                    (row["key"], row["value"], row["phase"], int(row["unsure"])))
            elif row["type"] == "counter":
                counters[row["key"]] = (int(row["value"]), int(row["unsure"]))
            elif row["type"] == "pushed":
                pushed[row["key"]][int(row["value"])] = row["phase"]
            else:
                consumed[row["key"]].append(int(row["value"]))
    owner = cl.slots()
    conns = {}

    def call(slot, *args):
        for _ in range(3):
            p = owner[slot]
            try:
                if p not in conns:
                    conns[p] = NodeConn(p, a.ca, timeout=10)
                r = conns[p].call(*args)
            except (OSError, ConnectionError):
                conns.pop(p, None)
                time.sleep(1)
                continue
            if isinstance(r, RedisError) and r.startswith(("MOVED", "ASK")):
                owner[:] = cl.slots()
                continue
            return r
        raise ConnectionError("read-back failed for slot %d" % slot)

    res = defaultdict(lambda: defaultdict(int))
    lost = {}
    for slot, rows in writes.items():
        for i in range(0, len(rows), 500):
            chunk = rows[i:i + 500]
            got = call(slot, "MGET", *[k for k, _, _, _ in chunk])
            for (k, v, ph, ms), g in zip(chunk, got):
                res[ph]["writes"] += 1
                if g != v.encode():
                    res[ph]["lost"] += 1
                    lost.setdefault(ph, []).append((ms, k, g))
    for k, (n, unsure) in counters.items():
        ph = k.rsplit(":", 1)[1]
        v = call(key_slot(k), "GET", k)
        v = int(v) if v else 0
        res[ph]["incr"] += n
        if v < n:
            res[ph]["incr_lost"] += n - v
        if v > n + unsure:
            res[ph]["incr_extra"] += v - n - unsure
    for q, items in pushed.items():
        left = call(key_slot(q), "LRANGE", q, "0", "-1")
        left = [int(x) for x in left]
        seen = defaultdict(int)
        for x in consumed[q] + left:
            seen[x] += 1
        for item, ph in items.items():
            res[ph]["pushed"] += 1
            if seen[item] == 0:
                res[ph]["q_lost"] += 1
            elif seen[item] > 1:
                res[ph]["q_twice"] += 1
    for ph, v in lost.items():
        res[ph]["lost_list"] = sorted(v)
    for c in conns.values():
        c.close()
    log("read back %d writes, %d counters, %d queues" % (
        sum(len(v) for v in writes.values()), len(counters), len(pushed)))
    return res


# ------------------------------------------------------------ report
def normalize(text):
    text = re.sub(r"slot \d+", "slot N", text)
    text = re.sub(r"MOVED \d+", "MOVED N", text)
    text = re.sub(r"ASK \d+", "ASK N", text)
    text = re.sub(r"\d+(\.\d+)?s\b", "Ns", text)
    text = re.sub(r"os error \d+", "os error N", text)
    return text[:140]


def report(a, phases, samples, readback, seconds):
    out = os.path.join(a.work, "load")
    kinds, slot_of = {}, {}
    with open(os.path.join(out, "clients.csv")) as f:
        for r in csv.DictReader(f):
            kinds[int(r["client"])] = r["kind"]
            slot_of[int(r["client"])] = int(r["slot"])
    events = []
    with open(os.path.join(out, "events.csv")) as f:
        for r in csv.DictReader(f):
            events.append(r)
    pubsub = {}
    with open(os.path.join(out, "pubsub.csv")) as f:
        for r in csv.DictReader(f):
            pubsub[r["phase"]] = r
    by_name = {p["name"]: p for p in phases}
    rows = []
    texts = {}
    for ph in phases:
        aff = ph["affected"]
        st = {k: 0 for k in ("err_aff", "err_oth", "err_ps")}
        cl_aff, cl_oth, cl_ps = set(), set(), set()
        slow_aff, slow_oth, hung = set(), set(), set()
        wait_aff = wait_oth = 0
        gaps = []
        tx = defaultdict(lambda: [0, 0, 0])  # text -> [affected, others, pub/sub]
        for e in events:
            if e["phase"] != ph["name"]:
                continue
            c = int(e["client"])
            slot = slot_of.get(c, -1)
            where = 2 if slot < 0 else (0 if slot in aff else 1)
            if e["event"] in ("error", "closed", "hung", "wrong"):
                key = ("err_aff", "err_oth", "err_ps")[where]
                st[key] += 1
                (cl_aff, cl_oth, cl_ps)[where].add(c)
                tx[normalize("%s: %s" % (e["event"], e["detail"]))][where] += 1
                if e["event"] == "hung":
                    hung.add(c)
            elif e["event"] == "slow":
                ms = int(e["detail"])
                if where == 0:
                    slow_aff.add(c)
                    wait_aff = max(wait_aff, ms)
                else:
                    slow_oth.add(c)
                    wait_oth = max(wait_oth, ms)
            elif e["event"] == "gap":
                gaps.append(int(e["detail"].split()[0]))
        texts[ph["name"]] = tx
        n_aff = sum(1 for c, s in slot_of.items() if s >= 0 and s in aff)
        n_oth = sum(1 for c, s in slot_of.items() if s >= 0 and s not in aff)
        win = [s for s in samples if ph["start"] <= s[0] <= ph["end"]]
        pre = [s for s in samples if s[0] < ph["start"]]
        post = [s for s in samples if s[0] > ph["end"]]
        before = pre[-1] if pre else (win[0] if win else None)
        after = win[-1] if win else None
        conns = {}
        # The peak of the phase counts its starting point too.
        win_b = ([before] if before else []) + win
        for p in a.ports:
            vals = [s[2][p] for s in win_b if s[2][p] is not None]
            conns[p] = (before[2][p] if before else None, max(vals) if vals else None,
                        after[2][p] if after else None)
        rss = (before[3] if before else 0, max((s[3] for s in win_b), default=0), after[3] if after else 0)
        rb = readback.get(ph["name"], {})
        ps = pubsub.get(ph["name"], {})
        rows.append({
            "phase": ph["name"], "action": ph["action"], "notes": "; ".join(ph["notes"]),
            "seconds": round(ph["end"] - ph["start"], 1),
            "clients_affected": n_aff, "clients_others": n_oth,
            "errors_affected": st["err_aff"], "error_clients_affected": len(cl_aff),
            "errors_others": st["err_oth"], "error_clients_others": len(cl_oth),
            "errors_pubsub": st["err_ps"],
            "slow_clients_affected": len(slow_aff), "slow_clients_others": len(slow_oth),
            "longest_wait_ms_affected": wait_aff, "longest_wait_ms_others": wait_oth,
            "hung_clients": len(hung),
            "writes_acked": rb.get("writes", 0), "writes_lost": rb.get("lost", 0),
            "lost_examples": lost_text(ph, rb.get("lost_list", [])),
            "incr_acked": rb.get("incr", 0), "incr_lost": rb.get("incr_lost", 0),
            "incr_extra": rb.get("incr_extra", 0),
            "queue_pushed": rb.get("pushed", 0), "queue_lost": rb.get("q_lost", 0),
            "queue_twice": rb.get("q_twice", 0),
            "published": int(ps.get("published", 0)),
            "published_to_nobody": int(ps.get("published_to_nobody", 0)),
            "received": int(ps.get("received", 0)),
            "longest_silence_ms": max(gaps, default=0),
            "conns": conns, "rss": rss,
        })
    return rows, texts


def lost_text(ph, lost):
    """The first lost writes: key, what was read back, when acknowledged
    relative to the phase's fault."""
    t = ph.get("t_action", ph["start"])
    return "; ".join("%s = %s, acknowledged at %+.2f s" % (k, "(none)" if g is None else g.decode(errors="replace"),
                                                        ms / 1000.0 - t) for ms, k, g in lost[:8])


def fmt_conn(t):
    return "/".join("-" if v is None else str(v) for v in t)


def write_outputs(a, rows, texts, seconds):
    with open(a.csv, "w", newline="") as f:
        w = csv.writer(f)
        head = [k for k in rows[0] if k not in ("conns", "rss")]
        w.writerow(head + ["conns_%d_before_peak_after" % p for p in a.ports]
                   + ["rss_kb_before", "rss_kb_peak", "rss_kb_after"])
        for r in rows:
            w.writerow([r[k] for k in head] + [fmt_conn(r["conns"][p]) for p in a.ports]
                       + list(r["rss"]))
    findings = ""
    if os.path.exists(a.md):
        with open(a.md) as f:
            m = re.search(r"^## Findings.*", f.read(), re.S | re.M)
            findings = m.group(0) if m else ""
    with open(a.machine) as f:
        machine = f.read().strip()
    L = []
    L.append("# A clustered cache in trouble, under load: phase by phase")
    L.append("")
    L.append("`%s`: %d clients through the proxy (release build) in front of a local "
             "six-node TLS-only Redis Cluster (three primaries, three replicas, ACL users, "
             "Entra tokens from the token emulator), through the phases below, each bounded "
             "in time. Total run time of the script's phases and read-back: %.0f s." % (
                 a.command, a.clients, seconds))
    L.append("")
    L.append("Clients (`bench/phases_load.rs`), each on the keys of one hash slot, slots spread "
             "evenly: 75 %% writers (`SET` of a new key, `INCR`, `GET`), 15 %% `MULTI; SET; INCR; "
             "EXEC`, 5 %% a `BLPOP ... 1` consumer and `RPUSH` pusher per queue, 5 %% a "
             "publisher and a plain `SUBSCRIBE` subscriber per channel; each paces itself at a "
             "round every 50 ms. \"Affected\" clients are those whose slot belonged to the shard "
             "hit in that phase (for the reshard: whose slot moved); pub/sub clients use "
             "channels (no slot) and are counted apart. An error is an error reply, a lost "
             "connection, a wrong reply or a hung request (no reply in 45 s); \"slow\" is a "
             "reply later than %d ms (BLPOP: beyond its 1 s block). Lost writes: every "
             "acknowledged `SET` (and transaction) read back with MGET straight from the "
             "primaries at the end, by the phase it was acknowledged in; increments and queue "
             "items likewise. Connections: the proxy's (CLIENT LIST lines of its token users) "
             "on each node, sampled every 0.5 s: the last sample before the phase / the peak "
             "during it / the last sample of the phase (`-`: the node did not answer)." % a.slow_ms)
    L.append("")
    L.append("Machine and build:")
    L.append("")
    L.append(machine)
    L.append("")
    L.append("## What was done")
    L.append("")
    L.append("| phase | action | seconds | observed |")
    L.append("|---|---|---|---|")
    for r in rows:
        L.append("| %s | %s | %.0f | %s |" % (r["phase"], r["action"], r["seconds"], r["notes"] or "-"))
    L.append("")
    L.append("## Errors and stalls seen by clients")
    L.append("")
    L.append("| phase | clients affected / others | errors, affected shard (clients) | errors, other shards (clients) | errors, pub/sub | slow clients affected / others | longest wait affected / others (ms) | hung clients |")
    L.append("|---|---|---|---|---|---|---|---|")
    for r in rows:
        L.append("| %s | %d / %d | %d (%d) | %d (%d) | %d | %d / %d | %d / %d | %d |" % (
            r["phase"], r["clients_affected"], r["clients_others"],
            r["errors_affected"], r["error_clients_affected"],
            r["errors_others"], r["error_clients_others"], r["errors_pubsub"],
            r["slow_clients_affected"], r["slow_clients_others"],
            r["longest_wait_ms_affected"], r["longest_wait_ms_others"], r["hung_clients"]))
    L.append("")
    L.append("## Acknowledged data read back")
    L.append("")
    L.append("| phase | writes acked | lost | INCR acked | lost | more than sent | queue items pushed | lost | consumed twice | PUBLISH acked | to nobody | messages received | longest subscriber silence (ms) |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        L.append("| %s | %d | %d | %d | %d | %d | %d | %d | %d | %d | %d | %d | %d |" % (
            r["phase"], r["writes_acked"], r["writes_lost"], r["incr_acked"], r["incr_lost"],
            r["incr_extra"], r["queue_pushed"], r["queue_lost"], r["queue_twice"],
            r["published"], r["published_to_nobody"], r["received"], r["longest_silence_ms"]))
    L.append("")
    L.append("## The proxy's upstream connections per node, and its RSS")
    L.append("")
    L.append("before / peak / after each phase")
    L.append("")
    L.append("| phase | " + " | ".join(str(p) for p in a.ports) + " | RSS kB |")
    L.append("|---|" + "---|" * len(a.ports) + "---|")
    for r in rows:
        L.append("| %s | %s | %s |" % (r["phase"], " | ".join(fmt_conn(r["conns"][p]) for p in a.ports),
                                       "/".join(str(x) for x in r["rss"])))
    L.append("")
    L.append("## Distinct error texts")
    L.append("")
    L.append("Numbers, slots and durations replaced by N; counts affected shard / other shards / pub/sub.")
    L.append("")
    for r in rows:
        tx = texts[r["phase"]]
        if not tx:
            L.append("- %s: none" % r["phase"])
            continue
        L.append("- %s:" % r["phase"])
        for t, (x, y, z) in sorted(tx.items(), key=lambda kv: -sum(kv[1]))[:15]:
            L.append("  - `%s`: %d / %d / %d" % (t.replace("`", "'"), x, y, z))
        if len(tx) > 15:
            L.append("  - ... and %d more texts (see the CSV's run directory)" % (len(tx) - 15))
    lost = [r for r in rows if r["lost_examples"]]
    if lost:
        L.append("")
        L.append("Lost writes, the first ones (key = what the read-back found; when the write was acknowledged, from the phase's fault):")
        L.append("")
        for r in lost:
            L.append("- %s: `%s`" % (r["phase"], r["lost_examples"]))
    L.append("")
    L.append("Per-phase figures as CSV: `%s`. Warnings and errors in the proxy's log: %d." % (
        a.csv, count_log(a.proxy_log)))
    if findings:
        L.append("")
        L.append(findings.rstrip())
    with open(a.md, "w") as f:
        f.write("\n".join(L) + "\n")


def count_log(path):
    try:
        with open(path, errors="replace") as f:
            return sum(1 for line in f if " WARN " in line or " ERROR " in line)
    except OSError:
        return 0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--proxy-port", type=int, required=True)
    p.add_argument("--proxy-pid", type=int, required=True)
    p.add_argument("--proxy-log", required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--ports", type=int, nargs=6, required=True)
    p.add_argument("--oid-prefix", required=True)
    p.add_argument("--driver", required=True)
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--phase-seconds", type=float, default=30)
    p.add_argument("--slow-ms", type=int, default=2000)
    p.add_argument("--machine", required=True)
    p.add_argument("--md", required=True)
    p.add_argument("--csv", required=True)
    p.add_argument("--command", required=True)
    a = p.parse_args()
    phases, samples, readback, seconds = run(a)
    rows, texts = report(a, phases, samples, readback, seconds)
    write_outputs(a, rows, texts, seconds)


if __name__ == "__main__":
    main()
