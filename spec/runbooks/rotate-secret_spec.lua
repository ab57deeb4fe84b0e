-- runbooks/rotate-secret.lua against the sandbox: an API key read by the
-- frontend (env valueFrom) and the websocket (a volume) is rotated; kubectl
-- checks the value, the restarts, and that a dry run or a failed check leaves
-- the old value. The new value never prints.
local cli = require("spec.support.cli")
local sb = require("spec.sandbox.sandbox_helper")
local kh = require("spec.runbooks.k8s_helper")

local RUNBOOK = "runbooks/rotate-secret.lua"
local NS = "todo-chatbot"
local OLD = "old-api-key-0123456789"

local function kubectl(args)
  local out, ok = sb.kubectl(args)
  assert(ok, "kubectl " .. args .. ": " .. out)
  return out
end

local function value() return kubectl(("-n %s get secret api-keys -o jsonpath='{.data.api-key}' | base64 -d"):format(NS)) end
local function version() return kubectl(("-n %s get secret api-keys -o jsonpath='{.metadata.resourceVersion}'"):format(NS)) end
local function restarted_at(app)
  return kubectl(("-n %s get deploy todo-chatbot-%s -o jsonpath='{.spec.template.metadata.annotations.kubectl\\.kubernetes\\.io/restartedAt}'")
    :format(NS, app))
end
local function copies()
  return kubectl(("-n %s get secrets -o name"):format(NS)):match("api%-keys%-before%-%d+")
end

local function rotate(extra)
  local args = { "run", RUNBOOK, "-p", "secret=api-keys", "-p", "key=api-key" }
  for _, a in ipairs(extra) do args[#args + 1] = a end
  return cli.run(args)
end

describe("rotate-secret", function()
  setup(function()
    kubectl(("-n %s delete secret api-keys --ignore-not-found"):format(NS))
    kubectl(("-n %s create secret generic api-keys --from-literal=api-key=%s"):format(NS, OLD))
    kubectl(("-n %s patch deployment todo-chatbot-frontend --type=json -p %s"):format(NS, cli.quote(
      '[{"op":"add","path":"/spec/template/spec/containers/0/env/-","value":{"name":"API_KEY","valueFrom":{"secretKeyRef":{"name":"api-keys","key":"api-key"}}}}]')))
    kubectl(("-n %s patch deployment todo-chatbot-websocket --type=json -p %s"):format(NS, cli.quote(
      '[{"op":"add","path":"/spec/template/spec/volumes","value":[{"name":"keys","secret":{"secretName":"api-keys"}}]}]')))
    assert.truthy(kh.wait_rolled_out("frontend"))
    assert.truthy(kh.wait_rolled_out("websocket"))
  end)
  teardown(function()
    kh.reset_world()
    cli.cleanup()
  end)

  it("changes nothing in a dry run", function()
    local before = version()
    local r = rotate { "--dry-run" }
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.are.equal(before, version())
    assert.are.equal(OLD, value())
    assert.is_nil(copies())
    assert.are.equal("", restarted_at("frontend"))
    assert.matches("would restart deployment todo%-chatbot%-frontend", r.stdout)
  end)

  it("puts the old value back and restarts again when the check fails", function()
    local r = rotate { "--yes", "-p", "check=svc/todo-chatbot-frontend:3000/no-such-page" }
    assert.are.equal(1, r.code, r.stdout .. r.stderr)
    assert.matches("answered 404 with the new value", r.stdout .. r.stderr)
    assert.are.equal(OLD, value())
    assert.is_nil(copies())
    assert.truthy(kh.wait_rolled_out("frontend"))
  end)

  it("generates a value of the asked length and charset, restarts its readers, and never prints it", function()
    local before = version()
    local r = rotate { "--yes", "-p", "length=40", "-p", "charset=hex", "-p", "check=svc/todo-chatbot-frontend:3000/health" }
    local out = r.stdout .. r.stderr
    assert.are.equal(0, r.code, out)
    local new = value()
    assert.matches("^%x+$", new)
    assert.are.equal(40, #new)
    assert.are_not.equal(before, version())
    assert.falsy(out:find(new, 1, true), "the new value was printed")
    assert.matches("deployments/todo%-chatbot%-frontend reads it %(env%)", out)
    assert.matches("deployments/todo%-chatbot%-websocket reads it %(volume%)", out)
    assert.are_not.equal("", restarted_at("frontend"))
    assert.are_not.equal("", restarted_at("websocket"))
    assert.are.equal("", restarted_at("backend"))
    assert.is_nil(copies())
  end)

  it("takes a given value, and never prints it", function()
    local r = rotate { "--yes", "-p", "value=given-value-for-the-spec-42" }
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.are.equal("given-value-for-the-spec-42", value())
    assert.falsy((r.stdout .. r.stderr):find("given-value-for-the-spec-42", 1, true))
  end)
end)
