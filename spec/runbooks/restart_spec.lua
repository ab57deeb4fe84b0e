-- runbooks/restart.lua against the sandbox: pods started before a change (the
-- seeds restart to pick up new configuration or to reset connections) are all
-- replaced, for one deployment and for all; new pods that crash-loop stop the
-- run naming them; checked with kubectl.
local cli = require("spec.support.cli")
local backends = require("spec.support.backends")
local sb = require("spec.sandbox.sandbox_helper")
local kh = require("spec.runbooks.k8s_helper")

local RUNBOOK = "runbooks/restart.lua"
local APPS = { "backend", "frontend", "websocket", "recurring-task", "notification" }

local function restart(deployments, ...)
  return cli.run { "run", RUNBOOK, "-p", "deployments=" .. deployments, ... }
end

--- kubectl's view: the app's pod names (a set) and how many are Ready.
local function pods(app)
  local out, ok = sb.kubectl("-n todo-chatbot get pods -l app.kubernetes.io/component=" .. app
    .. [[ -o jsonpath='{range .items[*]}{.metadata.name} {.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}']])
  assert(ok, out)
  local names, ready = {}, 0
  for name, status in out:gmatch("(%S+) (%S+)") do
    names[name] = true
    if status == "True" then ready = ready + 1 end
  end
  return names, ready
end

local function restarted_at(app)
  local out = sb.kubectl("-n todo-chatbot get deploy/todo-chatbot-" .. app
    .. [[ -o jsonpath='{.spec.template.metadata.annotations.kubectl\.kubernetes\.io/restartedAt}']])
  return out:match("%S+")
end

--- The app's pods now are all new and all Ready, as many as the deployment wants.
local function all_replaced(app, before)
  local now, ready = pods(app)
  for name in pairs(now) do assert.is_nil(before[name], app .. ": pod " .. name .. " was not replaced") end
  assert.are.equal(math.tointeger(kh.deployment(app).spec.replicas), ready, app)
  assert.truthy(restarted_at(app), app .. " has no kubectl.kubernetes.io/restartedAt")
end

describe("restart", function()
  setup(function()
    sb.ctl("k8s reset")
    for _, app in ipairs(APPS) do assert(kh.wait_rolled_out(app, 60), app .. " is not settled") end
  end)
  after_each(cli.cleanup)

  it("changes nothing in a dry run, and names what it would restart", function()
    local r = backends.assert_unchanged(function()
      return restart("todo-chatbot-frontend,todo-chatbot-notification", "--dry-run")
    end)
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("would restart deployment todo%-chatbot%-frontend", r.stdout)
    assert.matches("would restart deployment todo%-chatbot%-notification", r.stdout)
  end)

  it("replaces every pod of one deployment, then of all, waiting for each rollout", function()
    local before = pods("backend")
    local r = restart("todo-chatbot-backend", "--yes")
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("todo%-chatbot%-backend: %d+ of %d+ ready, 0 old pods left", r.stdout)
    all_replaced("backend", before)
    local all = {}
    for _, app in ipairs(APPS) do all[app] = pods(app) end
    r = restart("all", "--yes")
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    for _, app in ipairs(APPS) do all_replaced(app, all[app]) end
  end)

  it("stops at once, naming the pod, when the new pods crash-loop", function()
    sb.ctl("k8s crashloop websocket")
    finally(function()
      sb.ctl("k8s reset")
      assert(kh.wait_rolled_out("websocket", 60), "websocket did not settle")
    end)
    local r = restart("todo-chatbot-websocket", "--yes", "-p", "timeout=60s")
    assert.are.equal(1, r.code, r.stdout .. r.stderr)
    assert.matches("will not finish rolling out: pod todo%-chatbot%-websocket%-%S+ container websocket is CrashLoopBackOff", r.stdout)
  end)

  it("refuses a deployment the namespace lacks before restarting anything", function()
    local before = restarted_at("frontend")
    local r = restart("todo-chatbot-frontend,nope", "--yes")
    assert.are.equal(1, r.code)
    assert.matches('"nope"', r.stdout)
    assert.are.equal(before, restarted_at("frontend"))
  end)
end)
