-- No hangs without a step timeout. The default step timeout is an hour, so a
-- runbook that sets none and meets a stuck backend ends on its own only
-- because every network call has a deadline of its own. Each row is such a
-- runbook (no step timeout anywhere) facing one stuck peer: a port that never
-- accepts, a peer that accepts and never answers (spec/fixtures/silent_tcp.py),
-- a PostgreSQL INSERT blocked on a row lock another session (psql) holds, or
-- top-level code that never returns. It must end by itself within the row's
-- deadline (plus start-up slack), with an error naming the backend, the
-- target and the deadline, never a traceback. The rows run at once, so the
-- file takes about as long as its slowest row; `timeout -s KILL` makes a
-- hang fail the row instead of the suite.
--
-- Rows give short module timeouts to stay quick; the "defaults" rows give
-- none, and show every module's connect timeout is the same 10s. The
-- PostgreSQL rows need the sandbox (DATABASE_URL).
local cli = require("spec.support.cli")
local assert = require("luassert")
local host = require("runbook.host")

local SLACK = 20   -- seconds: start-up and reporting on a loaded machine, 30 runs at once
local DB = os.getenv("DATABASE_URL")
local DB_AT = DB and DB:match("@([^/]+)/") or "?"

local function psql(sql)
  local p = io.popen(("psql %s -XAtq -c %s 2>&1"):format(cli.quote(DB), cli.quote(sql)))
  local out = p:read("a")
  p:close()
  return (out:gsub("%s+$", ""))
end

local function kubeconfig(dir, port)
  local path = dir .. "/kubeconfig-" .. port
  local f = assert(io.open(path, "w"))
  f:write(([[
apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "http://127.0.0.1:%s"}}]
users: [{name: u, user: {token: not-a-secret}}]
contexts: [{name: x, context: {cluster: c, user: u, namespace: default}}]
current-context: x
]]):format(port))
  f:close()
  return path
end

-- In `code`, {at} is the peer's 127.0.0.1:PORT and {kubeconfig} a kubeconfig
-- for it; in `says`, {at} is the peer and {db} the sandbox's PostgreSQL.
local CALLS = {
  pg = [[require("pg").connect("postgresql://u@{at}/db", { connect_timeout = "1s" }):query("SELECT 1")]],
  redis = [[require("redis").connect("redis://{at}/0", { connect_timeout = "1s", timeout = "2s" }):ping()]],
  kafka = [[require("kafka").connect { brokers = "{at}", connect_timeout = "1s", timeout = "3s" }:metadata()]],
  http = [[require("http").request { url = "http://{at}/health", connect_timeout = "1s", timeout = "2s" }]],
  k8s = [[require("k8s").connect { kubeconfig = "{kubeconfig}", connect_timeout = "1s", timeout = "2s" }:get("pods/x")]],
  dapr = [[require("dapr").connect { endpoint = "http://{at}", connect_timeout = "1s", timeout = "2s" }:metadata()]],
  prom = [[require("prom").connect { url = "http://{at}", connect_timeout = "1s", timeout = "2s" }:query("up")]],
  notify = [[require("notify").webhook { url = "http://{at}/hook", json = {}, connect_timeout = "1s", timeout = "2s", fatal = true }]],
}
-- What each says when it gives up on a peer that accepted and never answered:
-- a handshake (PostgreSQL's start-up, Redis's CLIENT SETNAME, Kafka's
-- ApiVersion) is part of connecting. A webhook URL is a secret, so notify
-- names no target once connected.
local SILENT = {
  pg = { "pg.connect", "connect to {at} timed out after 1s" },
  redis = { "redis.connect", "connect to {at} timed out after 1s" },
  kafka = { "kafka.metadata", "connect to {at} timed out after 1s" },
  http = { "http.GET", "{at}", "timed out after 2s" },
  k8s = { "k8s.GET", "{at}", "timed out after 2s" },
  dapr = { "dapr.metadata", "{at}", "timed out after 2s" },
  prom = { "prom.query", "{at}", "timed out after 2s" },
  notify = { "http.POST", "timed out after 2s" },
}
-- No options at all: the connect timeout is everyone's default (kafka's call
-- timeout, 30s by default, is cut so that the row does not wait for it).
local DEFAULTS = {
  pg = [[require("pg").connect("postgresql://u@{at}/db"):query("SELECT 1")]],
  redis = [[require("redis").connect("redis://{at}/0"):ping()]],
  kafka = [[require("kafka").connect { brokers = "{at}", timeout = "12s" }:metadata()]],
  http = [[require("http").request { url = "http://{at}/health" }]],
  k8s = [[require("k8s").connect { kubeconfig = "{kubeconfig}" }:get("pods/x")]],
  dapr = [[require("dapr").connect { endpoint = "http://{at}" }:metadata()]],
  prom = [[require("prom").connect { url = "http://{at}" }:query("up")]],
  notify = [[require("notify").webhook { url = "http://{at}/hook", json = {}, fatal = true }]],
}
local MODULES = { "pg", "redis", "kafka", "http", "k8s", "dapr", "prom", "notify" }

local ROWS = {}
for _, m in ipairs(MODULES) do
  ROWS[#ROWS + 1] = { m .. ": a port that never accepts", peer = "closed", code = CALLS[m], within = 3,
    says = { m == "notify" and "http.POST" or m, "connect to {at} timed out after 1s" } }
  ROWS[#ROWS + 1] = { m .. ": a peer that accepts and never answers", peer = "silent", code = CALLS[m], within = 3,
    says = SILENT[m] }
  ROWS[#ROWS + 1] = { m .. ": defaults, a port that never accepts", peer = "closed", code = DEFAULTS[m], within = 10,
    says = { "connect to {at} timed out after 10s" } }
end

local INSERT = DB and [[local db = require("pg").connect(os.getenv("DATABASE_URL"), OPTS)
  db:exec("INSERT INTO hangs_lock (id) VALUES (1)")]]
if INSERT then
  ROWS[#ROWS + 1] = { "pg: an INSERT blocked on a row lock, lock_timeout", within = 2, blocked = true,
    code = INSERT:gsub("OPTS", '{ lock_timeout = "2s" }'),
    says = { "pg.exec", "waited 2s for a lock on {db}", "lock_timeout" } }
  ROWS[#ROWS + 1] = { "pg: an INSERT blocked on a row lock, statement timeout", within = 2, blocked = true,
    code = INSERT:gsub("OPTS", '{ timeout = "2s" }'),
    says = { "pg.exec", "statement on {db}/", "timed out after 2s" } }
end

local LOOP, IN_C = "while true do end", 'local _ = ("a"):rep(4000):find(".-.-.-.-b")'
local LOAD = require("runbook.deadline").LIMIT.load
for _, cmd in ipairs { "run", "lint" } do
  ROWS[#ROWS + 1] = { cmd .. ": a top-level loop", top = LOOP, cmd = cmd, exit = 3, within = LOAD,
    says = { "its top-level code did not finish within " .. LOAD .. "s" } }
  ROWS[#ROWS + 1] = { cmd .. ": top-level code stuck in C (the watchdog)", top = IN_C, cmd = cmd, exit = 124,
    within = LOAD + host.watchdog_grace, says = { "did not finish within " .. LOAD .. "s; the watchdog ended the load" } }
end

local function source(i, row, at, kc)
  local code = row.code and row.code:gsub("{kubeconfig}", kc or ""):gsub("{at}", at or "") or ""
  return ('name = "hangs-%d" description = "%s"\n%s\nstep "call" { run = function()\n  %s\nend }\n'):format(
    i, row[1], row.top or "", code)
end

-- Starts every row at once, from one shell (a shell per row costs seconds on
-- a loaded machine); row.dir/code holds its exit code, row.dir/ms its time.
local function start(rows, peers, kc)
  local base, script = cli.tmpdir(), {}
  for i, row in ipairs(rows) do
    local at = row.peer and "127.0.0.1:" .. peers[row.peer]
    row.at, row.dir = at, base .. "/" .. i
    os.execute("mkdir " .. row.dir)
    local path = row.dir .. "/rb.lua"
    local f = assert(io.open(path, "w"))
    f:write(source(i, row, at, row.peer and kc[row.peer]))
    f:close()
    local cmd = (row.cmd or "run") == "run" and "run " .. path .. " --yes" or row.cmd .. " " .. path
    script[#script + 1] = ([[(s=$(date +%%s%%N); timeout -s KILL %d %s %s </dev/null >%s/out 2>&1; echo $? >%s/code.tmp
  echo $(( ($(date +%%s%%N) - s) / 1000000 )) >%s/ms; mv %s/code.tmp %s/code) >/dev/null 2>&1 &]]):format(
      row.within + SLACK + 30, cli.BIN, cmd, row.dir, row.dir, row.dir, row.dir, row.dir)
  end
  os.execute(table.concat(script, "\n"))
end

local function finished(row)
  local deadline = host.now() + row.within + SLACK + 40
  while cli.slurp(row.dir .. "/code") == "" do
    assert.truthy(host.now() < deadline, row[1] .. ": never finished")
    os.execute("sleep 0.2")
  end
  return tonumber(cli.slurp(row.dir .. "/code")), tonumber(cli.slurp(row.dir .. "/ms")) / 1000,
    cli.slurp(row.dir .. "/out")
end

describe("no hangs without a step timeout", function()
  local peers, kc, holder = {}, {}, nil
  local pids = {}

  setup(function()
    local dir = cli.tmpdir()
    peers.closed, pids[1] = cli.fixture("silent_tcp.py", "--no-accept")
    peers.silent, pids[2] = cli.fixture("silent_tcp.py")
    kc.closed, kc.silent = kubeconfig(dir, peers.closed), kubeconfig(dir, peers.silent)
    if DB then
      -- another session holds key 1 in an open transaction: an INSERT of key 1 waits for its lock
      assert.are.equal("", psql("SET client_min_messages = warning; DROP TABLE IF EXISTS hangs_lock;"
        .. " CREATE TABLE hangs_lock (id int PRIMARY KEY)"))
      local p = io.popen(("PGAPPNAME=hangs-holder psql %s -XAtq -c BEGIN -c 'INSERT INTO hangs_lock VALUES (1)'"
        .. " -c 'SELECT pg_sleep(300)' >/dev/null 2>&1 & echo $!"):format(cli.quote(DB)))
      holder = p:read("l")
      p:close()
      cli.eventually(function()
        return psql("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'hangs-holder'"
          .. " AND query LIKE '%pg_sleep%'") == "1"
      end, "the psql session holding the row lock")
    end
    start(ROWS, peers, kc)
  end)

  teardown(function()
    for _, pid in ipairs(pids) do os.execute("kill " .. pid) end
    if holder then
      psql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'hangs-holder'")
      os.execute("kill " .. holder .. " 2>/dev/null")
      psql("DROP TABLE IF EXISTS hangs_lock")
    end
    cli.cleanup()
  end)

  for _, row in ipairs(ROWS) do
    it(row[1], function()
      local code, secs, out = finished(row)
      local summary = ("%s: exit %s after %.1fs\n%s"):format(row[1], tostring(code), secs, out)
      assert.are.equal(row.exit or 1, code, summary)
      assert.truthy(secs < row.within + SLACK, summary)
      for _, s in ipairs(row.says) do
        s = s:gsub("{at}", row.at or ""):gsub("{db}", DB_AT)
        assert.truthy(out:find(s, 1, true), ("expected %q in\n%s"):format(s, summary))
      end
      assert.falsy(out:find("stack traceback", 1, true), summary)
    end)
  end

  it("leaves no blocked INSERT queued on the server, and inserts nothing", function()
    if not DB then return pending("needs the sandbox (DATABASE_URL)") end
    for _, row in ipairs(ROWS) do if row.blocked then finished(row) end end
    assert.are.equal("0", psql("SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'INSERT INTO hangs_lock%'"
      .. " AND application_name <> 'hangs-holder'"))
    psql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'hangs-holder'")
    assert.are.equal("0", psql("SELECT count(*) FROM hangs_lock"))
  end)

  it("PostgreSQL sessions wait at most 30s for a lock by default", function()
    if not DB then return pending("needs the sandbox (DATABASE_URL)") end
    local r = cli.run { "run", cli.runbook([[name = "hangs-lock-default" description = "shows lock_timeout"
      step "show" { run = function()
        print("lock_timeout=" .. require("pg").connect():query("SHOW lock_timeout")[1].lock_timeout)
      end }
    ]]), "--yes" }
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.truthy(r.stdout:find("lock_timeout=30s", 1, true), r.stdout)
  end)
end)
