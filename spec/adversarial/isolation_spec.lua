-- Class 1: host state a runbook can reach. Each variant assigns or replaces
-- something the host also uses (a library table, a standard table, a
-- metatable) and then tries to write a file or change what the host prints.
local adv = require("spec.adversarial.support")
local cli = require("spec.support.cli")
local assert = require("luassert")

local WRITE = [[ fs.write(DIR .. "/x", "y") ]]
local OPEN = [[ local f = io.open(DIR .. "/x", "w") f:write("y") f:close() ]]
local PERFORM = "function(e) return e.perform() end"

local function prints_no(word)
  return function(r) assert.falsy(r.stdout:find(word, 1, true), r.stdout) end
end

local VARIANTS = {
  { "gate.effect replaced", step = "gate.effect = " .. PERFORM .. WRITE },
  { "gate.effect replaced by rawset", step = "rawset(gate, 'effect', " .. PERFORM .. ")" .. WRITE },
  { "gate.effect replaced through require", step = "require('gate').effect = " .. PERFORM .. WRITE },
  { "gate.effect replaced in a chunk from load", step = "load('gate.effect = " .. PERFORM .. "')()" .. WRITE },
  { "gate.effect removed by rawset and supplied by a metatable set on gate", step = [[
      local perform = ]] .. PERFORM .. [[
      setmetatable(gate, { __index = function(_, k) if k == "effect" then return perform end end })
      rawset(gate, "effect", nil) ]] .. WRITE },
  { "string.match replaced (the host's io.open mode check)", step = "string.match = function() return true end" .. OPEN },
  { "the string metatable's __index.match replaced",
    step = "getmetatable('').__index.match = function() return true end" .. OPEN },
  { "the string metatable's __index swapped for a table of our own", step = [[
      local s = {} for k, v in pairs(string) do s[k] = v end
      s.match = function() return true end
      getmetatable("").__index = s ]] .. OPEN },
  { "rawset into the string metatable's __index",
    step = "rawset(getmetatable('').__index, 'match', function() return true end)" .. OPEN },
  { "fs.write at the top level, while the runbook loads", source = [[
      name = "load" description = "writes while it loads"
      param "dir" { required = true }
      fs.write(os.getenv("ADVERSARIAL_DIR") .. "/x", "y")
      step "nothing" { run = function() end } ]] },
  { "string.format replaced (the host's log lines)",
    step = "string.format = function() return 'HACKED' end print('hello')", check = prints_no("HACKED") },
  { "table.concat replaced (the host's print)",
    step = "table.concat = function() return 'HACKED' end print('a', 'b')", check = prints_no("HACKED") },
  { "the error metatable's __tostring replaced",
    step = [[ local _, e = pcall(fs.read, DIR .. "/none")
      getmetatable(e).__tostring = function() return "HACKED" end
      fs.read(DIR .. "/none") ]], check = prints_no("HACKED") },
  { "ctx.log.info replaced (the host's print)",
    step = "pcall(function() ctx.log.info = function() end end) print('hello')", check = function(r)
      assert.truthy(r.stdout:find("hello", 1, true), r.stdout) end },
  { "file handles' write replaced (the host's output)",
    step = "getmetatable(io.stdout).__index.write = function() return true end",
    check = function(r) assert.truthy(r.stdout:find('"run_end"', 1, true), r.stdout) end },
}

describe("adversarial: host state a runbook can reach", function()
  teardown(cli.cleanup)
  for _, v in ipairs(VARIANTS) do it(v[1], function() adv.check(v) end) end

  it("still reads through library tables and their nested tables, and lists them with pairs", function()
    local r = adv.check { "reads", step = [[
      local n = 0 for _ in pairs(fs) do n = n + 1 end
      assert(n > 3 and type(fs.read) == "function" and type(kafka.Client) == "table")
      assert(yaml.load("a: ~").a == yaml.null and yaml.null == yaml.load("~"))
      assert(("x"):rep(3) == "xxx" and getmetatable("").__index.rep == string.rep)
      string.upper = function() return "mine" end
      assert(string.upper("a") == "mine" and ("a"):upper() == "A")
      local mt = {} setmetatable({}, mt)
      assert(getmetatable(setmetatable({}, mt)) == mt) ]] }
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
  end)

  it("says which table is read-only", function()
    local r = adv.check { "assignment", step = "fs.write = nil" }
    assert.are.equal(1, r.code)
    assert.truthy(r.stdout:find("fs.write: fs is read-only in a runbook", 1, true), r.stdout)
  end)
end)
