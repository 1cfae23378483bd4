// An app-like flow with node-redis or ioredis, as apps configure them, against
// HOST:PORT (the proxy, plaintext; or the cache straight, TLS, as the
// reference). Driven by tests/clients.rs; prints one line per step ("ok <step>"
// or "FAIL <step>: <why>") and "steps ok=N failed=M" last. Same environment as
// flow.py, plus LIB (node-redis | ioredis); CLASS: node-redis client |
// client-resp3 | cluster, ioredis redis | cluster.
import { createRequire } from "node:module";
import fs from "node:fs";
import path from "node:path";

const E = process.env;
const require = createRequire(path.resolve(E.NODE_MODULES, "x.js"));
const LIB = E.LIB;
const CLASS = E.CLASS;
const HOST = E.HOST;
const PORT = Number(E.PORT);
const TLS = E.TLS === "1";
const P = E.PREFIX || "flow";
const cluster = CLASS === "cluster";
const results = [];
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function record(step, err) {
  results.push([step, err]);
  console.log(err === undefined ? `ok ${step}` : `FAIL ${step}: ${err}`);
}
const keys = (n, tag = "") => Array.from({ length: n }, (_, i) => `${P}:${tag}${i}`);
function eq(a, b, what) {
  const [x, y] = [JSON.stringify(a), JSON.stringify(b)];
  if (x !== y) throw new Error(`${what}: got ${x}, want ${y}`);
}
const tlsOpts = () =>
  TLS ? { ca: fs.readFileSync(E.CA), checkServerIdentity: () => undefined } : undefined;

// ---- node-redis ----
function nodeRedis() {
  const { createClient, createCluster } = require("redis");
  const socketFor = (host, port) => ({
    host,
    port,
    connectTimeout: 10000,
    ...(TLS ? { tls: true, ...tlsOpts() } : {}),
  });
  const auth = TLS ? { username: E.USER, password: E.PASSWORD } : {};
  const resp = CLASS === "client-resp3" ? { RESP: 3 } : {};
  const make = async () => {
    const c = cluster
      ? createCluster({
          rootNodes: [{ socket: socketFor(HOST, PORT) }],
          defaults: { socket: socketFor(HOST, PORT), ...auth },
        })
      : createClient({ socket: socketFor(HOST, PORT), ...auth, ...resp });
    c.on("error", () => {}); // reconnects are part of the flow
    await c.connect();
    return c;
  };
  const killer = async (host, port) => {
    const k = createClient({ socket: socketFor(host, port), ...auth });
    k.on("error", () => {});
    await k.connect();
    return {
      kill: async (words) => k.sendCommand(["CLIENT", "KILL", ...words, "SKIPME", "yes"]),
      close: async () => k.close(),
    };
  };
  return {
    make,
    killer,
    ping: (c) => (cluster ? c.sendCommand(undefined, true, ["PING"]) : c.ping()),
    set: (c, k, v) => c.set(k, v),
    get: (c, k) => c.get(k),
    pipeline: async (c, sets, gets) => {
      if (cluster) {
        // node-redis pipelines what is sent together (one tick) per node.
        return Promise.all([...sets.map(([k, v]) => c.set(k, v)), ...gets.map((k) => c.get(k))]);
      }
      const m = c.multi();
      sets.forEach(([k, v]) => m.set(k, v));
      gets.forEach((k) => m.get(k));
      return m.execAsPipeline();
    },
    mget: (c, ks) => c.mGet(ks),
    tx: (c, a, b) => c.multi().incr(a).incrBy(b, 5).get(a).exec(),
    del: (c, ks) => Promise.all(ks.map((k) => c.del(k))),
    eval: (c, script, k, args) => c.eval(script, { keys: [k], arguments: args }),
    pubsub: async (c, ch) => {
      const sub = cluster ? c : c.duplicate();
      if (!cluster) {
        sub.on("error", () => {});
        await sub.connect();
      }
      let got;
      await sub.subscribe(ch, (m) => {
        got = m;
      });
      await c.publish(ch, "hello");
      const deadline = Date.now() + 10000;
      while (got === undefined && Date.now() < deadline) await sleep(50);
      await sub.unsubscribe(ch);
      if (!cluster) await sub.close();
      return got;
    },
    blpop: async (c, k, other, timeout) => {
      const r = await c.blPop(k, timeout);
      return r === null ? null : [r.key, r.element];
    },
    rpush: (c, k, v) => c.rPush(k, v),
    close: (c) => c.close(),
  };
}

// ---- ioredis ----
function ioredis() {
  const Redis = require("ioredis");
  const opts = (host, port) => ({
    host,
    port,
    connectTimeout: 10000,
    ...(TLS ? { tls: tlsOpts(), username: E.USER, password: E.PASSWORD } : {}),
  });
  const make = async () => {
    const c = cluster
      ? new Redis.Cluster([{ host: HOST, port: PORT }], {
          redisOptions: opts(HOST, PORT),
          slotsRefreshTimeout: 5000,
        })
      : new Redis(opts(HOST, PORT));
    c.on("error", () => {});
    return c;
  };
  const killer = async (host, port) => {
    const k = new Redis(opts(host, port));
    k.on("error", () => {});
    return {
      kill: async (words) => k.call("CLIENT", "KILL", ...words, "SKIPME", "yes"),
      close: async () => k.quit(),
    };
  };
  const unwrap = (res) =>
    res.map(([err, v]) => {
      if (err) throw err;
      return v;
    });
  return {
    make,
    killer,
    ping: (c) => c.ping(),
    set: (c, k, v) => c.set(k, v),
    get: (c, k) => c.get(k),
    pipeline: async (c, sets, gets) => {
      const p = c.pipeline();
      sets.forEach(([k, v]) => p.set(k, v));
      gets.forEach((k) => p.get(k));
      return unwrap(await p.exec());
    },
    mget: (c, ks) => c.mget(ks),
    tx: async (c, a, b) => unwrap(await c.multi().incr(a).incrby(b, 5).get(a).exec()),
    del: (c, ks) => Promise.all(ks.map((k) => c.del(k))),
    eval: (c, script, k, args) => c.eval(script, 1, k, ...args),
    pubsub: async (c, ch) => {
      const sub = c.duplicate();
      sub.on("error", () => {});
      let got;
      sub.on("message", (_, m) => {
        got = m;
      });
      await sub.subscribe(ch);
      await c.publish(ch, "hello");
      const deadline = Date.now() + 10000;
      while (got === undefined && Date.now() < deadline) await sleep(50);
      sub.disconnect();
      return got;
    },
    blpop: (c, k, other, timeout) => c.blpop(k, timeout),
    rpush: (c, k, v) => c.rpush(k, v),
    close: (c) => c.quit(),
  };
}

const L = LIB === "ioredis" ? ioredis() : nodeRedis();

async function main() {
  const c = await L.make();
  const steps = [
    ["connect", async () => eq(await L.ping(c), "PONG", "PING")],
    [
      "set/get across slots",
      async () => {
        for (const k of keys(20)) eq(await L.set(c, k, "v-" + k), "OK", `SET ${k}`);
        for (const k of keys(20)) eq(await L.get(c, k), "v-" + k, `GET ${k}`);
      },
    ],
    [
      "pipeline",
      async () => {
        // A cluster class pipelines keys of one slot (ioredis refuses others).
        const ks = cluster ? keys(10, `{${P}p}`) : keys(10, "p");
        const out = await L.pipeline(c, ks.map((k) => [k, k]), ks);
        eq(out, [...ks.map(() => "OK"), ...ks], "pipeline");
      },
    ],
    [
      "mget",
      async () => {
        if (cluster) {
          // A cluster app: MGET within one slot, GETs in parallel across.
          const ks = keys(5, `{${P}m}`);
          for (const k of ks) await L.set(c, k, "v-" + k);
          eq(await L.mget(c, ks), ks.map((k) => "v-" + k), "MGET one slot");
          const all = await Promise.all(keys(20).map((k) => L.get(c, k)));
          eq(all, keys(20).map((k) => "v-" + k), "GETs across slots");
        } else {
          eq(await L.mget(c, keys(20)), keys(20).map((k) => "v-" + k), "MGET");
        }
      },
    ],
    [
      "transaction on one slot",
      async () => {
        const a = `{${P}tx}a`;
        const b = `{${P}tx}b`;
        await L.del(c, [a, b]);
        eq(await L.tx(c, a, b), [1, 5, "1"], "MULTI/EXEC");
      },
    ],
    [
      "lua script",
      async () => {
        const k = `${P}:lua`;
        eq(await L.eval(c, "return redis.call('SET', KEYS[1], ARGV[1])", k, ["x"]), "OK", "EVAL SET");
        eq(await L.eval(c, "return redis.call('GET', KEYS[1])", k, []), "x", "EVAL GET");
      },
    ],
    ["pub/sub round trip", async () => eq(await L.pubsub(c, `${P}:chan`), "hello", "message")],
    [
      "blocking pop",
      async () => {
        const k = `${P}:list`;
        await L.del(c, [k]);
        const other = await L.make();
        const push = sleep(300).then(() => L.rpush(other, k, "item"));
        const got = await L.blpop(c, k, other, 10);
        await push;
        await L.close(other);
        eq(got, [k, "item"], "BLPOP");
        eq(await L.blpop(c, k, other, 1), null, "BLPOP timeout");
      },
    ],
    [
      "reconnect after CLIENT KILL",
      async () => {
        const k = keys(1)[0];
        eq(await L.get(c, k), "v-" + k, "before");
        for (const hp of E.KILL_NODES.split(",")) {
          const i = hp.lastIndexOf(":");
          const kl = await L.killer(hp.slice(0, i), Number(hp.slice(i + 1)));
          await kl.kill(E.KILL.split(" "));
          await kl.close();
        }
        const errors = [];
        for (let i = 0; i < 3; i++) {
          try {
            eq(await L.get(c, k), "v-" + k, "after");
            if (errors.length)
              console.log(`  note: reconnected after ${errors.length} error(s): ${errors.join("; ")}`);
            return;
          } catch (e) {
            errors.push(String(e.message || e).slice(0, 120));
            await sleep(500);
          }
        }
        throw new Error(`no reconnect: ${errors.join("; ")}`);
      },
    ],
  ];
  for (const [name, f] of steps) {
    try {
      await Promise.race([
        f(),
        sleep(30000).then(() => {
          throw new Error("timed out after 30 s");
        }),
      ]);
      record(name);
    } catch (e) {
      record(name, String((e && e.message) || e).replace(/\n/g, " "));
    }
  }
  try {
    await L.close(c);
  } catch {
    // closing after a kill may fail; the flow's result stands
  }
  const failed = results.filter(([, e]) => e !== undefined).length;
  console.log(`steps ok=${results.length - failed} failed=${failed}`);
  process.exit(failed ? 1 : 0);
}

main().catch((e) => {
  console.log(`FAIL setup: ${e && e.stack}`);
  console.log("steps ok=0 failed=1");
  process.exit(1);
});
