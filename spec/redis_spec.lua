-- redis: against the sandbox's Redis, cross-checked with redis-cli.
package.path = "spec/sandbox/?.lua;" .. package.path
local sb = require("sandbox_helper")
local redis = require("redis")
local json = require("json")
local host = require("runbook.host")
local cli = require("spec.support.cli")

local function url() return sb.env("REDIS_URL") end

-- redis-cli runs outside the dry run a test may have set (a dry run refuses io.popen).
local function rcli(args)
  local mode = host.mode()
  host.set_mode("run")
  local out, ok = sb.redis(args)
  host.set_mode(mode)
  assert(ok, out)
  return (out:gsub("%s+$", ""))
end

local function raises(f, ...)
  local ok, err = pcall(f, ...)
  assert.is_false(ok, "expected an error")
  assert.is_table(err, "expected a structured error, got " .. tostring(err))
  return err
end

local effects
local r
local SPEC_KEYS = { "rb:spec:str", "rb:spec:list", "rb:spec:n", "rb:spec:dry", "rb:spec:hash", "rb:spec:bin" }
setup(function()
  r = redis.connect(url())
  r:command("DEL", table.unpack(SPEC_KEYS))
end)
teardown(function()
  host.set_mode("run")
  host.set_effect_sink(nil)
  if r then
    pcall(r.ping, r)
    r:command("DEL", table.unpack(SPEC_KEYS))
    r:close()
  end
  cli.cleanup()
end)

describe("redis.connect", function()
  it("connects with the URL's password and database, names itself, and keeps the password secret", function()
    assert.are.equal("PONG", r:ping())
    assert.matches("name=runbook", rcli("CLIENT LIST"))
    assert.are.equal("***", host.redact(url():match("//[^:]*:([^@]+)@")))
  end)

  it("defaults to REDIS_URL", function()
    local c <close> = redis.connect()
    assert.are.equal("PONG", c:ping())
  end)

  local bad = {
    { "rediss://u:secret-pass-1@127.0.0.1:1/0", "connection_refused", "rediss://127.0.0.1:1: connecting: Connection refused" },
    { "http://127.0.0.1:1", "invalid_url", "expected a redis://" },
    { "redis://127.0.0.1:notaport/0", "invalid_url", "port" },
    { "redis://127.0.0.1:1/0", "connection_refused", "redis://127.0.0.1:1: connecting: Connection refused" },
  }
  for _, b in ipairs(bad) do
    it("raises " .. b[2] .. " for " .. b[1]:gsub("secret%-pass%-1", "***"), function()
      local err = raises(redis.connect, b[1])
      assert.are.same({ "redis", "connect", b[2] }, { err.module, err.op, err.code })
      assert.matches(b[3], err.message)
      assert.is_nil(err.message:find("secret-pass-1", 1, true))
    end)
  end

  it("tries each address of a name: rbtwo is ::1 first, the server listens on 127.0.0.1 only", function()
    -- the run gets a mount namespace of its own whose /etc/hosts lists ::1 before 127.0.0.1
    -- (as Debian's does for localhost); not root, it maps itself to root in a user namespace
    local unshare = { "unshare", sb.sh("id -u"):match("%d+") == "0" and "-m" or "-rm" }
    if not os.execute(table.concat(unshare, " ") .. " true 2>/dev/null") then
      return pending("this machine cannot make a mount namespace (" .. table.concat(unshare, " ") .. ")")
    end
    local hosts = cli.tmpdir() .. "/hosts"
    local f = assert(io.open(hosts, "w"))
    f:write("::1 rbtwo\n127.0.0.1 rbtwo\n")
    f:close()
    local rb = cli.runbook([[
name = "two-addresses"
description = "ping Redis by a name with two addresses"
step "Ping" { run = function() log.info("redis says %s", redis.connect():ping()) end }
]])
    local r = cli.run({ "run", rb, "--yes" }, { REDIS_URL = (url():gsub("127%.0%.0%.1", "rbtwo")) },
      { unshare[1], unshare[2], "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"', hosts })
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("redis says PONG", r.stdout)
  end)

  it("raises WRONGPASS for a wrong password, without printing it", function()
    local err = raises(redis.connect, (url():gsub("//([^:]*):[^@]+@", "//%1:wrong-pass-99@")))
    assert.are.equal("WRONGPASS", err.code)
    assert.is_nil(err.message:find("wrong-pass-99", 1, true))
  end)
end)

describe("redis replies", function()
  local cases = {
    { "status", { "SET", "rb:spec:str", "v" }, "OK" },
    { "bulk string", { "GET", "rb:spec:str" }, "v" },
    { "empty bulk string", { "GETRANGE", "rb:spec:str", 5, 6 }, "" },
    { "nil", { "GET", "rb:spec:missing" }, nil },
    { "integer", { "INCRBY", "rb:spec:n", 9007199254740993 }, 9007199254740993 },
    { "negative integer", { "DECRBY", "rb:spec:n", 9007199254740994 }, -1 },
    { "float as a bulk string", { "INCRBYFLOAT", "rb:spec:n", "1.5" }, "0.5" },
    { "array", { "RPUSH", "rb:spec:list", "a", "b", "c" }, 3 },
    { "array of bulk strings", { "LRANGE", "rb:spec:list", 0, -1 }, { "a", "b", "c" } },
    { "empty array", { "LRANGE", "rb:spec:missing", 0, -1 }, {} },
    { "nil inside an array", { "MGET", "rb:spec:str", "rb:spec:missing" }, { "v", json.null } },
    { "nested arrays", { "SCAN", 0, "MATCH", "rb:spec:str", "COUNT", 100000 }, function(v)
      return type(v[1]) == "string" and type(v[2]) == "table" end },
  }
  for _, c in ipairs(cases) do
    it("round-trips a " .. c[1], function()
      local v = r:command(table.unpack(c[2]))
      if type(c[3]) == "function" then assert.is_true(c[3](v))
      else
        assert.are.same(c[3], v)
        if math.type(c[3]) then assert.are.equal("integer", math.type(v)) end
      end
    end)
  end

  it("keeps binary values intact both ways, as redis-cli sees them", function()
    local bytes = "a\0b\255\r\nz"
    r:command("SET", "rb:spec:bin", bytes)
    assert.are.equal(bytes, r:command("GET", "rb:spec:bin"))
    assert.are.equal(tostring(#bytes), rcli("STRLEN rb:spec:bin"))
  end)

  it("raises error replies with their code", function()
    local err = raises(r.command, r, "LPUSH", "rb:spec:str", "x")
    assert.are.same({ "redis", "command", "WRONGTYPE", false }, { err.module, err.op, err.code, err.retryable })
    assert.matches("LPUSH: WRONGTYPE", err.message, 1, true)
    assert.are.equal("ERR", raises(r.command, r, "NOSUCHCOMMAND").code)
    assert.are.equal("v", r:command("GET", "rb:spec:str")) -- still in step
  end)

  it("rejects arguments that are not strings or numbers", function()
    assert.has_error(function() r:command("SET", "k", {}) end)
    assert.has_error(function() r:command() end)
  end)

  it("times out a blocked command and reopens the connection", function()
    local c <close> = redis.connect(url(), { timeout = "300ms" })
    local t0 = host.now()
    local err = raises(c.command, c, "BLPOP", "rb:spec:never", 5)
    assert.is_true(host.now() - t0 < 1.5)
    assert.are.same({ "timeout", true }, { err.code, err.retryable })
    assert.are.equal("PONG", c:ping())
  end)
end)

describe("redis pipeline, scan, info", function()
  it("pipelines when the library was loaded again (another environment's copy)", function()
    package.loaded.redis = nil
    local again = require("redis").connect(url())
    package.loaded.redis = redis
    assert.are.same({ "PONG", "PONG" }, again:pipeline(function(p) p:command("PING"); p:command("PING") end))
    again:close()
  end)

  it("pipelines commands in one round trip, in order", function()
    local replies = r:pipeline(function(p)
      p:command("SET", "rb:spec:str", "p")
      p:command("GET", "rb:spec:str")
      p:command("HSET", "rb:spec:hash", "f", "1")
      p:command("HGETALL", "rb:spec:hash")
    end)
    assert.are.same({ "OK", "p", 1, { "f", "1" } }, replies)
  end)

  it("raises the first error of a pipeline after reading every reply", function()
    local err = raises(r.pipeline, r, function(p)
      p:command("GET", "rb:spec:str")
      p:command("LPUSH", "rb:spec:str", "x")
      p:command("SET", "rb:spec:str", "after")
    end)
    assert.are.equal("WRONGTYPE", err.code)
    assert.are.equal("after", rcli("GET rb:spec:str"))
  end)

  it("scans 10,000 keys without KEYS, agreeing with redis-cli --scan", function()
    for batch = 0, 9 do
      r:pipeline(function(p)
        for i = 1, 1000 do p:command("SET", ("rb:spec:scan:%d"):format(batch * 1000 + i), i) end
      end)
    end
    local seen, n = {}, 0
    for k in r:scan("rb:spec:scan:*") do
      if not seen[k] then seen[k] = true; n = n + 1 end
    end
    assert.are.equal(10000, n)
    assert.are.equal("10000", rcli("--scan --pattern 'rb:spec:scan:*' | wc -l"):match("%d+"))
    local keys = {}
    for k in pairs(seen) do keys[#keys + 1] = k end
    for i = 1, #keys, 1000 do
      r:command("UNLINK", table.unpack(keys, i, math.min(i + 999, #keys)))
    end
    assert.are.equal("0", rcli("--scan --pattern 'rb:spec:scan:*' | wc -l"):match("%d+"))
  end)

  it("parses INFO into numbers, strings and keyspace tables", function()
    local info = r:info()
    assert.are.equal(rcli("INFO server"):match("redis_version:([%d.]+)"), info.redis_version)
    assert.are.equal(tonumber(url():match(":(%d+)/")), info.tcp_port)
    assert.are.equal("integer", math.type(info.connected_clients))
    assert.are.equal(tonumber(rcli("DBSIZE")), r:info("keyspace").db0.keys)
    assert.is_nil(r:info("server").used_memory)
  end)

  it("reads Dapr state keys and values in Dapr's layout", function()
    local listed, seen = {}, {}
    for k in rcli("--scan --pattern 'backend||*'"):gmatch("[^\n]+") do
      if not seen[k] then seen[k] = true; listed[#listed + 1] = k:sub(#"backend||" + 1) end
    end
    table.sort(listed)
    assert.are.same(listed, r:dapr_keys("backend"))
    local s = r:dapr_get("backend", "task-1")
    assert.are.same(json.decode(rcli("HGET 'backend||task-1' data")), s.data)
    assert.are.equal(tonumber(rcli("HGET 'backend||task-1' version")), s.version)
    assert.is_nil(r:dapr_get("backend", "no-such-key"))
  end)

  it("has the functions on a shared REDIS_URL connection", function()
    assert.are.equal("PONG", redis.ping())
    assert.are.equal("Task 1", redis.dapr_get("backend", "task-1").data.title)
  end)
end)

describe("redis and the effect gate", function()
  before_each(function()
    effects = {}
    host.set_effect_sink(function(e) effects[#effects + 1] = e end)
  end)
  after_each(function()
    host.set_mode("run")
    host.set_effect_sink(nil)
  end)

  -- the server's COMMAND INFO decides, per subcommand, whatever the case
  local classes = {
    { { "GET", "k" }, false }, { { "hgetall", "k" }, false }, { { "SCAN", "0" }, false }, { { "INFO" }, false },
    { { "PING" }, false }, { { "SET", "k", "v" }, true }, { { "DEL", "k" }, true }, { { "FLUSHALL" }, true },
    { { "EXPIRE", "k", "1" }, true }, { { "CONFIG", "GET", "maxmemory" }, false },
    { { "config", "set", "maxmemory", "0" }, true }, { { "CLIENT", "LIST" }, false },
    { { "CLIENT", "KILL", "ID", "1" }, true }, { { "client", "no-evict", "on" }, true },
    { { "ACL", "LOG" }, false }, { { "ACL", "LOG", "10" }, false }, { { "ACL", "LOG", "RESET" }, true },
    { { "acl", "log", "reset" }, true }, { { "ACL", "SETUSER", "x" }, true }, { { "ACL", "WHOAMI" }, false },
    { { "EVAL", "return 1", "0" }, true }, { { "EVALSHA", "abc", "0" }, true }, { { "FCALL", "f", "0" }, true },
    { { "EVAL_RO", "return 1", "0" }, false }, { { "FCALL_RO", "f", "0" }, false },
    { { "MULTI" }, true }, { { "EXEC" }, true }, { { "DEBUG", "SLEEP", "0" }, true },
    { { "MODULE", "LOAD", "/x.so" }, true }, { { "MODULE", "LIST" }, false }, { { "SCRIPT", "FLUSH" }, true },
    { { "SCRIPT", "EXISTS", "abc" }, false }, { { "MIGRATE", "h", "1", "k", "0", "1" }, true },
    { { "OBJECT", "ENCODING", "k" }, false }, { { "OBJECT", "FREQ", "k" }, false }, { { "SLOWLOG", "RESET" }, true },
    { { "SLOWLOG", "GET" }, false }, { { "PUBLISH", "c", "m" }, true }, { { "SOMEFUTURECOMMAND" }, true },
    { { "ACL|LOG" }, true }, { { "CONFIG" }, true },
  }
  for _, c in ipairs(classes) do
    it(("classifies %s as a %s"):format(table.concat(c[1], " "), c[2] and "write" or "read"), function()
      assert.are.equal(c[2], r:is_write(table.unpack(c[1])))
    end)
  end

  it("records writes with the command and key, never the value", function()
    r:command("SET", "rb:spec:dry", "secret-value")
    assert.are.same({ "redis", "SET", "rb:spec:dry", "SET rb:spec:dry (+1 arg)", "performed", true },
      { effects[1].module, effects[1].op, effects[1].target, effects[1].summary, effects[1].decision, effects[1].ok })
    r:command("GET", "rb:spec:dry")
    assert.are.equal(1, #effects)
  end)

  it("leaves keys unchanged in a dry run and still reads", function()
    rcli("SET rb:spec:dry before")
    host.set_mode("dry-run")
    assert.are.same({ skipped = true }, r:command("SET", "rb:spec:dry", "after"))
    assert.are.same({ skipped = true }, r:command("DEL", "rb:spec:dry"))
    assert.are.equal("before", r:command("GET", "rb:spec:dry"))
    local replies = r:pipeline(function(p)
      p:command("SET", "rb:spec:dry", "piped")
      p:command("GET", "rb:spec:dry")
    end)
    assert.are.same({ { skipped = true }, "before" }, replies)
    assert.are.equal("before", rcli("GET rb:spec:dry"))
    assert.are.same({ "skipped", "skipped", "skipped" }, { effects[1].decision, effects[2].decision, effects[3].decision })
  end)

  it("says 'would SET ...' in a dry run of a runbook and changes nothing", function()
    rcli("SET rb:spec:dry before")
    local path = cli.runbook([[
name = "flag" description = "set a flag"
step "flag" { run = function() redis.command("SET", "rb:spec:dry", "after") end }
]])
    local res = cli.run({ "run", path, "--dry-run" }, { REDIS_URL = url() })
    assert.are.equal(0, res.code, res.stderr)
    assert.truthy(res.stdout:find("would SET rb:spec:dry (+1 arg) (not simulated, skipped)", 1, true), res.stdout)
    assert.are.equal("before", rcli("GET rb:spec:dry"))
  end)
end)

describe("redis when the server stops", function()
  after_each(function() sb.ctl("redis start") end)

  it("raises a clear, retryable error and reconnects when it is back", function()
    local c <close> = redis.connect(url())
    assert.are.equal("PONG", c:ping())
    assert.is_true(select(2, sb.ctl("redis stop")))
    local err = raises(c.ping, c)
    assert.is_true(err.retryable)
    assert.matches("127.0.0.1:%d+", err.message)
    local cerr = raises(redis.connect, url(), { connect_timeout = "1s" })
    assert.are.equal("connection_refused", cerr.code)
    assert.is_true(select(2, sb.ctl("redis start")))
    assert.are.equal("PONG", c:ping())
  end)
end)

describe("redis over TLS (rediss://)", function()
  local function tls_url() return sb.env("REDIS_TLS_URL") end
  local ca = sb.env("REDIS_CA_FILE")

  it("runs commands, pipelines and scans over TLS, verifying the server's certificate", function()
    local c <close> = redis.connect(tls_url(), { ca_file = ca })
    assert.are.equal("PONG", c:ping())
    c:command("SET", "rb:spec:tls", "over tls")
    assert.are.equal("over tls", rcli("GET rb:spec:tls"))          -- the same server, read over plain TCP
    local big = ("x"):rep(200000)
    local res = c:pipeline(function(p)
      p:command("ECHO", big)
      p:command("GET", "rb:spec:tls")
      p:command("DEL", "rb:spec:tls")
    end)
    assert.are.same({ big, "over tls", 1 }, res)
    local keys = {}
    for k in c:scan("backend||task-1*") do keys[k] = true end
    assert.truthy(keys["backend||task-1"])
    assert.are.equal("Task 1", c:dapr_get("backend", "task-1").data.title)
    -- the TLS port's clients are TLS clients: redis-cli sees this connection
    assert.matches("name=runbook", rcli("CLIENT LIST"))
  end)

  it("checks the host name too: localhost is in the certificate, 127.0.0.2 is not", function()
    local c <close> = redis.connect((tls_url():gsub("127%.0%.0%.1", "localhost")), { ca_file = ca })
    assert.are.equal("PONG", c:ping())
    local err = raises(redis.connect, (tls_url():gsub("127%.0%.0%.1", "127.0.0.2")), { ca_file = ca })
    assert.are.equal("tls_verify", err.code)
    assert.matches("certificate verify failed: [Ii][Pp] address mismatch", err.message)
  end)

  it("refuses a server whose certificate the system does not trust, without printing the password", function()
    local err = raises(redis.connect, tls_url())
    assert.are.same({ "tls_verify", false }, { err.code, err.retryable })
    assert.matches("^rediss://127.0.0.1:%d+: TLS handshake: certificate verify failed: self%-signed certificate", err.message)
    assert.is_nil(err.message:find(tls_url():match("//[^:]*:([^@]+)@"), 1, true))
    err = raises(redis.connect, tls_url(), { ca_file = "/nonexistent/ca.crt" })
    assert.are.equal("tls_error", err.code)
    assert.matches("/nonexistent/ca.crt", err.message)
  end)

  it("times out a handshake the server never answers", function()
    local port, pid = cli.fixture("silent_tcp.py")
    finally(function() os.execute("kill " .. pid) end)
    local t0 = host.now()
    local err = raises(redis.connect, "rediss://127.0.0.1:" .. port .. "/0", { ca_file = ca, connect_timeout = "500ms" })
    assert.is_true(host.now() - t0 < 2)
    assert.are.same({ "timeout", true }, { err.code, err.retryable })
    assert.matches("connect to 127.0.0.1:" .. port .. " timed out after 0.5s (TLS handshake)", err.message, 1, true)
  end)

  it("speaks TLS only to a TLS port: a plain port fails the handshake clearly", function()
    local err = raises(redis.connect, (url():gsub("^redis:", "rediss:")), { ca_file = ca, connect_timeout = "1s" })
    -- Redis reads the ClientHello as the start of an inline command and waits for its end
    assert.is_true(err.code == "timeout" or err.code == "tls_error" or err.code == "connection_closed", err.code)
    assert.matches("TLS handshake", err.message)
  end)

  it("authenticates over TLS: a wrong password is WRONGPASS and never printed", function()
    local err = raises(redis.connect, (tls_url():gsub("//([^:]*):[^@]+@", "//%1:wrong-pass-77@")), { ca_file = ca })
    assert.are.equal("WRONGPASS", err.code)
    assert.is_nil(err.message:find("wrong-pass-77", 1, true))
  end)
end)
