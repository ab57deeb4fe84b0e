-- The step engine: order, outputs, when, retries, timeouts, undo, modes.
local cli = require("spec.support.cli")

local function run_json(src, extra)
  local args = { "run", cli.runbook(src), "--output", "json", "--yes" }
  for _, a in ipairs(extra or {}) do args[#args + 1] = a end
  local r = cli.run(args)
  r.events = cli.events(r.stdout)
  return r
end

local function statuses(r)
  local out = {}
  for _, e in ipairs(cli.only(r.events, "step_end")) do out[#out + 1] = e.step .. "=" .. e.status end
  return table.concat(out, " ")
end

describe("engine", function()
  teardown(cli.cleanup)

  it("runs steps in order and passes outputs along", function()
    local r = run_json [[
name = "order" description = "d"
step "one" { run = function(ctx) log.info("first") return { n = 1 } end }
step "two" { run = function(ctx) return { n = ctx.outputs.one.n + 1 } end }
step "three" { run = function(ctx) log.info("got %d", ctx.outputs.two.n) end }
]]
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("one=ok two=ok three=ok", statuses(r))
    local logs = cli.only(r.events, "log")
    assert.are.equal("first", logs[1].message)
    assert.are.equal("got 2", logs[2].message)
    assert.are.same({ n = 2 }, cli.only(r.events, "step_end")[2].outputs)
    local kinds = {}
    for _, e in ipairs(r.events) do kinds[#kinds + 1] = e.event end
    assert.are.equal("run_start", kinds[1])
    assert.are.equal("run_end", kinds[#kinds])
  end)

  it("skips a step whose when is false and shows it", function()
    local r = run_json [[
name = "when" description = "d"
param "go" { type = "boolean", default = false }
step "maybe" { when = function(ctx) return ctx.params.go end, run = function() return { ran = true } end }
step "after" { run = function(ctx) return { saw = ctx.outputs.maybe.ran } end }
]]
    assert.are.equal(1, r.code)
    assert.are.equal("maybe=skipped after=failed", statuses(r))
    local failed = cli.only(r.events, "step_end")[2]
    assert.truthy(failed.error.message:find('ctx.outputs["maybe"]: that step was skipped (its when predicate was false)',
      1, true), failed.error.message)
    assert.truthy(failed.error.where:match("rb%.lua:4$"), failed.error.where)
  end)

  it("tells later steps which earlier ones were skipped and why (ctx.skipped)", function()
    local r = run_json [[
name = "skipped" description = "d"
step "maybe" { when = function() return false end, run = function() end }
step "sure" { run = function() return {} end }
step "after" { run = function(ctx)
  local ok, err = pcall(ctx.skipped, "nope")
  return { maybe = ctx.skipped("maybe"), sure = ctx.skipped("sure") or "ran", unknown = not ok and err or "" }
end }
]]
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    local out = cli.only(r.events, "step_end")[3].outputs
    assert.are.equal("when", out.maybe)
    assert.are.equal("ran", out.sure)
    assert.truthy(out.unknown:find('ctx.skipped["nope"]: there is no step of that name', 1, true), out.unknown)
  end)

  it("stops at the first failing step with exit 1 and the runbook's file:line", function()
    local r = run_json [[
name = "fail" description = "d"
step "ok" { run = function() end }
step "bad" { run = function()
  local x = nil
  return { v = x.field }
end }
step "never" { run = function() end }
]]
    assert.are.equal(1, r.code)
    assert.are.equal("ok=ok bad=failed", statuses(r))
    local e = cli.only(r.events, "step_end")[2].error
    assert.truthy(e.where:match("rb%.lua:5$"), e.where)
    assert.truthy(e.message:find("attempt to index a nil value"), e.message)
    assert.are.equal("failed", cli.only(r.events, "run_end")[1].status)
  end)

  it("retries with exponential backoff, within bounded time", function()
    local src = [[
name = "retry" description = "d"
local tries = 0
step "flaky" { retry = { attempts = 4, backoff = "exponential", base = "100ms", max = "250ms", jitter = false },
  run = function(ctx)
    tries = tries + 1
    if tries < 4 then error("not yet " .. tries) end
    return { tries = tries, attempt = ctx.attempt }
  end }
]]
    local r = run_json(src)
    assert.are.equal(0, r.code, r.stderr)
    local e = cli.only(r.events, "step_end")[1]
    assert.are.same({ tries = 4, attempt = 4 }, e.outputs)
    assert.are.equal(4, e.attempts)
    -- delays 0.1 + 0.2 + 0.25 (capped) = 0.55 s
    assert.is_true(e.duration >= 540 and e.duration < 1500, tostring(e.duration))   -- ms
    assert.are.equal(3, #cli.only(r.events, "log"))
  end)

  it("fails after the last attempt", function()
    local r = run_json [[
name = "retry" description = "d"
step "always" { retry = { attempts = 2, base = "10ms" }, run = function() error("still broken") end }
]]
    assert.are.equal(1, r.code)
    local e = cli.only(r.events, "step_end")[1]
    assert.are.equal(2, e.attempts)
    assert.truthy(e.error.message:find("still broken", 1, true))
  end)

  it("times out a step that runs too long, even one that catches errors", function()
    local r = run_json [[
name = "slow" description = "d"
step "spin" { timeout = "300ms", run = function()
  while true do pcall(function() for i = 1, 1e6 do end end) end
end }
step "sleepy" { run = function() end }
]]
    assert.are.equal(1, r.code)
    local e = cli.only(r.events, "step_end")[1]
    assert.are.equal("timed out after 300ms", e.error.message)
    assert.is_true(e.duration < 2000, tostring(e.duration))
  end)

  it("times out a sleeping step at its deadline", function()
    local r = run_json [[
name = "slow" description = "d"
step "nap" { timeout = "200ms", run = function() time.sleep("10s") end }
]]
    assert.are.equal(1, r.code)
    local e = cli.only(r.events, "step_end")[1]
    assert.are.equal("timed out after 200ms", e.error.message)
    assert.is_true(e.duration < 1000, tostring(e.duration))
  end)

  it("timeout = false runs a step without a deadline; any other value is refused at load", function()
    local r = run_json [[
name = "free" description = "d"
step "a" { timeout = false, run = function(ctx) return { unbounded = ctx.remaining() == math.huge } end }
step "b" { run = function(ctx) return { unbounded = ctx.remaining() == math.huge } end }
]]
    assert.are.equal(0, r.code)
    local ends = cli.only(r.events, "step_end")
    assert.are.same({ true, false }, { ends[1].outputs.unbounded, ends[2].outputs.unbounded })
  end)

  it("a backend's timeout keeps its own words: the module, the operation and the target", function()
    local r = run_json [[
name = "slow" description = "d"
step "wait" { timeout = "300ms", run = function() exec.run { "sleep", "10" } end }
]]
    assert.are.equal(1, r.code)
    local e = cli.only(r.events, "step_end")[1]
    assert.matches("^timed out after 300ms in exec%.run: sleep: timed out", e.error.message)
  end)

  it("undoes completed steps in reverse order when on_failure = \"undo\"", function()
    local r = run_json [[
name = "undo" description = "d"
on_failure = "undo"
step "a" { run = function() return { v = "A" } end, undo = function(ctx, out) log.info("undo a " .. out.v) end }
step "b" { run = function() end }
step "c" { run = function() end, undo = function() log.info("undo c") end }
step "d" { run = function() error("boom") end, undo = function() log.info("undo d must not run") end }
]]
    assert.are.equal(1, r.code)
    local undos = {}
    for _, e in ipairs(r.events) do
      if e.event == "undo_end" then undos[#undos + 1] = e.step .. "=" .. e.status end
      if e.event == "log" then undos[#undos + 1] = e.message end
    end
    assert.are.same({ "undo c", "c=ok", "undo a A", "a=ok" }, undos)
  end)

  it("undoes with --undo-on-failure, and not without it", function()
    local src = [[
name = "undo" description = "d"
step "a" { run = function() end, undo = function() log.info("undone") end }
step "b" { run = function() error("boom") end }
]]
    assert.are.equal(1, #cli.only(run_json(src, { "--undo-on-failure" }).events, "undo_end"))
    assert.are.equal(0, #cli.only(run_json(src).events, "undo_end"))
  end)

  it("starts at --from, and rejects an unknown step name", function()
    local src = [[
name = "from" description = "d"
step "one" { run = function() return { x = 1 } end }
step "two" { run = function() return { y = 2 } end }
]]
    local r = run_json(src, { "--from", "two" })
    assert.are.equal(0, r.code)
    assert.are.equal("two=ok", statuses(r))
    r = run_json(src, { "--from", "zero" })
    assert.are.equal(2, r.code)
    assert.truthy(r.stderr:find("no step named 'zero'", 1, true))
  end)

  it("rejects outputs that cannot be recorded", function()
    local r = run_json [[
name = "out" description = "d"
step "fn" { run = function() return { f = function() end } end }
]]
    assert.are.equal(1, r.code)
    assert.truthy(cli.only(r.events, "step_end")[1].error.message:find("cannot be recorded as JSON", 1, true))
  end)

  it("prints plain lines without a terminal", function()
    local r = cli.run { "run", cli.runbook [[
name = "plain" description = "d"
step "one" { description = "first", run = function() log.warn("careful") end }
step "two" { when = function() return false end, run = function() end }
]] }
    assert.are.equal(0, r.code)
    assert.truthy(r.stdout:find("[1/2] one: first", 1, true), r.stdout)
    assert.truthy(r.stdout:find("| WARN careful", 1, true), r.stdout)
    assert.truthy(r.stdout:find("ok one", 1, true), r.stdout)
    assert.truthy(r.stdout:find("- two skipped", 1, true) or r.stdout:find("skipped two", 1, true)
      or r.stdout:find("two skipped", 1, true), r.stdout)
    assert.truthy(r.stdout:find("1 ok, 0 failed, 1 skipped", 1, true), r.stdout)
    assert.falsy(r.stdout:find("\27", 1, true))
  end)

  it("skips a step whose needed step was skipped, with that reason, transitively; or runs its fallback", function()
    local r = run_json [[
name = "needs" description = "d"
step "A" { when = function() return false end, run = function() return { n = 1 } end }
step "B" { needs = { "A" }, run = function(ctx) return { n = ctx.outputs.A.n } end }
step "C" { needs = { "B" }, run = function(ctx) return { n = ctx.outputs.B.n } end }
step "D" { needs = { "A" }, run = function(ctx) return { n = ctx.outputs.A.n } end,
  fallback = function(ctx) return { n = 0, why = ctx.skipped("A") } end }
step "E" { uses = { "C" }, run = function(ctx) return { c = not ctx.skipped("C") } end }
]]
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("A=skipped B=skipped C=skipped D=ok E=ok", statuses(r))
    local ends = cli.only(r.events, "step_end")
    assert.are.equal("needs", ends[2].reason)
    assert.are.equal("A", ends[2].needs)
    assert.are.equal("B", ends[3].needs)
    assert.are.same({ n = 0, why = "when" }, ends[4].outputs)
    assert.is_true(ends[4].fallback)
    assert.are.same({ c = false }, ends[5].outputs)
  end)

  it("gives run the outputs of the steps it needs, in order, after ctx", function()
    local r = run_json [[
name = "args" description = "d"
step "A" { run = function() return { n = 1 } end }
step "B" { run = function() end }
step "C" { needs = { "A", "B" }, run = function(ctx, a, b) return { n = a.n, b = next(b) == nil, extra = select("#", ctx, a, b) } end }
]]
    assert.are.equal(0, r.code, r.stderr)
    assert.are.same({ n = 1, b = true, extra = 3 }, cli.only(r.events, "step_end")[3].outputs)
  end)

  it("refuses at load a need that names no earlier step", function()
    local r = cli.run { "run", cli.runbook [[
name = "bad-needs" description = "d"
step "A" { needs = { "B" }, run = function() end }
step "B" { run = function() end }
]] }
    assert.are.equal(3, r.code)
    assert.truthy(r.stderr:find('rb.lua:2: step \'A\': needs "B": no earlier step has that name', 1, true), r.stderr)
  end)

  it("lint reports a step reading the outputs of a step it does not declare", function()
    local path = cli.runbook [[
name = "undeclared" description = "d"
step "A" { run = function() return { n = 1 } end }
step "B" { needs = { "A" }, run = function(ctx) return { n = ctx.outputs["A"].n } end }
step "C" { run = function(ctx)
  if ctx.skipped("A") then return end
  return { n = ctx.outputs.B.n }
end }
]]
    local r = cli.run { "lint", path }
    assert.are.equal(1, r.code, r.stdout)
    assert.truthy(r.stdout:find(path .. ":5:18: step 'C' reads 'A'", 1, true), r.stdout)
    assert.truthy(r.stdout:find(path .. ":6:28: step 'C' reads 'B'", 1, true), r.stdout)
    assert.falsy(r.stdout:find("step 'B'", 1, true), r.stdout)
  end)
end)
