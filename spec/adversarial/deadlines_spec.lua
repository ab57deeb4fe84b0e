-- Class 6: deadlines. Each variant's code does not stop by itself: caught by
-- the count hook (exit 1, the step fails "timed out") or, where Lua cannot
-- interrupt it, ended by the watchdog (exit 124); either way within its
-- limit plus the watchdog's grace. On a host without a hard bound these ran
-- on; `timeout` ends them so the spec fails instead of hanging.
local adv = require("spec.adversarial.support")
local cli = require("spec.support.cli")
local assert = require("luassert")
local host = require("runbook.host")

local HEAD = 'name = "deadline" description = "does not stop"\nparam "dir" { required = true }\n'
local SLACK = 6   -- seconds: a loaded machine starts and reports slowly

local function stopped_within(limit)
  return function(r)
    assert.truthy(r.code == 1 or r.code == 124, ("exit %s after %.1fs\n%s%s"):format(
      tostring(r.code), r.seconds, r.stdout, r.stderr))
    assert.truthy(r.seconds < limit + host.watchdog_grace + SLACK, ("took %.1fs"):format(r.seconds))
    assert.truthy((r.stdout .. r.stderr):find("timed out", 1, true), r.stdout .. r.stderr)
  end
end

local function step(run, extra)
  return ('step "stuck" { timeout = "1s", %s run = function() %s end }\n'):format(extra or "", run)
end

local LOOP = "while true do end"
local MATCH = '("a"):rep(4000):find(".-.-.-.-b")'   -- an expression: `local _ = ` makes it a statement

local VARIANTS = {
  { "a coroutine created at load, resumed in a step",
    source = HEAD .. "local co = coroutine.create(function() " .. LOOP .. " end)\n" .. step("coroutine.resume(co)") },
  { "a coroutine.wrap created at load, called in a step",
    source = HEAD .. "local f = coroutine.wrap(function() " .. LOOP .. " end)\n" .. step("f()") },
  { "a long pattern match inside C (find)", source = HEAD .. step("local _ = " .. MATCH) },
  { "a long pattern match inside C (gsub)", source = HEAD .. step('local _ = ("a"):rep(4000):gsub(".-.-.-.-b", "")') },
  { "an xpcall handler that loops",
    source = HEAD .. step("xpcall(function() " .. LOOP .. " end, function() " .. LOOP .. " end)") },
  { "a when predicate that loops", source = HEAD .. step("", "when = function() " .. LOOP .. " end,") },
  { "a when predicate stuck in C", source = HEAD .. step("", "when = function() return " .. MATCH .. " end,") },
  { "an undo that loops", source = HEAD .. 'on_failure = "undo"\n' .. step("", "undo = function() " .. LOOP .. " end,")
      .. 'step "fails" { run = function() error("so the first is undone") end }\n' },
}
for _, v in ipairs(VARIANTS) do v.check, v.under = stopped_within(1), { "timeout", "-s", "KILL", "40" } end

-- The two rows below wait out fixed limits (30 s, 10 s): they run in the
-- background beside the rows before them (`beside`: how long to wait for them).
VARIANTS[#VARIANTS + 1] = { "a notify hook that loops", under = { "timeout", "-s", "KILL", "60" }, beside = 90,
  source = HEAD .. "notify = { on_failure = function() " .. LOOP .. " end }\n"
    .. 'step "fails" { run = function() error("so the hook runs") end }\n',
  check = function(r)
    assert.are.equal(1, r.code, r.stdout .. r.stderr)
    assert.truthy(r.seconds < require("runbook.deadline").LIMIT.notify + SLACK, ("took %.1fs"):format(r.seconds))
    assert.truthy(r.stdout:find("notify hook failed", 1, true), r.stdout)
  end }
VARIANTS[#VARIANTS + 1] = { "top-level code that loops while the runbook loads", under = { "timeout", "-s", "KILL", "40" },
  beside = 70,
  source = HEAD .. LOOP .. "\n",
  check = function(r)
    assert.are.equal(3, r.code, r.stdout .. r.stderr)
    assert.truthy(r.stderr:find("its top-level code did not finish within", 1, true), r.stderr)
    assert.truthy(r.seconds < require("runbook.deadline").LIMIT.load + SLACK, ("took %.1fs"):format(r.seconds))
  end }

describe("adversarial: deadlines", function()
  local started = {}
  setup(function()
    for _, v in ipairs(VARIANTS) do if v.beside then started[v] = adv.start(v, v.beside) end end
  end)
  teardown(cli.cleanup)
  for _, v in ipairs(VARIANTS) do
    it(v[1], function() if started[v] then started[v]() else adv.check(v) end end)
  end

  it("a step stuck in C exits within the grace of its first SIGTERM", function()
    local path = cli.runbook(HEAD .. 'step "stuck" { run = function() local _ = ' .. MATCH .. " end }\n")
    local run = cli.spawn { "run", path, "--dry-run", "-p", "dir=/" }
    os.execute("sleep 1")
    local t0 = host.now()
    os.execute("kill -TERM " .. run.pid)
    local waited
    for _ = 1, 10 * (host.watchdog_grace + SLACK) do
      if cli.slurp(run.dir .. "/code") ~= "" then waited = host.now() - t0; break end
      os.execute("sleep 0.1")
    end
    if not waited then os.execute("kill -KILL " .. run.pid) end
    assert.truthy(waited, "still running after SIGTERM")
    assert.are.equal(143, (run.wait()))
    assert.are.same({}, adv.processes(path))
  end)
end)

describe("the watchdog", function()
  teardown(cli.cleanup)

  it("journals the step as timed out and exits 124; the run resumes", function()
    local dir = cli.tmpdir()
    local path = cli.runbook(HEAD .. [[
      step "stuck once" { timeout = "1s", idempotent = true, run = function(ctx)
        if not fs.exists(ctx.params.dir .. "/once") then
          fs.write(ctx.params.dir .. "/once", "")
          local _ = ]] .. MATCH .. [[
        end
      end }
      step "after" { run = function() end } ]])
    local r = cli.run({ "run", path, "-p", "dir=" .. dir }, nil, { "timeout", "-s", "KILL", "40" })
    assert.are.equal(124, r.code, r.stdout .. r.stderr)
    local id = r.stderr:match("runbook resume (%S+)")
    assert.truthy(id, r.stderr)
    local events = cli.events(cli.slurp(os.getenv("RUNBOOK_STATE_DIR") .. "/runs/" .. id .. ".jsonl"))
    local last, before = events[#events], events[#events - 1]
    assert.are.same({ "run_end", "timed_out", 124 }, { last.event, last.status, last.exit_code })
    assert.are.same({ "step_end", "stuck once", "interrupted", "timeout" },
      { before.event, before.step, before.status, before.error.code })
    local resumed = cli.run { "resume", id }
    assert.are.equal(0, resumed.code, resumed.stdout .. resumed.stderr)
  end)
end)
