"""The phases of scripts/hostile.py and the small RESP client they use.

Each phase takes the driver's arguments (ports, pids, paths), runs bounded in
count and time, and returns one line saying what it did and what it saw.
"""
import os
import random
import signal
import socket
import subprocess
import threading
import time

SAMPLE_S = 0.1


def rss_kb(pid):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


# ---------------------------------------------------------------- RESP client
def command(*args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        if isinstance(a, str):
            a = a.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


class Conn:
    """A blocking RESP client for simple replies (+ - : $ and flat arrays)."""

    def __init__(self, port, timeout=10.0):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def _line(self):
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                line, self.buf = self.buf[:i], self.buf[i + 2:]
                return line
            self._fill()

    def _fill(self):
        chunk = self.s.recv(1 << 20)
        if not chunk:
            raise ConnectionError("closed by the proxy")
        self.buf += chunk

    def read(self):
        line = self._line()
        t, rest = line[:1], line[1:]
        if t in (b"+", b":"):
            return rest.decode()
        if t == b"-":
            return RedisError(rest.decode(errors="replace"))
        if t == b"$":
            n = int(rest)
            if n < 0:
                return None
            while len(self.buf) < n + 2:
                self._fill()
            v, self.buf = self.buf[:n], self.buf[n + 2:]
            return v
        if t == b"*":
            return [self.read() for _ in range(max(int(rest), 0))]
        raise ConnectionError("unexpected reply line %r" % line[:60])

    def call(self, *args):
        self.s.sendall(command(*args))
        return self.read()

    def close(self):
        try:
            self.s.close()
        except OSError:
            pass


class RedisError(str):
    pass


# ---------------------------------------------------------------- observers

# ---------------------------------------------------------------- phases

def bad_frames():
    """About 300 different malformed client inputs (deterministic)."""
    rnd = random.Random(8)
    f = []
    for d in (2, 10, 100, 1000, 10000, 100000, 1000000):
        f.append(b"*1\r\n" * d)  # nesting: a command holds bulk strings only
    f.append(b"*2\r\n*1\r\n" * 50000)
    for n in (536870913, 2**31, 2**32 + 1, 2**63 - 1, 2**63, 2**64, 10**30):
        f.append(b"*1\r\n$%d\r\n" % n)
        f.append(b"*%d\r\n" % n)
        f.append(b"*2\r\n$3\r\nGET\r\n$%d\r\nabc" % n)
    for n in (1, 2, 5, 2**31, 2**63):
        f.append(b"*1\r\n$-%d\r\n" % n)
        f.append(b"*-%d\r\n*1\r\n$4\r\nPING\r\n" % n)
        f.append(b"*2\r\n$3\r\nGET\r\n$-%d\r\n" % n)
    f += [
        b"*abc\r\n", b"*1\r\n$x\r\n", b"*1\r\n$ 3\r\nfoo\r\n", b"*+1\r\n", b"*1 \r\n",
        b"*\r\n", b"$\r\n", b"$4\r\nPING\r\n", b"*1\r\n$\r\n", b"*1\r\n$3\r\n\r\n\r\n",
        b"*1\r\n$4\r\nPINGXX", b"*1\r\n$4\r\nPING\n\n", b"*1\r\n$4\r\nPI", b"*01\r\n$04\r\nPING\r\n",
        b"*1\r\n:4\r\n", b"*1\r\n+PING\r\n", b"*1\r\n-PING\r\n", b"*1\r\n*0\r\n",
        b"%1\r\n+a\r\n+b\r\n", b"~1\r\n+a\r\n", b">1\r\n+a\r\n", b"#t\r\n", b",1.5\r\n",
        b"(123\r\n", b"=5\r\ntxt:a\r\n", b"_\r\n", b"|1\r\n+a\r\n+b\r\n*1\r\n$4\r\nPING\r\n",
        b'SET k "abc\r\n', b"SET k 'abc\r\n", b'SET k "a\\"\r\n', b'SET "k"x v\r\n',
        b"SET 'k'x v\r\n", b'ECHO "\\xZZ"\r\n', b'ECHO "\\x4\r\n', b'"\r\n', b"'\r\n",
        b'SET k "unterminated' + b" x" * 40000 + b"\r\n",
        b"A" * 100000, b"PING " + b"x" * 70000 + b"\r\n", b"\r\n" * 10000,
        b"\n" * 10000, b"\x00" * 1000, b"\x00\r\n", b"\xff\xfe\xfd\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"POST / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(rnd.randrange(256) for _ in range(500)),
        b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$100\r\nabc",
        b"*1048577\r\n", b"*1\r\n$536870912\r\n",
        b"*2\r\n$4\r\nECHO\r\n$3\r\nabcd\r\n", b"*2\r\n$4\r\nECHO\r\n$5\r\nabc\r\n",
    ]
    valid = command("SET", "fuzz:k", "value-1234567890")
    while len(f) < 300:
        kind = rnd.randrange(3)
        if kind == 0:  # binary junk
            f.append(bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 4096))))
        else:  # a valid command with bytes flipped, inserted or cut
            b = bytearray(valid * rnd.randrange(1, 4))
            for _ in range(rnd.randrange(1, 6)):
                i = rnd.randrange(len(b))
                op = rnd.randrange(3)
                if op == 0:
                    b[i] = rnd.randrange(256)
                elif op == 1:
                    b.insert(i, rnd.choice(b"*$\r\n-:0123456789\"'\\"))
                elif len(b) > 1:
                    del b[i]
            f.append(bytes(b))
    return f


def send_bad(port, frame):
    """Send one bad frame; wait up to 2 s for a reply or close: the outcome."""
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
    except OSError as e:
        return "connect failed: %s" % e
    got, closed = b"", False
    try:
        try:
            s.sendall(frame)
        except OSError:
            pass  # the proxy may close before it has read everything
        s.settimeout(2.0)
        end = time.monotonic() + 2.0
        while time.monotonic() < end and len(got) < 4096:
            try:
                c = s.recv(4096)
            except socket.timeout:
                break
            except OSError:
                closed = True
                break
            if not c:
                closed = True
                break
            got += c
    finally:
        s.close()
    first = got[:1]
    if first == b"-":
        kind = "error"
    elif got:
        kind = "reply"
    else:
        kind = "none"
    return kind + ("+closed" if closed else "+open")


def phase_malformed(a):
    frames = bad_frames()
    outcomes = {}
    lock = threading.Lock()
    it = iter(enumerate(frames))

    def worker():
        while True:
            with lock:
                nxt = next(it, None)
            if nxt is None:
                return
            o = send_bad(a.port, nxt[1])
            with lock:
                outcomes[o] = outcomes.get(o, 0) + 1

    ts = [threading.Thread(target=worker) for _ in range(32)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=120)
    return "%d frames: %s" % (len(frames), " ".join(
        "%s=%d" % kv for kv in sorted(outcomes.items())))


def phase_slowloris(a, n=300, step=0.1):
    """n connections each sending one SET a byte at a time (one byte per
    connection every `step` s); then every reply is read and checked."""
    frames, socks = [], []
    for i in range(n):
        if i % 2:
            frames.append(command("SET", "slow:%d" % i, "v%d" % i))
        else:
            frames.append(b"SET slow:%d v%d\r\n" % (i, i))  # inline
        s = socket.create_connection(("127.0.0.1", a.port), timeout=5)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        socks.append(s)
    longest = max(len(f) for f in frames)
    deadline = time.monotonic() + 60
    for pos in range(longest):
        for s, f in zip(socks, frames):
            if pos < len(f):
                try:
                    s.sendall(f[pos:pos + 1])
                except OSError:
                    pass
        if time.monotonic() > deadline:
            break
        time.sleep(step)
    ok = bad = 0
    for i, s in enumerate(socks):
        s.settimeout(5)
        try:
            r = s.recv(64)
            ok += r == b"+OK\r\n"
            bad += r != b"+OK\r\n"
        except OSError:
            bad += 1
        s.close()
    c = Conn(a.port)
    wrong = sum(c.call("GET", "slow:%d" % i) != b"v%d" % i for i in range(n))
    c.call("DEL", *["slow:%d" % i for i in range(n)])
    c.close()
    return "%d conns, %d bytes each at %.0f ms/byte: +OK %d, other %d, values wrong %d" % (
        n, longest, step * 1000, ok, bad, wrong)


def phase_idle(a, n=5000, rounds=3, hold=5.0):
    notes = []
    for r in range(rounds):
        socks, failed_connect = [], 0
        deadline = time.monotonic() + 60
        for _ in range(n):
            if time.monotonic() > deadline:
                break
            try:
                s = socket.create_connection(("127.0.0.1", a.port), timeout=5)
                socks.append(s)
            except OSError:
                failed_connect += 1
        ping = command("PING")
        for s in socks:
            try:
                s.sendall(ping)
            except OSError:
                pass
        pong = 0
        for s in socks:
            s.settimeout(10)
            try:
                pong += s.recv(16) == b"+PONG\r\n"
            except OSError:
                pass
        held = rss_kb(a.proxy_pid)
        time.sleep(hold)
        for s in socks:
            s.close()
        time.sleep(2)
        notes.append("round %d: %d open, %d PONG, %d connect failed, RSS held %d kB, 2 s after close %d kB"
                     % (r + 1, len(socks), pong, failed_connect, held, rss_kb(a.proxy_pid)))
    return "; ".join(notes)


def phase_unread_gets(a, n=400, size=1 << 20, hold=8.0):
    c = Conn(a.port)
    c.call("SET", "hostile:big", b"x" * size)
    c.close()
    s = socket.create_connection(("127.0.0.1", a.port), timeout=5)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    s.sendall(command("GET", "hostile:big") * n)
    peak = 0
    end = time.monotonic() + hold
    while time.monotonic() < end:
        peak = max(peak, rss_kb(a.proxy_pid))
        time.sleep(SAMPLE_S)
    s.close()
    c = Conn(a.port)
    c.call("DEL", "hostile:big")
    c.close()
    return "%d GET of a %d MB value sent, none read, held %.0f s, then closed (RSS while held up to %d kB)" % (
        n, size >> 20, hold, peak)


def phase_monitor(a, writers=4, per_writer=15000, value=1024, batch=50):
    mon = socket.create_connection(("127.0.0.1", a.port), timeout=5)
    mon.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    mon.sendall(command("MONITOR"))
    mon.settimeout(5)
    first = mon.recv(5)
    errs = [0] * writers
    done = [0] * writers
    payload = b"m" * value

    def write(w):
        try:
            c = Conn(a.port)
        except OSError:
            errs[w] += per_writer
            return
        deadline = time.monotonic() + 60
        for i in range(0, per_writer, batch):
            if time.monotonic() > deadline:
                break
            try:
                c.s.sendall(b"".join(command("SET", "mon:%d:%d" % (w, i + j), payload)
                                     for j in range(batch)))
                for _ in range(batch):
                    r = c.read()
                    errs[w] += r != "OK"
                    done[w] += 1
            except (OSError, ConnectionError, ValueError):
                errs[w] += 1
                break
        c.close()

    ts = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    t0 = time.monotonic()
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=120)
    took = time.monotonic() - t0
    # Was the MONITOR client cut off? Drain what it was sent, up to 15 s.
    mon.settimeout(1)
    drained, closed = 0, False
    end = time.monotonic() + 15
    while time.monotonic() < end:
        try:
            c = mon.recv(1 << 20)
        except socket.timeout:
            break
        except OSError:
            closed = True
            break
        if not c:
            closed = True
            break
        drained += len(c)
    mon.close()
    c = Conn(a.port)
    for w in range(writers):
        keys = ["mon:%d:%d" % (w, i) for i in range(per_writer)]
        for k in range(0, len(keys), 1000):
            c.call("DEL", *keys[k:k + 1000])
    c.close()
    return ("MONITOR %r; %d writers x %d SET of %d B in %.1f s: %d ok, %d errors; "
            "monitor client %s after %.1f MB reached it" % (
                first[:5].decode(errors="replace"), writers, per_writer, value, took,
                sum(done), sum(errs), "closed by the proxy" if closed else "still open",
                drained / 1e6))


def phase_pause(a, secs=4.0):
    os.kill(a.redis_pid, signal.SIGSTOP)
    time.sleep(secs)
    os.kill(a.redis_pid, signal.SIGCONT)
    return "redis-server SIGSTOP for %.0f s, then SIGCONT" % secs


def phase_kill(a, down=2.0):
    os.kill(a.redis_pid, signal.SIGKILL)
    try:
        os.waitpid(a.redis_pid, 0)
    except ChildProcessError:
        pass
    time.sleep(down)
    t = time.monotonic()
    proc = subprocess.Popen(["redis-server", a.redis_conf],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    a.redis_pid = proc.pid
    with open(a.redis_pid_file, "w") as f:
        f.write(str(proc.pid))
    # Recovered: a fresh client's SET through the proxy works (bounded 30 s).
    recovered = None
    while time.monotonic() - t < 30:
        try:
            c = Conn(a.port, timeout=5)
            r = c.call("SET", "hostile:restart", "1")
            c.close()
            if r == "OK":
                recovered = time.monotonic() - t
                break
        except (OSError, ConnectionError, ValueError):
            pass
        time.sleep(0.1)
    return "redis-server SIGKILL, down %.0f s, restarted; service back %s after the restart" % (
        down, "%.1f s" % recovered if recovered is not None else "NOT within 30 s")


PHASES = [
    ("malformed", phase_malformed),
    ("slowloris", phase_slowloris),
    ("idle-5000", phase_idle),
    ("unread-400x1MB-GET", phase_unread_gets),
    ("monitor-unread", phase_monitor),
    ("upstream-pause", phase_pause),
    ("upstream-kill-restart", phase_kill),
]

