# An app-like flow with redis-rb (Debian's ruby-redis), plain or in its
# cluster mode (Redis.new(cluster: [...])), against HOST:PORT (the proxy,
# plaintext; or the cache straight, TLS, as the reference). Same environment
# and output as flow.py; CLASS: redis | cluster.
require "redis"
require "json"

E = ENV
CLASS = E.fetch("CLASS")
HOST = E.fetch("HOST")
PORT = Integer(E.fetch("PORT"))
TLS = E["TLS"] == "1"
P = E.fetch("PREFIX", "flow")
CLUSTER = CLASS == "cluster"
$results = []

def opts(host = HOST, port = PORT)
  o = { host: host, port: port, timeout: 10 }
  if TLS
    o.merge!(ssl: true, ssl_params: { ca_file: E["CA"], verify_hostname: false },
             username: E["USER"], password: E["PASSWORD"])
  end
  o
end

def make
  return Redis.new(**opts) unless CLUSTER
  scheme = TLS ? "rediss" : "redis"
  o = { cluster: ["#{scheme}://#{HOST}:#{PORT}"], timeout: 10 }
  if TLS
    o.merge!(ssl_params: { ca_file: E["CA"], verify_hostname: false },
             username: E["USER"], password: E["PASSWORD"])
  end
  Redis.new(**o)
end

def keys(n, tag = "")
  (0...n).map { |i| "#{P}:#{tag}#{i}" }
end

def eq(got, want, what)
  raise "#{what}: got #{got.to_json}, want #{want.to_json}" unless got == want
end

c = make
steps = {
  "connect" => -> { eq(c.ping, "PONG", "PING") },
  "set/get across slots" => lambda {
    keys(20).each { |k| eq(c.set(k, "v-#{k}"), "OK", "SET #{k}") }
    keys(20).each { |k| eq(c.get(k), "v-#{k}", "GET #{k}") }
  },
  "pipeline" => lambda {
    # redis-rb's cluster mode pipelines keys of one node: one slot here.
    ks = CLUSTER ? keys(10, "{#{P}p}") : keys(10, "p")
    out = c.pipelined do |p|
      ks.each { |k| p.set(k, k) }
      ks.each { |k| p.get(k) }
    end
    eq(out, ["OK"] * 10 + ks, "pipeline")
  },
  "mget" => lambda {
    if CLUSTER
      # A cluster app: MGET within one slot, GETs across.
      ks = keys(5, "{#{P}m}")
      ks.each { |k| c.set(k, "v-#{k}") }
      eq(c.mget(*ks), ks.map { |k| "v-#{k}" }, "MGET one slot")
      eq(keys(20).map { |k| c.get(k) }, keys(20).map { |k| "v-#{k}" }, "GETs across slots")
    else
      eq(c.mget(*keys(20)), keys(20).map { |k| "v-#{k}" }, "MGET")
    end
  },
  "transaction on one slot" => lambda {
    a = "{#{P}tx}a"
    b = "{#{P}tx}b"
    c.del(a, b)
    out = c.multi do |m|
      m.incr(a)
      m.incrby(b, 5)
      m.get(a)
    end
    eq(out, [1, 5, "1"], "MULTI/EXEC")
  },
  "lua script" => lambda {
    k = "#{P}:lua"
    eq(c.eval("return redis.call('SET', KEYS[1], ARGV[1])", keys: [k], argv: ["x"]), "OK", "EVAL SET")
    eq(c.eval("return redis.call('GET', KEYS[1])", keys: [k]), "x", "EVAL GET")
  },
  "pub/sub round trip" => lambda {
    sub = make
    pub = make
    got = nil
    t = Thread.new do
      sleep 0.5
      pub.publish("#{P}:chan", "hello")
    end
    sub.subscribe_with_timeout(10, "#{P}:chan") do |on|
      on.message do |_ch, msg|
        got = msg
        sub.unsubscribe
      end
    end
    t.join
    eq(got, "hello", "message")
  },
  "blocking pop" => lambda {
    k = "#{P}:list"
    c.del(k)
    other = make
    t = Thread.new do
      sleep 0.3
      other.rpush(k, "item")
    end
    got = c.blpop(k, timeout: 10)
    t.join
    eq(got, [k, "item"], "BLPOP")
    eq(c.blpop(k, timeout: 1), nil, "BLPOP timeout")
  },
  "reconnect after CLIENT KILL" => lambda {
    k = keys(1)[0]
    eq(c.get(k), "v-#{k}", "before")
    E.fetch("KILL_NODES").split(",").each do |hp|
      host, _, port = hp.rpartition(":")
      kl = Redis.new(**opts(host, Integer(port)))
      kl.call("CLIENT", "KILL", *E.fetch("KILL").split, "SKIPME", "yes")
      kl.close
    end
    errors = []
    3.times do
      begin
        eq(c.get(k), "v-#{k}", "after")
        puts "  note: reconnected after #{errors.size} error(s): #{errors.join('; ')}" unless errors.empty?
        return
      rescue StandardError => e
        errors << "#{e.class}: #{e.message}"[0, 120]
        sleep 0.5
      end
    end
    raise "no reconnect: #{errors.join('; ')}"
  }
}
steps.each do |name, f|
  begin
    f.call
    $results << [name, nil]
    puts "ok #{name}"
  rescue StandardError => e
    $results << [name, e]
    puts "FAIL #{name}: #{e.class}: #{e.message.tr("\n", ' ')}"
  end
  $stdout.flush
end
failed = $results.count { |_, e| e }
puts "steps ok=#{$results.size - failed} failed=#{failed}"
exit(failed.zero? ? 0 : 1)
