-- runbooks/maintenance-window.lua against the sandbox: with a fresh backup,
-- the window silences the namespace's alerts in the real Alertmanager, scales
-- up, rolls out the new image, watches the error rate, scales back and ends
-- the silence. curl against the API server and amtool say what happened.
local cli = require("spec.support.cli")
local backends = require("spec.support.backends")
local sb = require("spec.sandbox.sandbox_helper")
local kh = require("spec.runbooks.k8s_helper")
local cjson = require("cjson")

local RUNBOOK = "runbooks/maintenance-window.lua"
local IMAGE = "registry.digitalocean.com/todo-chatbot/frontend:v1.5.0"

--- The silences amtool lists (expired too) whose comment holds `reason`.
local function silences(reason)
  local am = "amtool --alertmanager.url=" .. sb.quote(sb.env("ALERTMANAGER_URL"))
  local found = {}
  for _, q in ipairs { " silence query -o json", " silence query --expired -o json" } do
    local ok, list = pcall(cjson.decode, (sb.sh(am .. q)))
    for _, s in ipairs(ok and list or {}) do
      if s.comment:find(reason, 1, true) then found[#found + 1] = s end
    end
  end
  return found
end

local function run(backup_dir, reason, extra)
  local args = { "run", RUNBOOK, "-p", "deployment=todo-chatbot-frontend", "-p", "image=" .. IMAGE,
    "-p", "reason=" .. reason, "-p", "backup_dir=" .. backup_dir, "-p", "watch=2s", "-p", "error_rate_window=10s" }
  for _, a in ipairs(extra or {}) do args[#args + 1] = a end
  return cli.run(args)
end

describe("maintenance-window", function()
  local backups

  setup(function()
    kh.reset_world()
    backups = cli.tmpdir()
    local r = cli.run { "run", "runbooks/backup.lua", "-p", "dir=" .. backups, "--yes" }
    assert(r.code == 0, r.stdout .. r.stderr)
  end)
  teardown(function()
    kh.reset_world()
    cli.cleanup()
  end)

  it("refuses without a recent backup, before it silences or changes anything", function()
    local reason = "CHG-" .. os.time() .. " no backup"
    local r = run(cli.tmpdir(), reason, { "--yes" })
    assert.are.equal(1, r.code, r.stdout .. r.stderr)
    assert.are.same({ "v1.4.0", 2 }, { kh.tag("frontend"), kh.deployment("frontend").spec.replicas })
    assert.matches("no backup set todo%-%* in", r.stdout .. r.stderr)
    assert.are.same({}, silences(reason))
  end)

  it("changes nothing in a dry run, and shows the silence it would create", function()
    local reason = "CHG-" .. os.time() .. " dry"
    local r = backends.assert_unchanged(function() return run(backups, reason, { "--dry-run" }) end)
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.truthy(r.stdout:find('would silence {namespace="todo-chatbot"} for 1h: maintenance window: ' .. reason,
      1, true), r.stdout)
    assert.are.same({}, silences(reason))
    assert.are.equal("v1.4.0", kh.tag("frontend"))
  end)

  it("silences the namespace for the change, rolls it out with a buffer, and ends the silence", function()
    local reason = "CHG-" .. os.time() .. " frontend 1.5"
    local replicas = kh.deployment("frontend").spec.replicas
    local r = run(backups, reason, { "--yes" })
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.are.equal("v1.5.0", kh.tag("frontend"))
    assert.are.equal(replicas, kh.deployment("frontend").spec.replicas)
    assert.truthy(r.stdout:find(("scale deployment todo-chatbot-frontend to %d"):format(replicas + 1), 1, true), r.stdout)
    local list = silences(reason)
    assert.are.equal(1, #list, r.stdout)
    assert.are.same({ "expired", "namespace", "todo-chatbot" }, { list[1].status.state, list[1].matchers[1].name,
      list[1].matchers[1].value })
  end)
end)
