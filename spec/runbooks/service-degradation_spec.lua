-- runbooks/service-degradation.lua against the sandbox: notification's app
-- container OOM-killed at its memory limit (ctl k8s oom); the runbook
-- isolates it, doubles its requests and limits, runs it with debug logging
-- for a while and turns that back; kubectl then shows the raised limits, the
-- replicas back, no LOG_LEVEL override and no restart. A dry run changes nothing.
local cli = require("spec.support.cli")
local backends = require("spec.support.backends")
local sb = require("spec.sandbox.sandbox_helper")
local kh = require("spec.runbooks.k8s_helper")

local RUNBOOK = "runbooks/service-degradation.lua"

local function oom()
  assert(select(2, sb.ctl("k8s oom notification")))
  assert(sb.wait_until(20, function() return kh.restarts("notification") > 0 end), "notification was never OOM-killed")
end

-- In this order, so that only the last one needs the world reseeded after it.
describe("service-degradation", function()
  setup(kh.reset_world)
  after_each(cli.cleanup)
  teardown(kh.reset_world)

  it("changes nothing in a dry run", function()
    oom()
    local r = backends.assert_unchanged(function()
      return cli.run { "run", RUNBOOK, "-p", "deployment=todo-chatbot-notification", "--dry-run" }
    end)
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("OOMKilled", r.stdout)
    assert.matches("would scale deployment todo%-chatbot%-notification to 0", r.stdout)
    assert.matches("resources.limits.memory 256Mi %-> 512Mi", r.stdout)
    assert.matches("LOG_LEVEL", r.stdout)
  end)

  it("isolates the OOM-killed service, raises its resources, logs at DEBUG for a while, and brings it back without restarts", function()
    oom()
    local r = cli.run { "run", RUNBOOK, "-p", "deployment=todo-chatbot-notification", "-p", "debug_for=1s",
      "-p", "observe=4s", "--yes" }
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("scale deployment todo%-chatbot%-notification to 0", r.stdout)
    assert.matches("revision 2: registry%.digitalocean%.com/todo%-chatbot/notification:v1%.4%.0", r.stdout)
    assert.matches("set env of deployment todo%-chatbot%-notification: LOG_LEVEL\n", r.stdout)
    local d = kh.deployment("notification")
    local app = d.spec.template.spec.containers[1]
    assert.are.equal(1, d.spec.replicas)
    assert.are.same({ limits = { cpu = "1000m", memory = "512Mi" }, requests = { cpu = "200m", memory = "256Mi" } }, app.resources)
    for _, e in ipairs(app.env or {}) do assert.are_not.equal("LOG_LEVEL", e.name) end
    assert(kh.wait_rolled_out("notification"))
    assert.are.equal(0, kh.restarts("notification"))
  end)
end)
