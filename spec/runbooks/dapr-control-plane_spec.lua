-- runbooks/dapr-control-plane.lua against the sandbox's dapr-system: a stuck
-- sidecar injector (its logs full of errors, a pod made meanwhile without
-- daprd) is restarted and the pod re-created; a crash-looping operator and a
-- placement server scaled to 0 are named. kubectl checks the outcome.
local cli = require("spec.support.cli")
local backends = require("spec.support.backends")
local sb = require("spec.sandbox.sandbox_helper")
local kh = require("spec.runbooks.k8s_helper")
local cjson = require("cjson")

local RUNBOOK = "runbooks/dapr-control-plane.lua"

local function kubectl_json(args)
  local out, ok = sb.kubectl(args .. " -o json")
  assert(ok, out)
  return cjson.decode(out)
end

-- The names of the containers of each live pod of an app: {"notification,daprd", ...}.
local function containers_of(app)
  local out = {}
  for _, p in ipairs(kubectl_json("-n todo-chatbot get pods -l app.kubernetes.io/component=" .. app).items) do
    if not p.metadata.deletionTimestamp then
      local names = {}
      for _, c in ipairs(p.spec.containers) do names[#names + 1] = c.name end
      out[#out + 1] = table.concat(names, ",")
    end
  end
  return out
end

local function pod_names(selector)
  local out = {}
  for _, p in ipairs(kubectl_json("-n dapr-system get pods -l " .. selector).items) do out[#out + 1] = p.metadata.name end
  return out
end

-- The injector stuck, and a notification pod made meanwhile without daprd.
local function break_the_injector()
  sb.ctl("k8s dapr-stuck injector")
  assert(sb.kubectl("-n todo-chatbot delete pod -l app.kubernetes.io/component=notification --wait=false"))
  assert(sb.wait_until(20, function()
    local c = containers_of("notification")
    return #c == 1 and c[1] == "notification"
  end), "the notification pod was not re-created without daprd")
end

describe("dapr-control-plane", function()
  setup(kh.reset_world)
  after_each(function()
    sb.ctl("k8s reset")
    sb.kubectl("-n dapr-system scale sts/dapr-placement-server --replicas=1")
    -- the pod left without daprd gets it back, for the specs that follow
    if containers_of("notification")[1] ~= "notification,daprd" then
      sb.kubectl("-n todo-chatbot delete pod -l app.kubernetes.io/component=notification --wait=false")
      assert(sb.wait_until(20, function() return containers_of("notification")[1] == "notification,daprd" end))
    end
    cli.cleanup()
  end)

  it("changes nothing in a dry run; then restarts a stuck injector (and the rest) and re-creates the pod it left without daprd", function()
    break_the_injector()
    local injector = pod_names("app=dapr-sidecar-injector")
    local dry = backends.assert_unchanged(function()
      return cli.run { "run", RUNBOOK, "--dry-run" }
    end)
    assert.are.equal(1, dry.code, dry.stdout .. dry.stderr)
    assert.matches("would restart deployment dapr%-sidecar%-injector", dry.stdout)
    assert.matches("would delete pod todo%-chatbot%-notification%-", dry.stdout)
    assert.are.same({ "notification" }, containers_of("notification"))
    local placement = kubectl_json("-n dapr-system get pod dapr-placement-server-0").metadata.uid
    -- restart=all: every control-plane workload restarted, as seed 002 does
    local r = cli.run { "run", RUNBOOK, "--yes", "-p", "restart=all" }
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("restarting sts/dapr%-placement%-server %(restart=all%)", r.stdout)
    assert.are_not.equal(placement, kubectl_json("-n dapr-system get pod dapr-placement-server-0").metadata.uid)
    assert.matches("dapr%-sidecar%-injector logged %d+ errors .*Sidecar injector failed to inject", r.stdout)
    assert.matches("pod todo%-chatbot%-notification%-[%w-]+ %(app notification%): no daprd container", r.stdout)
    assert.matches("restarting deploy/dapr%-sidecar%-injector %(logs errors%)", r.stdout)
    assert.matches("test event runbook%-check%-%x+ is on task%-events", r.stdout)
    -- kubectl: a new injector pod, and the notification pod has its sidecar again
    assert.are_not.same(injector, pod_names("app=dapr-sidecar-injector"))
    assert.are.same({ "notification,daprd" }, containers_of("notification"))
    local logs = sb.kubectl("-n dapr-system logs deploy/dapr-sidecar-injector")
    assert.falsy(logs:find("level=error", 1, true), logs)
  end)

  it("names a crash-looping operator and a placement server scaled to 0, and fails", function()
    sb.ctl("k8s crashloop dapr-operator")
    assert(sb.kubectl("-n dapr-system scale sts/dapr-placement-server --replicas=0"))
    assert(sb.wait_until(20, function()
      return sb.kubectl("-n dapr-system get pods"):match("dapr%-operator%-%S+%s+0/1%s+CrashLoopBackOff")
    end), "the operator does not crash-loop")
    local r = cli.run { "run", RUNBOOK, "--yes", "-p", "restart=none", "-p", "test_publish=false" }
    assert.are.equal(1, r.code, r.stdout .. r.stderr)
    assert.matches("dapr%-operator: pod dapr%-operator%-[%w-]+: container dapr%-operator is CrashLoopBackOff", r.stdout)
    assert.matches("dapr%-placement%-server: scaled to 0", r.stdout)
    assert.matches("dapr%-operator: pod dapr%-operator%-[%w-]+ ended Error; its last lines: .*Failed to start Dapr operator", r.stdout)
    assert.matches("%d+ problems with Dapr", r.stdout)
  end)
end)
