"""An app-like flow with redis-py, as apps configure it: one of the client
classes (Redis, RedisCluster, asyncio Redis, asyncio RedisCluster) against
HOST:PORT (the proxy, plaintext; or the cache straight, TLS, as the
reference). Driven by tests/clients.rs; prints one line per step
("ok <step>" or "FAIL <step>: <why>") and "steps ok=N failed=M" last.

Environment: CLASS (redis|cluster|asyncio|asyncio-cluster), HOST, PORT,
TLS (1: TLS with CA, USER, PASSWORD), KILL (CLIENT KILL filter words, e.g.
"TYPE normal"), KILL_NODES (host:port,... to send it to), PREFIX (keys).
"""

import asyncio
import os
import sys
import threading
import time

import redis
import redis.asyncio as aredis
from redis.asyncio.cluster import RedisCluster as ARedisCluster
from redis.cluster import RedisCluster

E = os.environ
CLASS = E["CLASS"]
HOST, PORT = E["HOST"], int(E["PORT"])
TLS = E.get("TLS") == "1"
P = E.get("PREFIX", "flow")
results = []


def opts():
    o = {"host": HOST, "port": PORT, "socket_timeout": 10, "socket_connect_timeout": 10}
    if TLS:
        o.update(ssl=True, ssl_ca_certs=E["CA"], ssl_check_hostname=False,
                 username=E["USER"], password=E["PASSWORD"])
    return o


def record(step, err=None):
    results.append((step, err))
    if err is not None and E.get("TRACE") == "1":
        import traceback
        traceback.print_exc()
    print(f"ok {step}" if err is None else f"FAIL {step}: {err}", flush=True)


def note_errors(errors):
    """The errors the app saw before its command went through again."""
    if errors:
        print(f"  note: reconnected after {len(errors)} error(s): "
              + "; ".join(type(e).__name__ for e in errors), flush=True)


def kill_others():
    """CLIENT KILL <filter> SKIPME yes on every node the client uses, from a
    connection of its own."""
    for hp in E["KILL_NODES"].split(","):
        h, p = hp.rsplit(":", 1)
        o = opts()
        o.update(host=h, port=int(p))
        k = redis.Redis(**o)
        k.execute_command("CLIENT", "KILL", *E["KILL"].split(), "SKIPME", "yes")
        k.close()


def keys(n, tag=""):
    return [f"{P}:{tag}{i}" for i in range(n)]


def sync_flow():
    cluster = CLASS == "cluster"
    c = RedisCluster(**opts()) if cluster else redis.Redis(**opts())
    steps = []

    def step(name):
        def wrap(f):
            steps.append((name, f))
            return f
        return wrap

    @step("connect")
    def _():
        assert c.ping() is True

    @step("set/get across slots")
    def _():
        for k in keys(20):
            assert c.set(k, "v-" + k) is True
        for k in keys(20):
            assert c.get(k) == ("v-" + k).encode(), k

    @step("pipeline")
    def _():
        p = c.pipeline(transaction=False)
        for k in keys(10, "p"):
            p.set(k, k)
        for k in keys(10, "p"):
            p.get(k)
        out = p.execute()
        assert out == [True] * 10 + [k.encode() for k in keys(10, "p")], out

    @step("mget")
    def _():
        ks = keys(20)
        # A cluster class refuses cross-slot MGET itself: its apps use
        # mget_nonatomic (or hash tags).
        got = c.mget_nonatomic(ks) if cluster else c.mget(ks)
        assert got == [("v-" + k).encode() for k in ks], got

    @step("transaction on one slot")
    def _():
        a, b = f"{{{P}tx}}a", f"{{{P}tx}}b"
        c.delete(a, b)
        p = c.pipeline(transaction=True)
        p.incr(a)
        p.incrby(b, 5)
        p.get(a)
        assert p.execute() == [1, 5, b"1"]

    @step("lua script")
    def _():
        k = f"{P}:lua"
        assert c.eval("return redis.call('SET', KEYS[1], ARGV[1])", 1, k, "x") == b"OK"
        s = c.register_script("return redis.call('GET', KEYS[1])")
        assert s(keys=[k]) == b"x"

    @step("pub/sub round trip")
    def _():
        ps = c.pubsub()
        ch = f"{P}:chan"
        ps.subscribe(ch)
        deadline = time.time() + 10
        got = None
        sent = False
        while time.time() < deadline and got is None:
            m = ps.get_message(timeout=0.5)
            if m and m["type"] == "subscribe" and not sent:
                n = c.publish(ch, "hello")
                if n == 0:
                    print("  note: PUBLISH answered 0 receivers (the message arrived)", flush=True)
                sent = True
            if m and m["type"] == "message":
                got = m["data"]
        ps.close()
        assert got == b"hello", got

    @step("blocking pop")
    def _():
        k = f"{P}:list"
        c.delete(k)
        other = RedisCluster(**opts()) if cluster else redis.Redis(**opts())
        t = threading.Timer(0.3, lambda: other.rpush(k, "item"))
        t.start()
        got = c.blpop([k], timeout=10)
        t.join()
        other.close()
        assert got == (k.encode(), b"item"), got
        assert c.blpop([k], timeout=1) is None

    @step("reconnect after CLIENT KILL")
    def _():
        k = keys(1)[0]
        assert c.get(k) is not None
        kill_others()
        errors = []
        for _ in range(3):
            try:
                assert c.get(k) == ("v-" + k).encode()
                note_errors(errors)
                return
            except Exception as e:  # noqa: BLE001 - what the app sees
                errors.append(e)
        raise AssertionError(f"no reconnect: {errors!r}")

    for name, f in steps:
        try:
            f()
            record(name)
        except Exception as e:  # noqa: BLE001 - every failure is reported
            record(name, repr(e))
    c.close()


async def async_flow():
    cluster = CLASS == "asyncio-cluster"
    c = ARedisCluster(**opts()) if cluster else aredis.Redis(**opts())

    async def connect():
        assert await c.ping() is True

    async def across():
        for k in keys(20):
            assert await c.set(k, "v-" + k) is True
        for k in keys(20):
            assert await c.get(k) == ("v-" + k).encode()

    async def pipeline():
        p = c.pipeline(transaction=False)
        for k in keys(10, "p"):
            p.set(k, k)
        for k in keys(10, "p"):
            p.get(k)
        out = await p.execute()
        assert out == [True] * 10 + [k.encode() for k in keys(10, "p")], out

    async def mget():
        ks = keys(20)
        got = await (c.mget_nonatomic(ks) if cluster else c.mget(ks))
        assert got == [("v-" + k).encode() for k in ks], got

    async def tx():
        a, b = f"{{{P}tx}}a", f"{{{P}tx}}b"
        await c.delete(a, b)
        p = c.pipeline(transaction=True)
        p.incr(a)
        p.incrby(b, 5)
        p.get(a)
        assert await p.execute() == [1, 5, b"1"]

    async def lua():
        k = f"{P}:lua"
        assert await c.eval("return redis.call('SET', KEYS[1], ARGV[1])", 1, k, "x") == b"OK"
        s = c.register_script("return redis.call('GET', KEYS[1])")
        assert await s(keys=[k]) == b"x"

    async def pubsub():
        if cluster:
            # redis-py's asyncio RedisCluster has no pubsub(): apps use a
            # plain asyncio connection to one node for it.
            ps_client = aredis.Redis(**opts())
        else:
            ps_client = c
        ps = ps_client.pubsub()
        ch = f"{P}:chan"
        await ps.subscribe(ch)
        deadline = time.time() + 10
        got, sent = None, False
        while time.time() < deadline and got is None:
            m = await ps.get_message(timeout=0.5)
            if m and m["type"] == "subscribe" and not sent:
                await ps_client.publish(ch, "hello")
                sent = True
            if m and m["type"] == "message":
                got = m["data"]
        await ps.aclose()
        if cluster:
            await ps_client.aclose()
        assert got == b"hello", got

    async def blocking():
        k = f"{P}:list"
        await c.delete(k)
        other = ARedisCluster(**opts()) if cluster else aredis.Redis(**opts())

        async def push():
            await asyncio.sleep(0.3)
            await other.rpush(k, "item")

        t = asyncio.create_task(push())
        got = await c.blpop([k], timeout=10)
        await t
        await other.aclose()
        assert list(got) == [k.encode(), b"item"], got
        assert await c.blpop([k], timeout=1) is None

    async def reconnect():
        k = keys(1)[0]
        assert await c.get(k) is not None
        kill_others()
        errors = []
        for _ in range(3):
            try:
                assert await c.get(k) == ("v-" + k).encode()
                note_errors(errors)
                return
            except Exception as e:  # noqa: BLE001 - what the app sees
                errors.append(e)
        raise AssertionError(f"no reconnect: {errors!r}")

    for name, f in [("connect", connect), ("set/get across slots", across),
                    ("pipeline", pipeline), ("mget", mget),
                    ("transaction on one slot", tx), ("lua script", lua),
                    ("pub/sub round trip", pubsub), ("blocking pop", blocking),
                    ("reconnect after CLIENT KILL", reconnect)]:
        try:
            await asyncio.wait_for(f(), 30)
            record(name)
        except Exception as e:  # noqa: BLE001
            record(name, repr(e))
    await c.aclose()


if CLASS.startswith("asyncio"):
    asyncio.run(async_flow())
else:
    sync_flow()
failed = sum(1 for _, e in results if e is not None)
print(f"steps ok={len(results) - failed} failed={failed}", flush=True)
sys.exit(1 if failed else 0)
