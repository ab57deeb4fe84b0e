-- runbooks/crashloop-triage.lua against the sandbox: an OOM kill and a release
-- that crash-loops are injected with the stand-in's faults; the runbook finds
-- the cause and applies its fix; curl against the Kubernetes API checks it.
local cli = require("spec.support.cli")
local backends = require("spec.support.backends")
local sb = require("spec.sandbox.sandbox_helper")
local kh = require("spec.runbooks.k8s_helper")

local RUNBOOK = "runbooks/crashloop-triage.lua"

local function memory_limit(app)
  return kh.deployment(app).spec.template.spec.containers[1].resources.limits.memory
end

local oom_killed = kh.oom_killed

-- The shortest time, in seconds, that any of the app's containers has run since it last started.
local function up_for(app)
  local least = math.huge
  for _, p in ipairs(kh.pods(app)) do
    for _, cs in ipairs((p.status or {}).containerStatuses or {}) do
      if cs.name == app then
        local started = ((cs.state or {}).running or {}).startedAt
        if not started then return 0 end
        least = math.min(least, os.time() - tonumber((sb.sh("date -u -d " .. sb.quote(started) .. " +%s"))))
      end
    end
  end
  return least
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

    -- checked independently: the new limit, rolled out, and no kill since (the fault kills every 15 s):
    -- every app container has run for longer than that without a restart
    assert.are.equal("512Mi", memory_limit("backend"))
    assert.truthy(kh.wait_rolled_out("backend"))
    assert.are.equal(0, kh.restarts("backend"))
    assert.is_true(sb.wait_until(20, function() return up_for("backend") > 16 end), "a container restarted")
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

-- Seed 000 "Pod Not Starting": each row injects a fault that keeps new pods
-- from starting, waits until kubectl shows it, runs the runbook dry (nothing
-- changes: kubectl reads the same deployment) and then for real; kubectl
-- checks the diagnosis against the cluster and, where the runbook fixes, the fix.
local function kubectl(args)
  local out, ok = sb.kubectl("-n todo-chatbot " .. args)
  assert(ok, args .. ": " .. out)
  return out
end

local function events(kind)
  return kubectl("get events --field-selector type=Warning,involvedObject.kind=" .. kind
    .. " -o jsonpath='{range .items[*]}{.reason}: {.message}{\"\\n\"}{end}'")
end

local NOT_STARTING = {
  { name = "a release that asks for more CPU than any node has: Pending, unschedulable; rolled back",
    fault = "unschedulable backend", app = "backend",
    shows = function() return events("Pod"):find("FailedScheduling: 0/3 nodes are available: 3 Insufficient cpu", 1, true) end,
    diagnosis = "diagnosis: pods are Pending, the scheduler cannot place them %(0/3 nodes are available: 3 Insufficient cpu%.",
    fixed = function()
      assert.are.equal("100m", kubectl("get deploy todo-chatbot-backend -o jsonpath='{.spec.template.spec.containers[0].resources.requests.cpu}'"))
      assert.truthy(kh.wait_rolled_out("backend", 90))
      assert.not_matches("Pending", kubectl("get pods -l app.kubernetes.io/component=backend"))
    end },
  { name = "a claim that does not bind (no such storage class): Pending pods, the claim named",
    fault = "pvc-pending websocket", app = "websocket",
    shows = function() return kubectl("get pvc todo-chatbot-websocket-data -o jsonpath='{.status.phase}'") == "Pending"
      and events("Pod"):find("unbound immediate PersistentVolumeClaims", 1, true) end,
    diagnosis = 'persistentvolumeclaim todo%-chatbot%-websocket%-data is Pending %(storage class fast%-ssd: storageclass%.storage%.k8s%.io "fast%-ssd" not found%)',
    fixed = function()   -- not fixed: still Pending, the claim too
      assert.are.equal("Pending", kubectl("get pvc todo-chatbot-websocket-data -o jsonpath='{.status.phase}'"))
    end },
  { name = "an image the registry refuses without credentials: the missing pull secret named",
    fault = "pull-secret notification", app = "notification",
    shows = function() return kh.waiting("notification") == "ImagePullBackOff" end,
    diagnosis = "the registry refuses to pull the image without credentials %(ErrImagePull: authorization failed%); "
      .. "secret regcred %(imagePullSecrets%) does not exist",
    fixed = function()
      local out = sb.kubectl("-n todo-chatbot get secret regcred")
      assert.matches('secrets "regcred" not found', out)
      -- what the diagnosis says to do heals it: a dockerconfigjson Secret with the registry's auth
      kubectl("create secret docker-registry regcred --docker-server=registry.sandbox.internal --docker-username=ci --docker-password=s3cret")
      assert.truthy(kh.wait_rolled_out("notification", 90), "notification did not start once regcred existed")
    end },
}

describe("crashloop-triage: pods not starting (seed 000)", function()
  setup(kh.reset_world)
  after_each(function()
    kh.reset_world()
    cli.cleanup()
  end)

  for _, case in ipairs(NOT_STARTING) do
    it(case.name, function()
      local out, ok = sb.ctl("k8s " .. case.fault)
      assert(ok, out)
      assert.truthy(sb.wait_until(90, case.shows), case.fault .. ": kubectl never showed the fault")
      local deploy = "deploy/todo-chatbot-" .. case.app
      local before = kubectl("get " .. deploy .. " -o jsonpath='{.metadata.generation} {.spec.template}'")
      local r = cli.run { "run", RUNBOOK, "-p", "deployment=todo-chatbot-" .. case.app, "--dry-run" }
      assert.are.equal(0, r.code, r.stdout .. r.stderr)
      assert.matches(case.diagnosis, r.stdout)
      assert.are.equal(before, kubectl("get " .. deploy .. " -o jsonpath='{.metadata.generation} {.spec.template}'"))

      r = cli.run { "run", RUNBOOK, "-p", "deployment=todo-chatbot-" .. case.app, "-p", "observe=3s", "--yes" }
      assert.are.equal(0, r.code, r.stdout .. r.stderr)
      assert.matches(case.diagnosis, r.stdout)
      case.fixed()
    end)
  end
end)
