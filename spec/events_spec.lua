-- The JSON lines contract (--output json, history --output json): every event
-- of a set of runs that between them emit every event type is checked by
-- python3-jsonschema against its schema in docs/events/, and for the shape
-- of the line itself (event and time first, no "\/" escapes).
local cli = require "spec.support.cli"

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


describe("JSON lines", function()
  teardown(cli.cleanup)

  it("every event of these runs matches its schema in docs/events", function()
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
    local d = cli.tmpdir()
    local f = assert(io.open(d .. "/lines", "w"))
    f:write(text)
    f:close()
    local p = io.popen("python3 spec/fixtures/validate_events.py < " .. d .. "/lines 2>&1")
    local report = p:read("a")
    local ok = p:close()
    assert.is_true(ok, report)
    for _, ev in ipairs { "run_start", "step_start", "log", "effect", "step_end", "undo_start", "undo_end",
      "run_end", "run" } do
      assert.matches(ev .. "=%d", report)
    end
    assert.matches('"outputs":{"none":%[%],"written":"', text)   -- an empty list is []
    assert.matches('"duration":%d+[,}]', text)                   -- integer milliseconds
  end)
end)
