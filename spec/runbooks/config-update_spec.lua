-- runbooks/config-update.lua against the sandbox: a wrong value in the
-- ConfigMap every service reads (seed 001 edits it and restarts the pods) is
-- set right and every user restarted onto it; a Secret's key changed while a
-- user's new pods crash-loop goes back to its old value; a Dapr component's
-- metadata item (seed 002 edits the component) reaches the apps in its scopes;
-- checked with kubectl.
local cli = require("spec.support.cli")
local backends = require("spec.support.backends")
local sb = require("spec.sandbox.sandbox_helper")
local kh = require("spec.runbooks.k8s_helper")

local RUNBOOK = "runbooks/config-update.lua"
local APPS = { "backend", "frontend", "websocket", "recurring-task", "notification" }

local function update(object, key, value, ...)
  return cli.run { "run", RUNBOOK, "-p", "object=" .. object, "-p", "key=" .. key, "-p", "value=" .. value, ... }
end

--- The key of a ConfigMap or Secret (decoded), as kubectl shows it.
local function kubectl_value(kind, name, key)
  local out, ok = sb.kubectl(("-n todo-chatbot get %s/%s -o jsonpath='{.data.%s}'"):format(kind, name, key))
  assert(ok, out)
  if kind == "secret" then out = sb.sh("printf %s " .. sb.quote(out) .. " | base64 -d") end
  return out
end

--- The app's pod names (a set), with kubectl.
local function pod_names(app)
  local out = sb.kubectl("-n todo-chatbot get pods -l app.kubernetes.io/component=" .. app .. " -o name")
  local names = {}
  for name in out:gmatch("pod/(%S+)") do names[name] = true end
  return names
end

describe("config-update", function()
  setup(function()
    sb.ctl("k8s reset")
    for _, app in ipairs(APPS) do assert(kh.wait_rolled_out(app, 60), app .. " is not settled") end
  end)
  after_each(cli.cleanup)

  it("changes nothing in a dry run", function()
    local r = backends.assert_unchanged(function()
      return update("configmap/todo-chatbot-config", "LOG_LEVEL", "WARNING", "--dry-run")
    end)
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("would set LOG_LEVEL in configmap todo%-chatbot%-config", r.stdout)
    assert.matches("would restart deployment todo%-chatbot%-websocket", r.stdout)
  end)

  it("sets a wrong ConfigMap value right and restarts every deployment that reads it", function()
    local right = kubectl_value("configmap", "todo-chatbot-config", "WEBSOCKET_MAX_CONNECTIONS")
    local status = sb.k8s("PATCH", "/api/v1/namespaces/todo-chatbot/configmaps/todo-chatbot-config",
      { data = { WEBSOCKET_MAX_CONNECTIONS = "5" } })
    assert.are.equal(200, status)
    finally(function()
      sb.k8s("PATCH", "/api/v1/namespaces/todo-chatbot/configmaps/todo-chatbot-config",
        { data = { WEBSOCKET_MAX_CONNECTIONS = right } })
    end)
    local before = {}
    for _, app in ipairs(APPS) do before[app] = pod_names(app) end
    local r = update("configmap/todo-chatbot-config", "WEBSOCKET_MAX_CONNECTIONS", right, "--yes")
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("read by todo%-chatbot%-backend, todo%-chatbot%-frontend", r.stdout)
    assert.are.equal(right, kubectl_value("configmap", "todo-chatbot-config", "WEBSOCKET_MAX_CONNECTIONS"))
    for _, app in ipairs(APPS) do
      assert.truthy(kh.wait_rolled_out(app, 60), app)
      for name in pairs(pod_names(app)) do assert.is_nil(before[app][name], app .. ": pod " .. name .. " was not restarted") end
    end
  end)

  it("puts a Secret's old value back, never printed, when a user's new pods crash-loop", function()
    local old = kubectl_value("secret", "todo-chatbot-secrets", "JWT_SECRET")
    sb.ctl("k8s crashloop websocket")
    finally(function()
      sb.ctl("k8s reset")
      assert(kh.wait_rolled_out("websocket", 60), "websocket did not settle")
    end)
    local new = "rotated-jwt-secret-7f3a9c"
    local r = update("secret/todo-chatbot-secrets", "JWT_SECRET", new, "--yes", "-p", "timeout=60s")
    assert.are.equal(1, r.code, r.stdout .. r.stderr)
    assert.matches("CrashLoopBackOff", r.stdout)
    assert.matches("JWT_SECRET back to its old value", r.stdout)
    assert.are.equal(old, kubectl_value("secret", "todo-chatbot-secrets", "JWT_SECRET"))
    assert.falsy((r.stdout .. r.stderr):find(new, 1, true), "the new value was printed")
    assert.falsy((r.stdout .. r.stderr):find(old, 1, true), "the old value was printed")
  end)

  it("sets a Dapr component's metadata item and restarts the Dapr apps in its scopes", function()
    local out, ok = sb.kubectl("-n todo-chatbot get component kafka-pubsub -o json")
    assert(ok, out)
    local before = require("cjson").decode(out).spec.metadata
    finally(function()
      sb.k8s("PATCH", "/apis/dapr.io/v1alpha1/namespaces/todo-chatbot/components/kafka-pubsub", { spec = { metadata = before } })
    end)
    local pods = {}
    for _, app in ipairs(APPS) do pods[app] = pod_names(app) end
    local r = update("component/kafka-pubsub", "maxMessageBytes", "2097152", "--yes")
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    out = sb.kubectl([[-n todo-chatbot get component kafka-pubsub -o jsonpath='{.spec.metadata[?(@.name=="maxMessageBytes")].value}']])
    assert.are.equal("2097152", out:match("%S+"))
    out = sb.kubectl([[-n todo-chatbot get component kafka-pubsub -o jsonpath='{.spec.metadata[?(@.name=="authType")].value}']])
    assert.are.equal("none", out:match("%S+"))
    for _, app in ipairs(APPS) do
      assert.truthy(kh.wait_rolled_out(app, 60), app)
      for name in pairs(pod_names(app)) do assert.is_nil(pods[app][name], app .. ": pod " .. name .. " was not restarted") end
    end
  end)

  it("refuses an object that is neither a ConfigMap, a Secret nor a component", function()
    local r = update("deploy/todo-chatbot-backend", "X", "y", "--yes")
    assert.are.equal(1, r.code)
    assert.matches("param object: expected configmap/NAME, secret/NAME or component/NAME", r.stdout)
  end)
end)
