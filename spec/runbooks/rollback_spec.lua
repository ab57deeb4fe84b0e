-- runbooks/rollback.lua against the sandbox: a release that crash-loops is
-- rolled back, past the restart someone tried first; checked with curl.
local cli = require("spec.support.cli")
local backends = require("spec.support.backends")
local sb = require("spec.sandbox.sandbox_helper")
local kh = require("spec.runbooks.k8s_helper")

local RUNBOOK = "runbooks/rollback.lua"

describe("rollback", function()
  setup(kh.reset_world)
  after_each(function()
    kh.reset_world()
    cli.cleanup()
  end)

  it("rolls a crash-looping release back to the previous image, past a restart, and checks /health", function()
    kh.release("backend", "v1.5.0")
    sb.ctl("k8s crashloop backend")
    kh.wait_waiting("backend", "CrashLoopBackOff")
    -- someone restarted it first: kubectl's plain `rollout undo` would now land on v1.5.0 again
    local status = sb.k8s("PATCH", "/apis/apps/v1/namespaces/todo-chatbot/deployments/todo-chatbot-backend",
      { spec = { template = { metadata = { annotations = { ["kubectl.kubernetes.io/restartedAt"] = "2026-01-01T00:00:00Z" } } } } })
    assert.are.equal(200, status)
    local r = cli.run { "run", RUNBOOK, "-p", "deployment=todo-chatbot-backend", "-p", "error_rate_window=10s", "-p", "error_rate_hold=2s", "--yes" }
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("rolling back to revision 3: registry.digitalocean.com/todo%-chatbot/backend:v1.4.0", r.stdout)
    assert.are.equal("v1.4.0", kh.tag("backend"))
    assert.truthy(kh.wait_rolled_out("backend"))
    assert.is_nil(kh.waiting("backend"))
    assert.are.equal(200, kh.health("backend", 8000))
    assert.matches("todo%-chatbot%-backend error rate < 1%% held for 2s", r.stdout)
  end)

  it("goes to a given revision, and refuses one that does not exist", function()
    local r = cli.run { "run", RUNBOOK, "-p", "deployment=todo-chatbot-backend", "-p", "to_revision=1", "-p", "error_rate_window=10s", "-p", "error_rate_hold=2s", "--yes" }
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.are.equal("v1.3.0", kh.tag("backend"))
    r = cli.run { "run", RUNBOOK, "-p", "deployment=todo-chatbot-backend", "-p", "to_revision=42", "--yes" }
    assert.are.equal(1, r.code)
    assert.matches("has no revision 42", r.stdout .. r.stderr)
  end)

  it("asks before rolling back, and refuses without a terminal unless --yes", function()
    local r = cli.run { "run", RUNBOOK, "-p", "deployment=todo-chatbot-backend" }
    assert.are.equal(2, r.code)
    assert.matches("%-%-yes", r.stderr .. r.stdout)
    assert.are.equal("v1.4.0", kh.tag("backend"))
  end)

  it("changes nothing in a dry run", function()
    kh.release("frontend", "v1.5.0")
    local r = backends.assert_unchanged(function()
      return cli.run { "run", RUNBOOK, "-p", "deployment=todo-chatbot-frontend", "--dry-run" }
    end)
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("would roll back deployment todo%-chatbot%-frontend to revision 2", r.stdout)
    assert.are.equal("v1.5.0", kh.tag("frontend"))
  end)
end)
