-- The JSON lines contract (--output json, history --output json): every event
-- of every run the suite started with --output json (spec/support/cli.lua
-- keeps them) is checked by python3-jsonschema against its schema in
-- docs/events/, and for the shape of the line itself (event and time first,
-- no "\/" escapes). Busted runs a directory's files in sorted order, so this
-- file, sorting after every other one in spec/, runs once they all have; its
-- own runs make sure every event type is there when it runs alone.
local cli = require("spec.support.cli")

local UNDO = [[
name = "undo-demo" description = "a step that fails after one that can be undone"
on_failure = "undo"
param "path" { type = "string", required = true }
step "Write" {
  run = function(ctx) fs.write(ctx.params.path, "x"); return { written = ctx.params.path, none = {} } end,
  undo = function(ctx) fs.remove(ctx.params.path) end,
}
step "Maybe" { when = function() return false end, run = function() end }
step "Fail" { run = function() log.warn("about to fail\non two lines"); error("it broke") end }
]]


local function spec_files()
  local p = io.popen("find spec -name '*_spec.lua' | LC_ALL=C sort")
  local files = {}
  for f in p:lines() do files[#files + 1] = f end
  p:close()
  return files
end

describe("JSON lines", function()
  teardown(cli.cleanup)

  it("are checked after every other spec of spec/ has run", function()
    local files = spec_files()
    assert.are.equal("spec/validate_events_spec.lua", files[#files])
  end)

  it("every event of the suite's runs matches its schema in docs/events", function()
    if not os.execute("python3 -c 'import jsonschema' 2>/dev/null") then
      return pending("python3-jsonschema is not installed")
    end
    local state = cli.tmpdir()
    local env = { RUNBOOK_STATE_DIR = state }
    local out = {}
    local function run(args, code)
      local r = cli.run(args, env)
      assert.are.equal(code, r.code, r.stdout .. r.stderr)
      out[#out + 1] = r.stdout
    end
    run({ "run", "examples/hello.lua", "-p", "name=a/b", "-o", "json", "--dry-run" }, 0)
    run({ "run", "examples/hello.lua", "-p", "name=ops", "-p", "note=" .. state .. "/note", "--output", "json" }, 0)
    run({ "run", cli.runbook(UNDO), "-p", "path=" .. state .. "/w", "-o", "json" }, 1)
    run({ "run", "outage-recovery", "-p", "namespace=todo-chatbot", "--dry-run", "-o", "json" }, 0)
    run({ "history", "-o", "json" }, 0)
    local text = table.concat(out)
    assert.matches('"outputs":{"none":%[%],"written":"', text)   -- an empty list is []
    assert.matches('"duration":%d+[,}]', text)                   -- integer milliseconds

    local p = io.popen("find " .. cli.events_dir() .. " -name '*.jsonl' | sort")
    local files = {}
    for f in p:lines() do files[#files + 1] = cli.quote(f) end
    p:close()
    assert.is_true(#files >= 5, #files .. " runs")
    p = io.popen("python3 spec/fixtures/validate_events.py " .. table.concat(files, " ") .. " 2>&1")
    local report = p:read("a")
    local ok = p:close()
    assert.is_true(ok, report)
    for _, ev in ipairs { "run_start", "step_start", "log", "effect", "step_end", "undo_start", "undo_end",
      "run_end", "run" } do
      assert.matches(ev .. "=%d", report)
    end
  end)
end)
