<?php
// An app-like flow with phpredis (Debian's php-redis), Redis or RedisCluster,
// against HOST:PORT (the proxy, plaintext; or the cache straight, TLS, as
// the reference). Same environment and output as flow.py; CLASS: redis |
// cluster. `php flow.php publish|push` is the helper process that publishes
// or pushes while the flow waits (phpredis's subscribe and BLPOP block).

$E = getenv();
$CLASS = $E['CLASS'];
$HOST = $E['HOST'];
$PORT = (int)$E['PORT'];
$TLS = ($E['TLS'] ?? '') === '1';
$P = $E['PREFIX'] ?? 'flow';
$cluster = $CLASS === 'cluster';
$results = [];

function ctx() {
    global $E;
    return ['cafile' => $E['CA'], 'verify_peer_name' => false];
}

function plain($host, $port) {
    global $TLS, $E;
    $r = new Redis();
    if ($TLS) {
        $r->connect("tls://$host", $port, 10, null, 0, 10, ['stream' => ctx()]);
        $r->auth([$E['USER'], $E['PASSWORD']]);
    } else {
        $r->connect($host, $port, 10, null, 0, 10);
    }
    return $r;
}

function make() {
    global $cluster, $HOST, $PORT, $TLS, $E;
    if (!$cluster) {
        return plain($HOST, $PORT);
    }
    $seed = ($TLS ? 'tls://' : '') . "$HOST:$PORT";
    $auth = $TLS ? [$E['USER'], $E['PASSWORD']] : null;
    return $TLS
        ? new RedisCluster(null, [$seed], 10, 10, false, $auth, ctx())
        : new RedisCluster(null, [$seed], 10, 10, false);
}

function keys($n, $tag = '') {
    global $P;
    $out = [];
    for ($i = 0; $i < $n; $i++) {
        $out[] = "$P:$tag$i";
    }
    return $out;
}

function eq($got, $want, $what) {
    if ($got !== $want) {
        throw new Exception("$what: got " . json_encode($got) . ', want ' . json_encode($want));
    }
}

function helper($what) {
    $cmd = escapeshellarg(PHP_BINARY) . ' ' . escapeshellarg(__FILE__) . ' ' . $what;
    return proc_open($cmd, [], $pipes);
}

// The helper processes.
if (($argv[1] ?? '') === 'publish') {
    usleep(500000);
    $c = make();
    $c->publish("$P:chan", 'hello');
    exit(0);
}
if (($argv[1] ?? '') === 'push') {
    usleep(300000);
    $c = make();
    $c->rPush("$P:list", 'item');
    exit(0);
}

function record($step, $err = null) {
    global $results;
    $results[] = [$step, $err];
    echo $err === null ? "ok $step\n" : "FAIL $step: $err\n";
}

$c = make();
$steps = [
    'connect' => function () use ($c, $cluster) {
        $pong = $cluster ? $c->ping(keys(1)[0]) : $c->ping();
        eq($pong === true || $pong === '+PONG' || $pong === 'PONG', true, 'PING');
    },
    'set/get across slots' => function () use ($c) {
        foreach (keys(20) as $k) eq($c->set($k, "v-$k"), true, "SET $k");
        foreach (keys(20) as $k) eq($c->get($k), "v-$k", "GET $k");
    },
    'pipeline' => function () use ($c, $cluster, $P) {
        // phpredis's RedisCluster has no pipeline: MULTI on one slot instead.
        $ks = $cluster ? keys(10, "{{$P}p}") : keys(10, 'p');
        $p = $cluster ? $c->multi() : $c->pipeline();
        foreach ($ks as $k) $p->set($k, $k);
        foreach ($ks as $k) $p->get($k);
        eq($p->exec(), array_merge(array_fill(0, 10, true), $ks), 'pipeline');
    },
    'mget' => function () use ($c) {
        // phpredis's RedisCluster splits a cross-slot MGET itself.
        eq($c->mget(keys(20)), array_map(fn($k) => "v-$k", keys(20)), 'MGET');
    },
    'transaction on one slot' => function () use ($c, $P) {
        $a = "{{$P}tx}a";
        $b = "{{$P}tx}b";
        $c->del($a, $b);
        eq($c->multi()->incr($a)->incrBy($b, 5)->get($a)->exec(), [1, 5, '1'], 'MULTI/EXEC');
    },
    'lua script' => function () use ($c, $P) {
        $k = "$P:lua";
        eq($c->eval("return redis.call('SET', KEYS[1], ARGV[1])", [$k, 'x'], 1), true, 'EVAL SET');
        eq($c->eval("return redis.call('GET', KEYS[1])", [$k], 1), 'x', 'EVAL GET');
    },
    'pub/sub round trip' => function () use ($P) {
        $sub = make();
        $h = helper('publish');
        $got = null;
        // phpredis 5.3's subscribe loop ends on neither UNSUBSCRIBE, a false
        // return nor an exception from the callback (seen here): it ends at
        // the read timeout, after the message.
        $sub->setOption(Redis::OPT_READ_TIMEOUT, 3);
        try {
            $sub->subscribe(["$P:chan"], function ($r, $ch, $msg) use (&$got) {
                $got = $msg;
                $r->unsubscribe([$ch]);
            });
        } catch (RedisException $e) {
            if ($got === null) throw $e;
        }
        $sub->close();
        proc_close($h);
        eq($got, 'hello', 'message');
    },
    'blocking pop' => function () use ($c, $P) {
        $k = "$P:list";
        $c->del($k);
        $h = helper('push');
        $got = $c->blPop([$k], 10);
        proc_close($h);
        eq($got, [$k, 'item'], 'BLPOP');
        eq($c->blPop([$k], 1), [], 'BLPOP timeout');
    },
    'reconnect after CLIENT KILL' => function () use ($c, $E) {
        $k = keys(1)[0];
        eq($c->get($k), "v-$k", 'before');
        foreach (explode(',', $E['KILL_NODES']) as $hp) {
            $i = strrpos($hp, ':');
            $kl = plain(substr($hp, 0, $i), (int)substr($hp, $i + 1));
            $kl->rawCommand('CLIENT', 'KILL', ...array_merge(explode(' ', $E['KILL']), ['SKIPME', 'yes']));
            $kl->close();
        }
        $errors = [];
        for ($i = 0; $i < 3; $i++) {
            try {
                eq($c->get($k), "v-$k", 'after');
                if ($errors) echo '  note: reconnected after ' . count($errors) . ' error(s): ' . implode('; ', $errors) . "\n";
                return;
            } catch (Throwable $e) {
                $errors[] = get_class($e) . ': ' . $e->getMessage();
                usleep(500000);
            }
        }
        throw new Exception('no reconnect: ' . implode('; ', $errors));
    },
];
foreach ($steps as $name => $f) {
    try {
        $f();
        record($name);
    } catch (Throwable $e) {
        record($name, str_replace("\n", ' ', get_class($e) . ': ' . $e->getMessage()));
    }
}
$failed = count(array_filter($results, fn($r) => $r[1] !== null));
echo 'steps ok=' . (count($results) - $failed) . " failed=$failed\n";
exit($failed ? 1 : 0);
