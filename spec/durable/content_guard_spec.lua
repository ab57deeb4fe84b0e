-- The content guard covers everything a run loaded: a resume refuses when a
-- Lua file the runbook required (at load or inside a step) or its params file
-- changed since, naming each by path and sha256; --force runs the new text.
local cli = require("spec.support.cli")
local cjson = require("cjson")

local write = cli.write

local function killed_run(dir, state)
  write(dir .. "/rb.lua", [[
name = "guarded"
description = "requires helpers"
param "n" { default = "1" }
param "dir" { required = true }
local early = require("early")
step "a" { run = function(ctx) require("late").mark(ctx); early.mark(ctx) end }
step "b" { run = function(ctx)
  log.info("holding")
  for _ = 1, 600 do if not fs.exists(ctx.params.dir .. "/hold") then return end time.sleep(0.05) end
end }
]])
  write(dir .. "/early.lua", 'return { mark = function(ctx) log.info("early v1") end }\n')
  write(dir .. "/late.lua", 'return { mark = function(ctx) log.info("late v1") end }\n')
  write(dir .. "/params.yaml", 'n: "2"\n')
  write(dir .. "/hold", "")
  local p = cli.spawn({ "run", dir .. "/rb.lua", "--params-file", dir .. "/params.yaml", "-p", "dir=" .. dir },
    { RUNBOOK_STATE_DIR = state })
  cli.eventually(function()
    local p2 = io.popen("cat " .. state .. "/runs/*.jsonl 2>/dev/null")
    local t = p2:read("a")
    p2:close()
    return t:find('"message":"holding"', 1, true) ~= nil
  end, "step b")
  os.execute("kill -KILL " .. p.pid)
  p.wait()
  os.remove(dir .. "/hold")
  local l = io.popen("ls " .. state .. "/runs")
  local id = l:read("l"):gsub("%.jsonl$", "")
  l:close()
  return id
end

describe("resume's content guard", function()
  after_each(cli.cleanup)

  local cases = {
    { "a file required at load", "early.lua", 'return { mark = function() log.info("early v2") end }\n', "required by the runbook" },
    { "a file required inside a step", "late.lua", 'return { mark = function() log.info("late v2") end }\n', "required by the runbook" },
    { "the params file", "params.yaml", 'n: "3"\n', "the params file" },
  }
  for _, c in ipairs(cases) do
    it("refuses when " .. c[1] .. " changed, naming it; --force runs the new text", function()
      local dir, state = cli.tmpdir(), cli.tmpdir()
      local env = { RUNBOOK_STATE_DIR = state }
      local id = killed_run(dir, state)
      write(dir .. "/" .. c[2], c[3])
      local r = cli.run({ "resume", id }, env)
      assert.are.equal(2, r.code, r.stderr)
      assert.truthy(r.stderr:find(dir .. "/" .. c[2] .. " (" .. c[4] .. "): sha256 was ", 1, true), r.stderr)
      assert.is_nil(r.stderr:find("traceback", 1, true))
      -- unchanged files are not named
      for _, other in ipairs { "early.lua", "late.lua", "params.yaml" } do
        if other ~= c[2] then assert.is_nil(r.stderr:find(dir .. "/" .. other, 1, true)) end
      end
      r = cli.run({ "resume", id, "--force" }, env)
      assert.are.equal(0, r.code, r.stderr)
    end)
  end

  it("resumes without a word when nothing it loaded changed", function()
    local dir, state = cli.tmpdir(), cli.tmpdir()
    local id = killed_run(dir, state)
    local events = {}
    for l in cli.slurp(state .. "/runs/" .. id .. ".jsonl"):gmatch("[^\n]+") do events[#events + 1] = cjson.decode(l) end
    assert.are.equal(2, #events[1].sources)            -- early.lua and the params file, at run_start
    local late = 0
    for _, e in ipairs(events) do if e.event == "source" and e.path == dir .. "/late.lua" then late = late + 1 end end
    assert.are.equal(1, late)                          -- late.lua, when step a required it
    local r = cli.run({ "resume", id }, { RUNBOOK_STATE_DIR = state })
    assert.are.equal(0, r.code, r.stderr)
    assert.is_nil(r.stderr:find("changed since", 1, true))
  end)
end)
