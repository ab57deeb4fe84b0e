-- runbooks/scale.lua against the sandbox: too few replicas for the load (seed
-- 000 scales the websocket for more connections) fixed for one deployment
-- and for all (several: the dry run); a scale whose new pods crash-loop goes back; checked with kubectl.
local cli = require("spec.support.cli")
local backends = require("spec.support.backends")
local sb = require("spec.sandbox.sandbox_helper")
local kh = require("spec.runbooks.k8s_helper")

local RUNBOOK = "runbooks/scale.lua"
local APPS = { "backend", "frontend", "websocket", "recurring-task", "notification" }

local function scale(deployments, replicas, ...)
  return cli.run { "run", RUNBOOK, "-p", "deployments=" .. deployments, "-p", "replicas=" .. replicas, ... }
end

--- kubectl's view of a deployment: spec replicas, ready replicas, and its pods.
local function kubectl(app)
  local out, ok = sb.kubectl("-n todo-chatbot get deploy/todo-chatbot-" .. app
    .. " -o jsonpath='{.spec.replicas} {.status.readyReplicas}'")
  assert(ok, out)
  local spec, ready = out:match("^(%d+) ?(%d*)")
  local pods = sb.kubectl("-n todo-chatbot get pods -l app.kubernetes.io/component=" .. app .. " -o name")
  local n = 0
  for _ in pods:gmatch("pod/") do n = n + 1 end
  return { spec = tonumber(spec), ready = tonumber(ready) or 0, pods = n }
end

--- Every app back at its replicas of `want`: all patched, then waited for.
local function restore(want)
  local moved = {}
  for _, app in ipairs(APPS) do
    if kh.deployment(app).spec.replicas ~= want[app] then
      local status = sb.k8s("PATCH", "/apis/apps/v1/namespaces/todo-chatbot/deployments/todo-chatbot-" .. app,
        { spec = { replicas = want[app] } })
      assert.are.equal(200, status)
      moved[#moved + 1] = app
    end
  end
  for _, app in ipairs(moved) do assert(kh.wait_rolled_out(app, 60), app .. " did not settle back") end
end

describe("scale", function()
  local before = {}
  setup(function()
    sb.ctl("k8s reset")
    for _, app in ipairs(APPS) do
      assert(kh.wait_rolled_out(app, 60), app .. " is not settled")
      before[app] = math.tointeger(kh.deployment(app).spec.replicas)
    end
  end)
  after_each(function()
    cli.cleanup()
    restore(before)
  end)

  it("changes nothing in a dry run, and names what it would scale", function()
    local r = backends.assert_unchanged(function()
      return scale("todo-chatbot-frontend,todo-chatbot-notification", 4, "--dry-run")
    end)
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("would scale deployment todo%-chatbot%-frontend to 4", r.stdout)
    assert.matches("would scale deployment todo%-chatbot%-notification to 4", r.stdout)
  end)

  it("scales a deployment with too few replicas up, waits, and every new pod is ready", function()
    kh.scale("websocket", 1)
    local r = scale("todo-chatbot-websocket", 3, "--yes")
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("todo%-chatbot%-websocket: 1 replicas now, 3 wanted", r.stdout)
    assert.matches("todo%-chatbot%-websocket: 3 of 3 ready, 3 pods", r.stdout)
    assert.are.same({ spec = 3, ready = 3, pods = 3 }, kubectl("websocket"))
  end)

  it("scales every deployment of the namespace", function()
    local r = scale("all", 1, "--yes")
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    for _, app in ipairs(APPS) do assert.are.same({ spec = 1, ready = 1, pods = 1 }, kubectl(app), app) end
  end)

  it("goes back to the replicas it had when the new pods crash-loop", function()
    sb.ctl("k8s crashloop websocket")
    finally(function() sb.ctl("k8s reset") end)
    local r = scale("todo-chatbot-websocket", before.websocket + 2, "--yes", "-p", "timeout=60s")
    assert.are.equal(1, r.code, r.stdout .. r.stderr)
    assert.matches("CrashLoopBackOff", r.stdout)
    assert.matches("todo%-chatbot%-websocket back at " .. before.websocket .. " replicas", r.stdout)
    assert.are.equal(before.websocket, kubectl("websocket").spec)
  end)

  it("refuses a deployment the namespace lacks, and a negative count, before scaling anything", function()
    local r = scale("todo-chatbot-frontend,nope", 3, "--yes")
    assert.are.equal(1, r.code)
    assert.matches('"nope"', r.stdout)
    r = scale("todo-chatbot-frontend", -1, "--yes")
    assert.are.equal(1, r.code)
    assert.matches("param replicas: expected 0 or more", r.stdout)
    assert.are.equal(before.frontend, kubectl("frontend").spec)
  end)
end)
