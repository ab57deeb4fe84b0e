-- Durable runs: the journal, resume after SIGKILL at several points, --from,
-- locking, SIGINT, history and report, and secrets kept out of all of them.
local cli = require("spec.support.cli")
local cjson = require("cjson")

-- Each step logs itself (an fs append, so a performed effect) when it
-- finishes; `pause` makes the named step wait until the test creates `go`.
local STEPS = [[
name = "durable"
description = "steps that log each run of themselves"
param "dir" { required = true }
param "pause" { default = "" }
local function mark(ctx, what) fs.write(ctx.params.dir .. "/log", what .. "\n", { append = true }) end
local function maybe_pause(ctx, name)
  if ctx.params.pause ~= name then return end
  local deadline = time.now() + 20
  while not fs.exists(ctx.params.dir .. "/go") and time.now() < deadline do time.sleep(0.02) end
end
step "prepare" { run = function(ctx) maybe_pause(ctx, "prepare"); mark(ctx, "prepare"); return { token = "abc" } end }
step "change" { IDEMPOTENT run = function(ctx)
  mark(ctx, "change")
  maybe_pause(ctx, "change")
  return { changed = ctx.outputs.prepare.token .. "-1", n = 1 }
end }
step "verify" { run = function(ctx)
  maybe_pause(ctx, "verify")
  mark(ctx, ("verify %s %s"):format(ctx.outputs.change.changed, math.type(ctx.outputs.change.n)))
end }
]]

local function steps_runbook(idempotent)
  return cli.runbook(STEPS:gsub("IDEMPOTENT", idempotent and "idempotent = true," or ""), "durable.lua")
end

local function split(text)
  local out = {}
  for l in text:gmatch("[^\n]+") do out[#out + 1] = l end
  return out
end

local function lines(path) return split(cli.slurp(path)) end

--- Poll until `cond()` is true (10 s at most).
local eventually = cli.eventually

local function journal_text(state)
  local p = io.popen("cat " .. cli.quote(state) .. "/runs/*.jsonl 2>/dev/null")
  local t = p:read("a")
  p:close()
  return t
end

--- True once the journal in `state` has an event for which `match(e)` holds.
local function journaled(state, match)
  return function()
    for l in journal_text(state):gmatch("[^\n]+") do
      local ok, e = pcall(cjson.decode, l)
      if ok and match(e) then return true end
    end
    return false
  end
end

local function step_started(state, name)
  return journaled(state, function(e) return e.event == "step_start" and e.step == name end)
end

local function run_id(state)
  local p = io.popen("ls " .. cli.quote(state) .. "/runs")
  local id = p:read("l")
  p:close()
  return id and id:gsub("%.jsonl$", "")
end

--- Start `runbook ARGS...` in the background; returns its pid and output file.
local spawn = cli.spawn

describe("the journal", function()
  after_each(cli.cleanup)

  it("records run start, steps, effects and run end as JSON lines", function()
    local state, dir = cli.tmpdir(), cli.tmpdir()
    local r = cli.run({ "run", steps_runbook(), "-p", "dir=" .. dir }, { RUNBOOK_STATE_DIR = state })
    assert.are.equal(0, r.code, r.stderr)
    local id = run_id(state)
    assert.truthy(id:match("^%d%d%d%d%d%d%d%dT%d%d%d%d%d%dZ%-%x%x%x%x%x%x%x%x$"), id)
    local evs = cli.events(journal_text(state))
    local start = evs[1]
    assert.are.equal("run_start", start.event)
    assert.are.equal(64, #start.sha256)
    assert.are.equal("run", start.mode)
    assert.truthy(start.user and start.host and start.path:match("^/"))
    assert.are.same({ dir = dir, pause = "" }, start.params)
    local ends = cli.only(evs, "step_end")
    assert.are.same({ "ok", "ok", "ok" }, { ends[1].status, ends[2].status, ends[3].status })
    assert.are.same({ token = "abc" }, ends[1].outputs)
    local effects = cli.only(evs, "effect")
    assert.are.equal(3, #effects)
    assert.are.same({ "fs", "append", "performed" }, { effects[1].module, effects[1].op, effects[1].decision })
    assert.are.equal("run_end", evs[#evs].event)
  end)

  it("ignores a torn last line when reading a journal back", function()
    local state, dir = cli.tmpdir(), cli.tmpdir()
    cli.run({ "run", steps_runbook(), "-p", "dir=" .. dir }, { RUNBOOK_STATE_DIR = state })
    local id = run_id(state)
    local f = io.open(state .. "/runs/" .. id .. ".jsonl", "ab")
    f:write('{"event":"step_st')
    f:close()
    local r = cli.run({ "report", id, "--format", "json" }, { RUNBOOK_STATE_DIR = state })
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("ok", cjson.decode(r.stdout).status)
  end)
end)

describe("resume after SIGKILL", function()
  after_each(cli.cleanup)

  local function effect_in_change(state)
    return journaled(state, function(e) return e.event == "effect" and e.step == "change" and e.decision == "performed" end)
  end

  --- Run the runbook paused at `pause`, kill -9 it once `ready` shows in the journal.
  -- `ready(state, dir)` says when the run has reached the point to kill it at.
  local function killed_run(pause, idempotent, ready)
    local state, dir = cli.tmpdir(), cli.tmpdir()
    local rb = steps_runbook(idempotent)
    local p = spawn({ "run", rb, "-p", "dir=" .. dir, "-p", "pause=" .. pause, "--yes" }, { RUNBOOK_STATE_DIR = state })
    eventually(ready(state, dir), "the point to kill at")
    os.execute("kill -9 " .. p.pid)
    local code = p.wait()
    assert.are.equal(137, code)
    local f = io.open(dir .. "/go", "wb")
    f:close()
    return state, dir, run_id(state)
  end

  it("before a step with effects: the cut-off step runs again, every step once in all", function()
    local state, dir, id = killed_run("prepare", false, function(st) return step_started(st, "prepare") end)
    assert.are.same({}, lines(dir .. "/log"))
    local r = cli.run({ "resume", id }, { RUNBOOK_STATE_DIR = state })
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.are.same({ "prepare", "change", "verify abc-1 integer" }, lines(dir .. "/log"))
  end)

  it("after a step with effects: it is not run again and its outputs are restored", function()
    local state, dir, id = killed_run("verify", false, function(st) return step_started(st, "verify") end)
    assert.are.same({ "prepare", "change" }, lines(dir .. "/log"))
    local r = cli.run({ "resume", id, "--output", "json" }, { RUNBOOK_STATE_DIR = state })
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    local started = cli.only(cli.events(r.stdout), "step_start")
    assert.are.equal(1, #started)
    assert.are.equal("verify", started[1].step)
    assert.are.same({ "prepare", "change", "verify abc-1 integer" }, lines(dir .. "/log"))
    local h = cli.run({ "history" }, { RUNBOOK_STATE_DIR = state })
    assert.truthy(h.stdout:find(id:gsub("%-", "%%-") .. "%s+durable%s+.-ok%*"), h.stdout)
  end)

  it("inside a step with effects: a non-idempotent step is not repeated without the operator", function()
    local state, dir, id = killed_run("change", false, effect_in_change)
    assert.are.same({ "prepare", "change" }, lines(dir .. "/log"))
    local r = cli.run({ "resume", id }, { RUNBOOK_STATE_DIR = state })
    assert.are.equal(2, r.code)
    assert.truthy(r.stderr:find("step 'change' was interrupted after it had already", 1, true), r.stderr)
    assert.truthy(r.stderr:find("  - append 7 bytes to " .. dir .. "/log", 1, true), r.stderr)
    assert.truthy(r.stderr:find("--rerun-interrupted", 1, true))
    assert.are.same({ "prepare", "change" }, lines(dir .. "/log"))

    r = cli.run({ "resume", id, "--rerun-interrupted" }, { RUNBOOK_STATE_DIR = state })
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.are.same({ "prepare", "change", "change", "verify abc-1 integer" }, lines(dir .. "/log"))
  end)

  it("inside an idempotent step: resume runs it again by itself", function()
    local state, dir, id = killed_run("change", true, effect_in_change)
    local r = cli.run({ "resume", id }, { RUNBOOK_STATE_DIR = state })
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.are.same({ "prepare", "change", "change", "verify abc-1 integer" }, lines(dir .. "/log"))
  end)

  it("refuses a runbook whose text changed, naming path and sha256, unless --force", function()
    local state, dir, id = killed_run("verify", false, function(st) return step_started(st, "verify") end)
    local start = cli.events(journal_text(state))[1]
    local f = io.open(start.path, "ab")
    f:write("\n-- edited\n")
    f:close()
    local r = cli.run({ "resume", id }, { RUNBOOK_STATE_DIR = state })
    assert.are.equal(2, r.code)
    assert.truthy(r.stderr:find(start.path .. " changed since run " .. id, 1, true), r.stderr)
    assert.truthy(r.stderr:find("sha256 was " .. start.sha256, 1, true), r.stderr)
    assert.are.same({ "prepare", "change" }, lines(dir .. "/log"))
    r = cli.run({ "resume", id, "--force" }, { RUNBOOK_STATE_DIR = state })
    assert.are.equal(0, r.code, r.stderr)
    assert.are.same({ "prepare", "change", "verify abc-1 integer" }, lines(dir .. "/log"))
  end)

  it("keeps the reasons earlier steps were skipped for (ctx.skipped)", function()
    local state, dir = cli.tmpdir(), cli.tmpdir()
    local rb = cli.runbook([[
name = "skips" description = "x"
param "dir" { required = true }
step "maybe" { when = function() return false end, run = function() end }
step "flaky" { run = function(ctx)
  local flag = ctx.params.dir .. "/failed-once"
  if not fs.exists(flag) then fs.write(flag, "1"); error("first time fails") end
  fs.write(ctx.params.dir .. "/seen", tostring(ctx.skipped("maybe")))
end }
]])
    local env = { RUNBOOK_STATE_DIR = state }
    assert.are.equal(1, cli.run({ "run", rb, "-p", "dir=" .. dir }, env).code)
    local r = cli.run({ "resume", run_id(state) }, env)
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.are.equal("when", cli.slurp(dir .. "/seen"))
  end)

  it("refuses runs that finished ok, dry runs, and unknown ids", function()
    local state, dir = cli.tmpdir(), cli.tmpdir()
    cli.run({ "run", steps_runbook(), "-p", "dir=" .. dir }, { RUNBOOK_STATE_DIR = state })
    local r = cli.run({ "resume", run_id(state) }, { RUNBOOK_STATE_DIR = state })
    assert.are.equal(2, r.code)
    assert.truthy(r.stderr:find("finished ok; there is nothing to resume", 1, true))
    r = cli.run({ "resume", "20200101T000000Z-00000000" }, { RUNBOOK_STATE_DIR = state })
    assert.are.equal(2, r.code)
    assert.truthy(r.stderr:find("no run 20200101T000000Z-00000000", 1, true))
  end)
end)

describe("--from", function()
  after_each(cli.cleanup)

  it("starts at the named step; a step reading a skipped step's outputs fails clearly", function()
    local state, dir = cli.tmpdir(), cli.tmpdir()
    local r = cli.run({ "run", steps_runbook(), "-p", "dir=" .. dir, "--from", "change" }, { RUNBOOK_STATE_DIR = state })
    assert.are.equal(1, r.code)
    assert.truthy(r.stdout:find('ctx.outputs["prepare"]: that step was skipped (it is before --from)', 1, true), r.stdout)
    assert.are.same({ "change" }, lines(dir .. "/log"))
  end)

  it("runs only the steps from there on", function()
    local state, dir = cli.tmpdir(), cli.tmpdir()
    local rb = cli.runbook([[
name = "from"
description = "x"
param "dir" { required = true }
step "a" { run = function(ctx) fs.write(ctx.params.dir .. "/a", "a") end }
step "b" { run = function(ctx) fs.write(ctx.params.dir .. "/b", "b") end }
]])
    local r = cli.run({ "run", rb, "-p", "dir=" .. dir, "--from", "b" }, { RUNBOOK_STATE_DIR = state })
    assert.are.equal(0, r.code, r.stderr)
    assert.is_nil(io.open(dir .. "/a"))
    assert.truthy(io.open(dir .. "/b"))
  end)
end)

describe("the run lock", function()
  after_each(cli.cleanup)

  local HOLD = [[
name = "hold"
description = "holds its lock until told to go"
param "dir" { required = true }
step "wait" { run = function(ctx)
  if ctx.dry_run then return end
  local deadline = time.now() + 20
  while not fs.exists(ctx.params.dir .. "/go") and time.now() < deadline do time.sleep(0.02) end
end }
]]

  it("lets exactly one run in; the other exits 75 naming the holder, --wait-lock waits", function()
    local state, dir = cli.tmpdir(), cli.tmpdir()
    local rb = cli.runbook(HOLD)
    local env = { RUNBOOK_STATE_DIR = state }
    local a = spawn({ "run", rb, "-p", "dir=" .. dir }, env)
    eventually(step_started(state, "wait"), "first run's step")
    local id = run_id(state)

    local b = cli.run({ "run", rb, "-p", "dir=" .. dir }, env)
    assert.are.equal(75, b.code)
    assert.truthy(b.stderr:find("hold is locked by run " .. id .. " (pid " .. a.pid .. ", user ", 1, true), b.stderr)
    assert.truthy(b.stderr:find("--wait-lock", 1, true))

    -- A dry run changes nothing, so it does not need the lock, unless --lock asks.
    assert.are.equal(0, cli.run({ "run", rb, "-p", "dir=" .. dir, "--dry-run" }, env).code)
    assert.are.equal(75, cli.run({ "run", rb, "-p", "dir=" .. dir, "--dry-run", "--lock" }, env).code)

    local c = spawn({ "run", rb, "-p", "dir=" .. dir, "--wait-lock", "20s" }, env)
    os.execute("sleep 0.3")
    assert.are.equal("", cli.slurp(c.dir .. "/code"))
    local f = io.open(dir .. "/go", "wb")
    f:close()
    assert.are.equal(0, (a.wait()))
    assert.are.equal(0, (c.wait()))
  end)

  it("started twice at the same moment: exactly one runs", function()
    local state, dir = cli.tmpdir(), cli.tmpdir()
    local rb = cli.runbook(HOLD)
    local env = { RUNBOOK_STATE_DIR = state }
    local a, b = spawn({ "run", rb, "-p", "dir=" .. dir }, env), spawn({ "run", rb, "-p", "dir=" .. dir }, env)
    eventually(step_started(state, "wait"), "a run's step")
    -- the holder waits for "go": only the loser can end before it (however slow it starts)
    eventually(function() return cli.slurp(a.dir .. "/code") ~= "" or cli.slurp(b.dir .. "/code") ~= "" end, "the loser")
    local f = io.open(dir .. "/go", "wb")
    f:close()
    local codes = { (a.wait()), (b.wait()) }
    table.sort(codes)
    assert.are.same({ 0, 75 }, codes)
  end)

  it("is released by the kernel when the holder is killed", function()
    local state, dir = cli.tmpdir(), cli.tmpdir()
    local rb = cli.runbook(HOLD)
    local env = { RUNBOOK_STATE_DIR = state }
    local a = spawn({ "run", rb, "-p", "dir=" .. dir }, env)
    eventually(step_started(state, "wait"), "first run's step")
    os.execute("kill -9 " .. a.pid)
    a.wait()
    local f = io.open(dir .. "/go", "wb")
    f:close()
    assert.are.equal(0, cli.run({ "run", rb, "-p", "dir=" .. dir }, env).code)
  end)

  it("is shared by runbooks that declare the same lock key", function()
    local state, dir = cli.tmpdir(), cli.tmpdir()
    local env = { RUNBOOK_STATE_DIR = state }
    local a = spawn({ "run", cli.runbook(HOLD:gsub('description =', 'lock = "db:todo"\ndescription =')), "-p",
      "dir=" .. dir }, env)
    eventually(step_started(state, "wait"), "first run's step")
    local other = cli.runbook('name = "other"\ndescription = "x"\nlock = "db:todo"\nstep "s" { run = function() end }')
    local r = cli.run({ "run", other }, env)
    assert.are.equal(75, r.code)
    assert.truthy(r.stderr:find("db:todo is locked by run", 1, true), r.stderr)
    local f = io.open(dir .. "/go", "wb")
    f:close()
    a.wait()
  end)
end)

describe("SIGINT or SIGTERM during a long step", function()
  after_each(cli.cleanup)

  for sig, status in pairs { INT = 130, TERM = 143 } do
  it(("SIG%s: records the step as interrupted, runs no more steps, says how to resume, exits %d"):format(sig, status), function()
    local state, dir = cli.tmpdir(), cli.tmpdir()
    local rb = cli.runbook([[
name = "long"
description = "x"
param "dir" { required = true }
step "long" { run = function() exec.run { "sleep", "30" } end }
step "after" { run = function(ctx) fs.write(ctx.params.dir .. "/after", "x") end }
]])
    local env = { RUNBOOK_STATE_DIR = state }
    local p = spawn({ "run", rb, "-p", "dir=" .. dir }, env)
    eventually(step_started(state, "long"), "step start")
    os.execute("sleep 0.2; kill -" .. sig .. " " .. p.pid)
    local code, out = p.wait()
    assert.are.equal(status, code)
    local id = run_id(state)
    assert.truthy(out:find("runbook resume " .. id, 1, true), out)
    assert.is_nil(io.open(dir .. "/after"))
    local ends = cli.only(cli.events(journal_text(state)), "step_end")
    assert.are.equal(1, #ends)
    assert.are.equal("interrupted", ends[1].status)
    local r = cli.run({ "report", id, "--format", "json" }, env)
    assert.are.equal("interrupted", cjson.decode(r.stdout).status)
  end)
  end
end)

describe("undo on failure", function()
  after_each(cli.cleanup)

  it("journals each undo, in reverse order, with its effects", function()
    local state, dir = cli.tmpdir(), cli.tmpdir()
    local rb = cli.runbook([[
name = "undoer"
description = "x"
on_failure = "undo"
param "dir" { required = true }
step "a" { run = function(ctx) fs.write(ctx.params.dir .. "/a", "a") end,
           undo = function(ctx) fs.remove(ctx.params.dir .. "/a") end }
step "b" { run = function(ctx) fs.write(ctx.params.dir .. "/b", "b") end,
           undo = function(ctx) fs.remove(ctx.params.dir .. "/b") end }
step "c" { run = function() error("cannot continue") end }
]])
    local env = { RUNBOOK_STATE_DIR = state }
    assert.are.equal(1, cli.run({ "run", rb, "-p", "dir=" .. dir }, env).code)
    assert.is_nil(io.open(dir .. "/a"))
    assert.is_nil(io.open(dir .. "/b"))
    local doc = cjson.decode(cli.run({ "report", run_id(state), "--format", "json" }, env).stdout)
    local undos = {}
    for _, st in ipairs(doc.steps) do
      if st.kind == "undo" then undos[#undos + 1] = st.name .. ":" .. st.status .. ":" .. st.effects[1].op end
    end
    assert.are.same({ "b:ok:remove", "a:ok:remove" }, undos)
  end)
end)

describe("history and report", function()
  after_each(cli.cleanup)

  local SECRET, URLPASS = "s3cr3t-param-value", "urlpass-9f8e7d"
  local RB = [[
name = "reported"
description = "x"
version = "1.2"
param "token" { secret = true, required = true }
param "target" { default = "db" }
step "inspect" { run = function(ctx)
  log.info("token=%s", ctx.params.token)
  local ok, err = pcall(http.get, "http://ops:]] .. URLPASS .. [[@127.0.0.1:1/health", { timeout = "1s" })
  log.warn("probe: %s", tostring(err))
  return { seen = ctx.params.token }
end }
step "change" { run = function(ctx) fs.write(ctx.params.dir_or_tmp or os.tmpname(), ctx.params.token) end }
step "broken" { run = function(ctx) error("disk full at " .. ctx.params.token) end }
]]

  it("keeps a planted secret out of stdout, stderr, the journal and the report", function()
    local state = cli.tmpdir()
    local env = { RUNBOOK_STATE_DIR = state }
    local rb = cli.runbook(RB:gsub("ctx.params.dir_or_tmp or os.tmpname%(%)", "'" .. state .. "/out'"))
    local outputs = {}
    for _, fmt in ipairs { "text", "json" } do
      local r = cli.run({ "run", rb, "-p", "token=" .. SECRET, "--output", fmt }, env)
      assert.are.equal(1, r.code)
      outputs[#outputs + 1] = r.stdout .. r.stderr
    end
    local id = run_id(state)
    for _, fmt in ipairs { "markdown", "json" } do
      local r = cli.run({ "report", id, "--format", fmt }, env)
      assert.are.equal(0, r.code, r.stderr)
      outputs[#outputs + 1] = r.stdout .. r.stderr
    end
    outputs[#outputs + 1] = journal_text(state)
    outputs[#outputs + 1] = cli.run({ "history" }, env).stdout
    for _, text in ipairs(outputs) do
      assert.is_nil(text:find(SECRET, 1, true), text)
      assert.is_nil(text:find(URLPASS, 1, true), text)
    end
    assert.truthy(outputs[1]:find("token=***", 1, true))
    assert.truthy(outputs[5]:find("disk full at ***", 1, true))
  end)

  it("report: Markdown for a postmortem and a JSON document", function()
    local state = cli.tmpdir()
    local env = { RUNBOOK_STATE_DIR = state }
    local rb = cli.runbook(RB:gsub("ctx.params.dir_or_tmp or os.tmpname%(%)", "'" .. state .. "/out'"))
    cli.run({ "run", rb, "-p", "token=" .. SECRET }, env)
    local id = run_id(state)
    local md = cli.run({ "report", id }, env).stdout
    assert.are.equal("# Run " .. id .. ": reported\n", md:sub(1, #id + 17))
    assert.truthy(md:find("| Status | **failed** (exit 1) |", 1, true), md)
    assert.truthy(md:find("| Runbook | reported version 1.2 |", 1, true))
    assert.truthy(md:find("## Parameters\n\n| Name | Value |\n|---|---|\n| target | `db` |\n| token | `***` |", 1, true), md)
    assert.truthy(md:find("## Timeline\n\n| Time | Step | Status | Duration | Effects |", 1, true))
    assert.truthy(md:find("| 2. change | ok | %S+ | 1 |"), md)
    assert.truthy(md:find("### 3. broken: failed", 1, true))
    assert.truthy(md:find("Error: disk full at *** (at `", 1, true))
    assert.truthy(md:find("**done** write " .. #SECRET .. " bytes to " .. state .. "/out (fs write `", 1, true), md)
    assert.truthy(md:find("WARN  probe: ", 1, true))

    local doc = cjson.decode(cli.run({ "report", id, "--format", "json" }, env).stdout)
    assert.are.equal(id, doc.run_id)
    assert.are.same({ "reported", "1.2", "run", "failed", 1 }, { doc.runbook, doc.version, doc.mode, doc.status, doc.exit_code })
    assert.are.same({ target = "db", token = "***" }, doc.params)
    assert.are.equal(3, #doc.steps)
    for _, k in ipairs { "name", "index", "status", "started", "duration", "effects", "logs" } do
      assert.is_not_nil(doc.steps[2][k], k)
    end
    assert.are.same({ "fs", "write", "performed", true },
      { doc.steps[2].effects[1].module, doc.steps[2].effects[1].op, doc.steps[2].effects[1].decision, doc.steps[2].effects[1].ok })
    assert.are.equal("disk full at ***", doc.steps[3].error.message)
    assert.are.equal(1, #doc.segments)
  end)

  it("report of a dry run lists its plan", function()
    local state = cli.tmpdir()
    local env = { RUNBOOK_STATE_DIR = state }
    local rb = cli.runbook('name = "plan"\ndescription = "x"\nstep "s" { run = function() fs.write("' .. state
      .. '/never", "x"); exec.run { "touch", "' .. state .. '/never2" } end }')
    assert.are.equal(0, cli.run({ "run", rb, "--dry-run" }, env).code)
    local md = cli.run({ "report", run_id(state) }, env).stdout
    assert.truthy(md:find("| Mode | dry run (nothing was changed) |", 1, true))
    assert.truthy(md:find("## Dry-run plan\n\n1. would (not simulated) write 1 bytes to " .. state .. "/never", 1, true), md)
    assert.truthy(md:find("2. would (not simulated) run touch", 1, true), md)
  end)

  it("report: a step of many effects shows its first and last ten and counts the rest; JSON keeps all", function()
    local state = cli.tmpdir()
    local env = { RUNBOOK_STATE_DIR = state }
    local rb = cli.runbook('name = "many"\ndescription = "x"\nstep "s" { run = function() for i = 1, 60 do fs.write("'
      .. state .. '/f" .. i, "x"); if i == 30 then exec.run { "true" } end end end }')
    assert.are.equal(0, cli.run({ "run", rb }, env).code)
    local id = run_id(state)
    local md = cli.run({ "report", id }, env).stdout
    local _, shown = md:gsub("\n%- [^\n]* %*%*done%*%* ", "")
    assert.are.equal(20, shown, md)
    assert.truthy(md:find("\n- … 41 more: 40 done fs write, 1 done exec run\n", 1, true), md)
    assert.truthy(md:find("/f10 (fs write", 1, true) and md:find("/f51 (fs write", 1, true)
      and not md:find("/f11 (fs write", 1, true), md)
    local html = cli.run({ "report", id, "--html" }, env).stdout
    assert.truthy(html:find('<li class="more">… 41 more: 40 done fs write, 1 done exec run</li>', 1, true))
    local doc = cjson.decode(cli.run({ "report", id, "--format", "json" }, env).stdout)
    assert.are.equal(61, #doc.steps[1].effects)
  end)

  it("history: one line per run, newest first, filtered by runbook and limited", function()
    local state = cli.tmpdir()
    local env = { RUNBOOK_STATE_DIR = state }
    local a = cli.runbook('name = "alpha"\ndescription = "x"\nstep "s" { run = function() end }')
    local b = cli.runbook('name = "beta"\ndescription = "x"\nstep "s" { run = function() error("no") end }')
    cli.run({ "run", a }, env)
    cli.run({ "run", b }, env)
    local h = cli.run({ "history" }, env).stdout
    local rows = split((h:gsub("^[^\n]*\n", "")))
    assert.are.equal(2, #rows)
    assert.truthy(rows[1]:find("beta%s.-run%s+failed%s+%S+@%S+$"), rows[1])
    assert.truthy(rows[2]:find("alpha%s.-run%s+ok%s"), rows[2])
    assert.are.equal(1, #split(cli.run({ "history", "--runbook", "alpha" }, env).stdout) - 1)
    assert.are.equal(1, #split(cli.run({ "history", "--limit", "1" }, env).stdout) - 1)
    local js = cli.events(cli.run({ "history", "--output", "json" }, env).stdout)
    assert.are.same({ "beta", "failed" }, { js[1].runbook, js[1].status })
  end)

  it("history: a large state directory, a corrupt run among them, and large journals read by their ends", function()
    local state = cli.tmpdir()
    local env = { RUNBOOK_STATE_DIR = state }
    local rb = cli.runbook('name = "cron"\ndescription = "x"\nstep "a" { run = function() fs.write("' .. state
      .. '/f", "x") end }')
    assert.are.equal(0, cli.run({ "run", rb }, env).code)
    local path = io.popen("ls " .. state .. "/runs/*.jsonl"):read("l")
    local ls = lines(path)
    os.remove(path)
    local old = ls[1]:match('"run_id":"([^"]+)"')
    local function put(id, text) cli.write(state .. "/runs/" .. id .. ".jsonl", (text:gsub(old, id))) end
    -- 300 cron runs, one of them of another runbook and one corrupt, newest first by id
    for i = 1, 300 do
      local id = ("20250101T%02d%02d00Z-%08x"):format(i // 60, i % 60, i)
      local text = table.concat(ls, "\n") .. "\n"
      if i == 7 then text = text:gsub('"runbook":"cron"', '"runbook":"other"') end
      if i == 250 then text = text:gsub('"status":"ok"', '"status":7', 1) end
      put(id, text)
    end
    -- two journals over a megabyte: one resumed and ended ok, one killed in its step;
    -- a malformed line in the middle of a large one is not read by history
    local filler = {}
    for i = 1, 12000 do filler[i] = ls[2]:gsub('"step":"a"', '"step":"a' .. i .. '"') end
    local resumed = ls[1]:gsub('"event":"run_start"', '"event":"run_start","resumed":true')
    filler[6000] = '{"event":"log","time":7}'
    put("20260101T000000Z-0000000a", table.concat({ ls[1], table.concat(filler, "\n"), resumed,
      table.concat(ls, "\n", 2) }, "\n") .. "\n")
    put("20260101T000000Z-0000000b", table.concat({ ls[1], table.concat(filler, "\n"), ls[2], ls[3] }, "\n") .. "\n{\"ev")

    local h = cli.run({ "history", "--limit", "1000", "--output", "json" }, env)
    assert.are.equal(0, h.code, h.stderr)
    local rows = cli.events(h.stdout)
    assert.are.equal(302, #rows)
    local by = {}
    for _, r in ipairs(rows) do by[r.run_id] = r end
    assert.are.same({ "cron", "ok", 1 }, { by["20260101T000000Z-0000000a"].runbook, by["20260101T000000Z-0000000a"].status,
      by["20260101T000000Z-0000000a"].resumed })
    assert.are.same({ "killed", 0 }, { by["20260101T000000Z-0000000b"].status, by["20260101T000000Z-0000000b"].resumed })
    assert.are.equal("unreadable", by[("20250101T041000Z-%08x"):format(250)].status)
    assert.matches(("%08x"):format(250) .. "%.jsonl:5: not a valid journal line", h.stderr)
    assert.are.equal("ok", by[("20250101T000100Z-%08x"):format(1)].status)
    -- report reads every line, and names the malformed one
    local r = cli.run({ "report", "20260101T000000Z-0000000a" }, env)
    assert.are.equal(2, r.code)
    assert.matches("0000000a%.jsonl:6001: not a valid journal line", r.stderr)

    local only = cli.events(cli.run({ "history", "--runbook", "other", "--output", "json" }, env).stdout)
    assert.are.same({ ("20250101T000700Z-%08x"):format(7) }, { only[1] and only[1].run_id, only[2] })
    local newest = split(cli.run({ "history", "--limit", "3" }, env).stdout)
    assert.are.equal(4, #newest)
    assert.matches("^20260101T000000Z%-0000000b +cron .* killed ", newest[2])
    assert.matches("^20260101T000000Z%-0000000a +cron .* ok%* ", newest[3])
  end)

  it("history: runs started in the same second are newest first too", function()
    local env = { RUNBOOK_STATE_DIR = cli.tmpdir() }
    local names = {}
    for i = 1, 6 do
      names[i] = "r" .. i
      cli.run({ "run", cli.runbook(('name = "r%d"\ndescription = "x"\nstep "s" { run = function() end }'):format(i)) }, env)
    end
    local js = cli.events(cli.run({ "history", "--output", "json" }, env).stdout)
    local got = {}
    for i, row in ipairs(js) do got[#js + 1 - i] = row.runbook end
    assert.are.same(names, got)
  end)
end)
