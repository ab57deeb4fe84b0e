-- runbooks/crashloop-triage.lua against the sandbox: an OOM kill and a release
-- that crash-loops are injected with the stand-in's faults; the runbook finds
-- the cause and applies its fix; curl against the Kubernetes API checks it.
local cli = require "spec.support.cli"
local backends = require "spec.support.backends"
local sb = require "spec.sandbox.sandbox_helper"
local kh = require "spec.runbooks.k8s_helper"

local RUNBOOK = "runbooks/crashloop-triage.lua"

local function memory_limit(app)
  return kh.deployment(app).spec.template.spec.containers[1].resources.limits.memory
end

local function oom_killed(app)
  for _, p in ipairs(kh.pods(app)) do
    for _, cs in ipairs((p.status or {}).containerStatuses or {}) do
      if ((cs.lastState or {}).terminated or {}).reason == "OOMKilled" then return true end
    end
  end
  return false
end

describe("crashloop-triage", function()
  setup(kh.reset_world)
  after_each(function()
    kh.reset_world()
    cli.cleanup()
  end)

  it("raises the memory limit of an OOM-killed container, and the kills stop", function()
    assert.are.equal("256Mi", memory_limit("backend"))
    sb.ctl("k8s oom backend")
    assert.truthy(sb.wait_until(25, function() return oom_killed("backend") end), "backend was never OOM-killed")

    local r = cli.run { "run", RUNBOOK, "-p", "deployment=todo-chatbot-backend", "-p", "observe=16s", "--yes" }
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("diagnosis: the app container is OOM%-killed at its memory limit 256Mi", r.stdout)
    assert.matches("Killed %(out of memory%)", r.stdout)        -- the previous container's log

    -- checked independently: the new limit, rolled out, and no kill since (the fault kills every 15 s)
    assert.are.equal("512Mi", memory_limit("backend"))
    assert.truthy(kh.wait_rolled_out("backend"))
    local before = kh.restarts("backend")
    sb.sleep(16)
    assert.are.equal(before, kh.restarts("backend"))
  end)

  it("rolls back a release that crash-loops to the revision before it", function()
    kh.release("backend", "v1.5.0")
    sb.ctl("k8s crashloop backend")
    kh.wait_waiting("backend", "CrashLoopBackOff")

    local r = cli.run { "run", RUNBOOK, "-p", "deployment=todo-chatbot-backend", "-p", "observe=3s", "--yes",
      "--output", "json" }
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    local undo
    for _, e in ipairs(cli.only(cli.events(r.stdout), "effect")) do
      if e.op == "rollout_undo" then undo = e end
    end
    assert.truthy(undo, "no rollout_undo effect")
    assert.are.equal("v1.4.0", kh.tag("backend"))
    assert.truthy(kh.wait_rolled_out("backend"))
    assert.is_nil(kh.waiting("backend"))
  end)

  it("only diagnoses with fix=none, and fails a fix that does not hold", function()
    sb.ctl("k8s crashloop frontend")
    kh.wait_waiting("frontend", "CrashLoopBackOff")
    local r = cli.run { "run", RUNBOOK, "-p", "deployment=todo-chatbot-frontend", "-p", "fix=none", "--yes" }
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("CrashLoopBackOff", r.stdout)
    assert.matches("skipped", r.stdout)
    assert.are.equal("CrashLoopBackOff", kh.waiting("frontend"))

    -- a restart cannot fix a crashing image: the verification says so and the run fails
    r = cli.run { "run", RUNBOOK, "-p", "deployment=todo-chatbot-frontend", "-p", "fix=restart", "-p", "timeout=20s", "--yes" }
    assert.are.equal(1, r.code, r.stdout .. r.stderr)
    assert.matches("CrashLoopBackOff", r.stdout .. r.stderr)
  end)

  it("changes nothing in a dry run, and says which fix it would apply", function()
    sb.ctl("k8s oom websocket")
    assert.truthy(sb.wait_until(25, function() return oom_killed("websocket") end), "websocket was never OOM-killed")
    local r = backends.assert_unchanged(function()
      return cli.run { "run", RUNBOOK, "-p", "deployment=todo-chatbot-websocket", "--dry-run" }
    end)
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("offered fix: raise websocket's memory limit", r.stdout)
    assert.matches("would patch deployment todo%-chatbot%-websocket", r.stdout)
  end)
end)
