-- `runbook lint`: the typos an operator would otherwise meet at 3 a.m., each
-- named file:line:col, and every shipped runbook clean.
local cli = require("spec.support.cli")

local HEAD = 'name = "typo" description = "d"\nparam "namespace" { default = "x" }\n'

-- Each row: a runbook's steps (after HEAD, so they start on line 3), and what
-- lint must print for them ("LINE:COL: message", after the file name).
local CASES = {
  { "unknown library function",
    'step "A" { run = function(ctx) k8s.scael("deploy/x", ctx.params.namespace) end }',
    "3:32: accessing undefined field 'scael' of global 'k8s'; did you mean 'scale'?" },
  { "unknown library",
    'step "A" { run = function(ctx) lgo.info(ctx.params.namespace) end }',
    "3:32: accessing undefined variable 'lgo'; did you mean 'log'?" },
  { "unknown param",
    'step "A" { run = function(ctx) return { ctx.params.namespace, ctx.params.namespcae } end }',
    "3:74: ctx.params.namespcae: typo declares no param 'namespcae'; did you mean 'namespace'?" },
  { "unknown param, indexed with a string",
    'step "A" { run = function(ctx) return { ctx.params.namespace, ctx.params["nmspace"] } end }',
    "3:74: ctx.params.nmspace: typo declares no param 'nmspace'; did you mean 'namespace'?" },
  { "unknown step in ctx.outputs",
    'step "First" { run = function(ctx) return { ctx.params.namespace } end }\n'
      .. 'step "Second" { needs = { "First" }, run = function(ctx) return ctx.outputs["Frist"] end }',
    "4:77: ctx.outputs[\"Frist\"]: typo has no step named 'Frist'; did you mean 'First'?" },
  { "unknown step in ctx.outputs, named by a local constant",
    'local FIRST = "Frist"\nstep "First" { run = function(ctx) return { ctx.params.namespace } end }\n'
      .. 'step "Second" { run = function(ctx) return ctx.outputs[FIRST] end }',
    "5:56: ctx.outputs[\"Frist\"]: typo has no step named 'Frist'; did you mean 'First'?" },
  { "unknown step in ctx.skipped",
    'step "First" { run = function(ctx) return { ctx.params.namespace } end }\n'
      .. 'step "Second" { uses = { "First" }, run = function(ctx) return ctx.skipped("Firts") end }',
    "4:76: ctx.skipped(\"Firts\"): typo has no step named 'Firts'; did you mean 'First'?" },
  { "unused param",
    'param "unused" { default = "y" }\nstep "A" { run = function(ctx) return { ctx.params.namespace } end }',
    "3:7: param 'unused' is declared but never read (no ctx.params.unused): remove it, or use it" },
  { "unused param declared with shared specs",
    'params (steps.params) { "container" }\nstep "A" { run = function(ctx) return { ctx.params.namespace } end }',
    "3:25: param 'container' is declared but never read (no ctx.params.container): remove it, or use it" },
  { "outputs of a step not declared in needs or uses",
    'step "First" { run = function(ctx) return { ctx.params.namespace } end }\n'
      .. 'step "Second" { run = function(ctx) return ctx.outputs.First end }',
    "4:56: step 'Second' reads 'First' (ctx.outputs) without declaring it" },
  { "assignment to an undeclared global",
    'step "A" { run = function(ctx) result = ctx.params.namespace end }',
    "3:32: setting non-standard global variable 'result'" },
}

describe("lint", function()
  teardown(cli.cleanup)

  for _, case in ipairs(CASES) do
    it("names file:line:col of: " .. case[1], function()
      local path = cli.runbook(HEAD .. case[2] .. "\n")
      local r = cli.run { "lint", path }
      assert.are.equal(1, r.code, r.stdout .. r.stderr)
      assert.truthy(r.stdout:find(path .. ":" .. case[3], 1, true), case[3] .. "\n" .. r.stdout)
      assert.are.equal(1, select(2, r.stdout:gsub("\n", "")), r.stdout)   -- that problem alone
    end)
  end

  it("does not count a param read by a shared step of the stdlib as unused", function()
    local path = cli.runbook(HEAD .. [[
param "writers" { default = "backend" }
param "timeout" { type = "duration", default = "1m" }
step "Stop writes" (steps.stop_writers {})
]])
    local r = cli.run { "lint", path }
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
  end)

  it("knows every function of every library a runbook can use (the definition is made from the stdlib)", function()
    local env = require("runbook.env")
    local lines = { 'name = "all" description = "every library function"', 'step "A" { run = function()' }
    for global, module in pairs(env.libraries) do
      for k, v in pairs(require(module)) do
        if type(k) == "string" and type(v) == "function" then lines[#lines + 1] = ("  do local _ = %s.%s end"):format(global, k) end
      end
    end
    assert.is_true(#lines > 100, #lines .. " library functions")
    lines[#lines + 1] = "end }"
    local r = cli.run { "lint", cli.runbook(table.concat(lines, "\n")) }
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
  end)

  it("finds every shipped runbook clean", function()
    local p = io.popen("ls runbooks/*.lua examples/*.lua")
    local files = {}
    for f in p:lines() do files[#files + 1] = f end
    p:close()
    assert.is_true(#files > 15)
    local r = cli.run { "lint", table.unpack(files) }
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    for _, f in ipairs(files) do assert.truthy(r.stdout:find(f .. ": ok (", 1, true), f .. "\n" .. r.stdout) end
  end)
end)
