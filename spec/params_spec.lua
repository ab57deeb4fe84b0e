-- Params: parsing, types, defaults and the errors that stop a run before it starts.
local cli = require("spec.support.cli")

local RB = [[
name = "p"
description = "params under test"
param "who" { type = "string", required = true, help = "who to greet" }
param "n" { type = "number", default = 2 }
param "count" { type = "integer", default = 1 }
param "loud" { type = "boolean", default = false }
param "wait" { type = "duration", default = "5m" }
param "color" { type = "enum", values = { "blue", "green" }, default = "blue" }
param "token" { type = "string", secret = true, default = "none-set" }
step "Show" { run = function(ctx) return { who = ctx.params.who, n = ctx.params.n, count = ctx.params.count,
  loud = ctx.params.loud, wait = ctx.params.wait, color = ctx.params.color } end }
]]

local function outputs(r)
  for _, e in ipairs(cli.events(r.stdout)) do
    if e.event == "step_end" then return e.outputs end
  end
end

describe("params", function()
  local path
  setup(function() path = cli.runbook(RB) end)
  teardown(cli.cleanup)

  it("converts each type and applies defaults", function()
    local r = cli.run { "run", path, "--output", "json", "-p", "who=ops", "-p", "loud=yes", "-p", "wait=1m30s",
      "-p", "n=2.5", "-p", "count=7", "-p", "color=green" }
    assert.are.equal(0, r.code, r.stderr)
    assert.are.same({ who = "ops", n = 2.5, count = 7, loud = true, wait = 90, color = "green" }, outputs(r))
    r = cli.run { "run", path, "--output", "json", "-p", "who=x" }
    assert.are.same({ who = "x", n = 2, count = 1, loud = false, wait = 300, color = "blue" }, outputs(r))
  end)

  it("reads --params-file in YAML and JSON, with -p taking precedence", function()
    local d = cli.tmpdir()
    local y = io.open(d .. "/p.yaml", "w"); y:write("who: yaml\nn: 4\nloud: true\n"); y:close()
    local j = io.open(d .. "/p.json", "w"); j:write('{"who": "json", "color": "green"}'); j:close()
    local r = cli.run { "run", path, "--output", "json", "--params-file", d .. "/p.yaml", "-p", "n=5" }
    assert.are.equal(0, r.code, r.stderr)
    assert.are.same({ who = "yaml", n = 5, count = 1, loud = true, wait = 300, color = "blue" }, outputs(r))
    r = cli.run { "run", path, "--output", "json", "--params-file", d .. "/p.json" }
    assert.are.equal("json", outputs(r).who)
  end)

  local bad = {
    { { "-p", "n=3" }, "missing required param 'who'" },
    { { "-p", "who=x", "-p", "nope=1" }, "unknown param 'nope'" },
    { { "-p", "who=x", "-p", "n=many" }, "param 'n': expected a number, got \"many\"" },
    { { "-p", "who=x", "-p", "n=1e999" }, "param 'n': 1e999 is not a finite number" },
    { { "-p", "who=x", "-p", "n=-1e999" }, "param 'n': -1e999 is not a finite number" },
    { { "-p", "who=x", "-p", "count=1.5" }, "param 'count': expected an integer" },
    { { "-p", "who=x", "-p", "loud=perhaps" }, "param 'loud': expected a boolean" },
    { { "-p", "who=x", "-p", "wait=soon" }, "param 'wait': expected a duration" },
    { { "-p", "who=x", "-p", "color=red" }, "param 'color': \"red\" is not one of: blue, green" },
    { { "-p", "who" }, "-p who: expected key=value" },
    { { "-p", "who=x", "--params-file", "/nonexistent.yaml" }, "--params-file" },
  }
  for _, case in ipairs(bad) do
    it("rejects " .. table.concat(case[1], " ") .. " with exit 2 before running", function()
      local args = { "run", path }
      for _, a in ipairs(case[1]) do args[#args + 1] = a end
      local r = cli.run(args)
      assert.are.equal(2, r.code)
      assert.truthy(r.stderr:find(case[2], 1, true), r.stderr)
      assert.are.equal("", r.stdout)
    end)
  end

  it("never shows a secret param's value", function()
    local r = cli.run { "run", path, "--output", "json", "-p", "who=x", "-p", "token=hunter2-secret" }
    assert.are.equal(0, r.code)
    assert.falsy(r.stdout:find("hunter2-secret", 1, true))
    assert.truthy(r.stdout:find('"token":"***"', 1, true))
  end)

  -- `params (specs) { names }`: params that share their specs (steps.params), declared in one line.
  describe("declared together from shared specs", function()
    local SHARED = [[
name = "shared"
description = "d"
local specs = { target = { required = true, help = "the deployment" }, zone = { default = "eu", help = "where" } }
params (specs) { "target", "zone" }
param "own" { default = "x" }
step "Show" { run = function(ctx) return { target = ctx.params.target, zone = ctx.params.zone } end }
]]

    it("declares each name in order with its spec, shown by describe", function()
      local p = cli.runbook(SHARED)
      local r = cli.run { "run", p, "--output", "json", "-p", "target=api" }
      assert.are.equal(0, r.code, r.stderr)
      assert.are.same({ target = "api", zone = "eu" }, outputs(r))
      assert.are.equal(2, cli.run { "run", p }.code)
      local d = cli.run { "describe", p }
      local at_target, at_zone, at_own = d.stdout:find("target", 1, true), d.stdout:find("zone", 1, true),
        d.stdout:find("own", 1, true)
      assert.truthy(at_target and at_zone and at_own and at_target < at_zone and at_zone < at_own, d.stdout)
      assert.truthy(d.stdout:find("the deployment", 1, true), d.stdout)
    end)

    it("rejects a name the specs do not have, with exit 3 and file:line", function()
      local p = cli.runbook((SHARED:gsub('"zone" }', '"zoen" }')))
      local r = cli.run { "describe", p }
      assert.are.equal(3, r.code, r.stderr)
      assert.truthy(r.stderr:find(p .. ":4:", 1, true), r.stderr)
      assert.truthy(r.stderr:find("params: no shared spec 'zoen' (known: target, zone)", 1, true), r.stderr)
    end)
  end)

  -- type = "list": comma- or space-separated text, or a list in a params file; the step sees a table.
  describe("of type list", function()
    local LIST = [[
name = "lists"
description = "d"
param "topics" { type = "list", default = "a,b", help = "topics" }
param "keys" { type = "list", default = "", secret = true }
param "gate" { default = "" }
step "Show" { run = function(ctx) return { topics = ctx.params.topics, n = #ctx.params.topics, keys = #ctx.params.keys } end }
step "Gate" { run = function(ctx)
  if ctx.params.gate ~= "" and not io.open(ctx.params.gate) then error("gate closed", 0) end
  return { topics = ctx.params.topics }
end }
]]
    local p
    setup(function() p = cli.runbook(LIST) end)

    it("splits -p text and takes a list from a params file", function()
      local r = cli.run { "run", p, "--output", "json", "-p", "topics=x, y,,z" }
      assert.are.equal(0, r.code, r.stderr)
      assert.are.same({ topics = { "x", "y", "z" }, n = 3, keys = 0 }, outputs(r))
      r = cli.run { "run", p, "--output", "json" }
      assert.are.same({ topics = { "a", "b" }, n = 2, keys = 0 }, outputs(r))
      r = cli.run { "run", p, "--output", "json", "-p", "topics=" }
      assert.are.equal(0, outputs(r).n)
      local d = cli.tmpdir()
      cli.write(d .. "/p.yaml", "topics: [one, two]\n")
      r = cli.run { "run", p, "--output", "json", "--params-file", d .. "/p.yaml" }
      assert.are.equal(0, r.code, r.stderr)
      assert.are.same({ "one", "two" }, outputs(r).topics)
      cli.write(d .. "/bad.yaml", "topics: [{name: one}]\n")
      r = cli.run { "run", p, "--params-file", d .. "/bad.yaml" }
      assert.are.equal(2, r.code)
      assert.truthy(r.stderr:find("param 'topics': expected a list of strings", 1, true), r.stderr)
      assert.truthy(cli.run { "describe", p }.stdout:find("list, default a,b", 1, true))
    end)

    it("keeps a secret list's items out of the output", function()
      local r = cli.run { "run", p, "--output", "json", "-v", "-p", "keys=sekrit-one,sekrit-two" }
      assert.are.equal(0, r.code, r.stderr)
      assert.are.equal(2, outputs(r).keys)
      assert.falsy((r.stdout .. r.stderr):find("sekrit", 1, true))
    end)

    it("is the same list when the run is resumed", function()
      local gate = cli.tmpdir() .. "/open"
      local r = cli.run { "run", p, "--output", "json", "-p", "topics=t1,t2", "-p", "gate=" .. gate }
      assert.are.equal(1, r.code, r.stderr)
      local id = cli.only(cli.events(r.stdout), "run_start")[1].run_id
      cli.write(gate, "")
      r = cli.run { "resume", id, "--output", "json", "-p", "keys=" }
      assert.are.equal(0, r.code, r.stderr)
      local ends = cli.only(cli.events(r.stdout), "step_end")
      assert.are.same({ topics = { "t1", "t2" } }, ends[#ends].outputs)
    end)
  end)
end)
