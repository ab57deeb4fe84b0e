-- When the journal reaches the disk, seen through strace: an effect's intent
-- is fsync'd before it (a batch's intents, a Redis pipeline's or those of a
-- PostgreSQL transaction, together before the batch is sent or committed), its
-- outcome with the next sync, and the ends of the step and run that performed
-- it; a run that performs nothing pays no fsync.
local cli = require("spec.support.cli")

--- The journal lines written before each fsync of the journal's descriptor.
local function synced(src, args)
  local dir, state = cli.tmpdir(), cli.tmpdir()
  local trace = dir .. "/trace"
  local rb = cli.runbook(src:gsub("DIR", dir), "fsync.lua")
  local cmd = { "run", rb, "--yes" }
  for _, a in ipairs(args or {}) do cmd[#cmd + 1] = a end
  -- no Pushgateway (the sandbox's env names one): only the journal's fsyncs are counted;
  -- under make check-asan, no leak check (LeakSanitizer cannot run under ptrace)
  local asan = os.getenv("ASAN_OPTIONS")
  local r = cli.run(cmd, { RUNBOOK_STATE_DIR = state, RUNBOOK_PUSHGATEWAY = "",
    ASAN_OPTIONS = asan and (asan .. ":detect_leaks=0") or nil },
    { "strace", "-f", "-qq", "-s", "4096", "-o", trace, "-e", "trace=write,fsync,fdatasync" })
  assert.are.equal(0, r.code, r.stderr)
  local events, out = {}, {}
  for line in io.lines(trace) do
    local ev = line:match('write%(%d+, "{.-\\"event\\":\\"([%w_]+)')
    if ev then events[#events + 1] = ev end
    if line:match("f%a*sync%(") then
      out[#out + 1] = table.concat(events, " ")
      events = {}
    end
  end
  return out
end

describe("the journal's fsyncs", function()
  it("a run that performs nothing, or a dry run, is never fsync'd", function()
    local noop = 'name = "n"\ndescription = "d"\nstep "one" { run = function() end }\nstep "two" { run = function() end }\n'
    assert.are.same({}, synced(noop))
    local writes = 'name = "w"\ndescription = "d"\nstep "one" { run = function() fs.write("DIR/out", "x") end }\n'
    assert.are.same({}, synced(writes, { "--dry-run" }))
  end)

  it("an effect's intent is fsync'd before it, its outcome with the next sync, and the ends of its step and run", function()
    local src = 'name = "w"\ndescription = "d"\nstep "one" { run = function() fs.write("DIR/out", "x") ' ..
      'fs.write("DIR/out2", "y") end }\nstep "two" { run = function() end }\n'
    assert.are.same({
      "run_start step_start intent",
      "effect intent",
      "effect step_end",
      "step_start step_end run_end",
    }, synced(src))
  end)

  it("a Redis pipeline's intents are fsync'd once, before it is sent; redis-cli sees every write", function()
    local src = [[name = "p" description = "d"
step "one" { run = function()
  local r <close> = redis.connect()
  r:pipeline(function(p) for i = 1, 50 do p:command("SET", "fsync-spec:" .. i, "v") end end)
  r:command("SET", "fsync-spec:last", "v")
end }
]]
    local intents = ("intent "):rep(50)
    assert.are.same({
      "run_start step_start " .. intents:sub(1, -2),
      ("effect "):rep(50) .. "intent",
      "effect step_end",
      "run_end",
    }, synced(src))
    local p = io.popen("redis-cli -u " .. cli.quote(os.getenv("REDIS_URL")) .. " --no-auth-warning EXISTS "
      .. ("fsync-spec:%d "):rep(50):format(table.unpack((function() local t = {} for i = 1, 50 do t[i] = i end return t end)()))
      .. "fsync-spec:last")
    assert.are.equal("51", p:read("l"))
    p:close()
  end)

  it("the INSERTs of a PostgreSQL transaction are fsync'd once, before the COMMIT; psql sees every row", function()
    local table_name = "fsync_spec_" .. os.time()
    local src = ([[name = "t" description = "d"
step "one" { run = function()
  local db <close> = pg.connect()
  db:exec("CREATE TABLE TBL (id int)")
  db:transaction(function(tx)
    for i = 1, 40 do tx:exec("INSERT INTO TBL VALUES ($1)", i) end
    tx:exec("UPDATE TBL SET id = id + 1 WHERE id = 40")
  end)
  db:transaction(function(tx) tx:exec("DROP TABLE TBL") end)
end }
]]):gsub("TBL", table_name)
    assert.are.same({
      "run_start step_start intent",
      "effect " .. ("intent effect "):rep(41):sub(1, -2),
      "intent",   -- DROP TABLE is no plain DML: synced before it
      "effect step_end",
      "run_end",
    }, synced(src))
  end)
end)
