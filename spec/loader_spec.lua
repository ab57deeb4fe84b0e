-- Loading runbooks: malformed ones fail before anything runs, with exit 3 and file:line.
local cli = require("spec.support.cli")

local cases = {
  { "a syntax error", "name = 'x'\ndescription = 'd'\nstep 'a' { run = function() end\n", ":4:", "expected" },
  { "a missing name", "description = 'd'\nstep 'a' { run = function() end }\n", ":1:", "runbook has no name" },
  { "a missing description", "name = 'x'\nstep 'a' { run = function() end }\n", ":1:", "runbook has no description" },
  { "duplicate step names", "name = 'x'\ndescription = 'd'\nstep 'a' { run = function() end }\nstep 'a' { run = function() end }\n",
    ":4:", "step 'a' is declared twice" },
  { "an undeclared global read", "name = 'x'\ndescription = 'd'\nlocal v = naem\nstep 'a' { run = function() end }\n",
    ":3:", "undeclared global 'naem'" },
  { "an undeclared global write", "name = 'x'\ndescription = 'd'\ncounter = 1\nstep 'a' { run = function() end }\n",
    ":3:", "assignment to undeclared global 'counter'" },
  { "an unknown step field", "name = 'x'\ndescription = 'd'\nstep 'a' {\n run = function() end, retires = 3 }\n",
    ":3:", "step 'a': unknown field 'retires'" },
  { "a step without run", "name = 'x'\ndescription = 'd'\nstep 'a' { description = 'no body' }\n",
    ":3:", "run = function(ctx) ... end is missing" },
  { "a bad timeout", "name = 'x'\ndescription = 'd'\nstep 'a' { timeout = 'soon', run = function() end }\n",
    ":3:", "step 'a' timeout: expected a duration" },
  { "a bad param type", "name = 'x'\ndescription = 'd'\nparam 'p' { type = 'float' }\nstep 'a' { run = function() end }\n",
    ":3:", "param 'p': unknown type 'float'" },
  { "no steps", "name = 'x'\ndescription = 'd'\n", ":1:", "runbook has no steps" },
  { "a name of the wrong type", "name = 3\ndescription = 'd'\nstep 'a' { run = function() end }\n", ":1:", "name must be a string" },
  { "replaces as a string", "name = 'x'\ndescription = 'd'\nreplaces = '000-1'\nstep 'a' { run = function() end }\n",
    ":1:", "replaces must be a table, got string" },
  { "a malformed seed id in replaces", "name = 'x'\ndescription = 'd'\nreplaces = { '000-1', '00-11' }\nstep 'a' { run = function() end }\n",
    ":3: replaces", 'entry 2 ("00-11") is not a seed procedure id NNN-N' },
  { "a number in replaces", "name = 'x'\ndescription = 'd'\n\nreplaces = { 4 }\nstep 'a' { run = function() end }\n",
    ":4: replaces", "entry 1 (number) is not a seed procedure id" },
  { "a seed id named twice in replaces", "name = 'x'\ndescription = 'd'\nreplaces = { '000-1', '000-1' }\nstep 'a' { run = function() end }\n",
    ":3: replaces", "000-1 is named twice" },
  { "replaces with keys", "name = 'x'\ndescription = 'd'\nreplaces = { seed = '000-1' }\nstep 'a' { run = function() end }\n",
    ":3: replaces", "expected a list of seed procedure ids" },
}

describe("loading", function()
  teardown(cli.cleanup)

  for _, c in ipairs(cases) do
    it("rejects " .. c[1] .. " with exit 3 and file:line", function()
      local path = cli.runbook(c[2])
      for _, cmd in ipairs { "run", "lint", "describe" } do
        local r = cli.run { cmd, path }
        assert.are.equal(3, r.code, cmd .. ": " .. r.stderr)
        assert.truthy(r.stderr:find(path .. c[3], 1, true), cmd .. ": " .. r.stderr)
        assert.truthy(r.stderr:find(c[4], 1, true), cmd .. ": " .. r.stderr)
      end
    end)
  end

  it("reports an undeclared global read inside a step at its line, as a step failure", function()
    local r = cli.run { "run", cli.runbook("name = 'x'\ndescription = 'd'\nstep 'a' { run = function()\n  lgo.info('x')\nend }\n") }
    assert.are.equal(1, r.code)
    assert.truthy(r.stdout:find("undeclared global 'lgo'", 1, true), r.stdout)
    assert.truthy(r.stdout:find("rb.lua:4", 1, true), r.stdout)
  end)

  it("lets a runbook require a helper next to it, under the same rules", function()
    local d = cli.tmpdir()
    local f = io.open(d .. "/helpers.lua", "w")
    f:write("local M = {}\nfunction M.double(x) return 2 * x end\nfunction M.sneak() os.execute('true') end\nreturn M\n")
    f:close()
    f = io.open(d .. "/rb.lua", "w")
    f:write([[
name = "req" description = "d"
local h = require("helpers")
step "use" { run = function() return { v = h.double(21) } end }
step "sneak" { run = function() h.sneak() end }
]])
    f:close()
    local r = cli.run { "run", d .. "/rb.lua", "--output", "json" }
    local ends = cli.only(cli.events(r.stdout), "step_end")
    assert.are.same({ v = 42 }, ends[1].outputs)
    assert.truthy(ends[2].error.message:find("os.execute is not available in a runbook: use exec.run", 1, true))
    r = cli.run { "run", cli.runbook("name='x' description='d' local d = require 'debug' step 'a' { run = function() end }") }
    assert.are.equal(3, r.code)
    assert.truthy(r.stderr:find('require "debug": not a runbook library', 1, true), r.stderr)
  end)
end)
