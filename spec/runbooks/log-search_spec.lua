-- runbooks/log-search.lua against the sandbox's pods' logs, counted again
-- from kubectl logs read before and after the run.
local cli = require "spec.support.cli"
local sb = require "spec.sandbox.sandbox_helper"
local cjson = require "cjson"

local RUNBOOK = "runbooks/log-search.lua"
local KUBECTL = "/usr/lib/google-cloud-sdk/bin/kubectl.1.32"
local cache

local function kubectl(args)
  local out, ok = sb.sh(("%s --cache-dir=%s -n todo-chatbot %s"):format(KUBECTL, cache, args))
  assert(ok, args .. ": " .. out)
  return out
end

-- ERROR records of the backend's pods in the last hour, as kubectl and jq would count them.
local function errors(pred)
  local n = 0
  for pod in kubectl("get pods -l app.kubernetes.io/component=backend -o name"):gmatch("pod/(%S+)") do
    for line in kubectl(("logs %s -c backend --since=1h"):format(pod)):gmatch("[^\n]+") do
      local ok, rec = pcall(cjson.decode, line)
      if ok and type(rec) == "table" and rec.level == "ERROR" and (not pred or pred(rec)) then n = n + 1 end
    end
  end
  return n
end

describe("log-search", function()
  setup(function() cache = cli.tmpdir() end)
  teardown(cli.cleanup)

  it("finds the errors a fault raised, names their message first, and counts them as kubectl and jq do", function()
    local out, ok = sb.ctl("k8s log-errors backend")
    assert(ok, out)
    finally(function() sb.ctl("k8s reset") end)
    local fault = function(rec) return rec.message == "upstream call failed: connection reset by peer (fault log-errors)" end
    -- pods younger than the fault's 5 minutes have fewer lines: wait for the first of its errors
    local before = sb.wait_until(90, function() local n = errors(fault); return n > 0 and n end)
    assert.truthy(before, "kubectl logs never showed the fault's errors")
    local r = cli.run { "run", RUNBOOK, "-p", "deployment=todo-chatbot-backend", "-p", "level=ERROR", "-p", "since=10m",
      "-p", "pattern=fault log%-errors" }
    local after = errors(fault)
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    local n = tonumber(r.stdout:match("(%d+) of %d+ records match in 2 pod%(s%)"))
    assert.is_true(n ~= nil and n >= before and n <= after, r.stdout)
    assert.matches("top messages:\n%s+| +%d+  upstream call failed: connection reset by peer %(fault log%-errors%)", r.stdout)
  end)

  it("counts a deployment's errors across its pods and names the top message", function()
    local before = errors()
    local r = cli.run { "run", RUNBOOK, "-p", "deployment=todo-chatbot-backend", "-p", "level=ERROR", "-p", "since=1h" }
    local after = errors()
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    local n = tonumber(r.stdout:match("(%d+) of %d+ records match in 2 pod%(s%)"))
    assert.is_true(n ~= nil and n >= before - 1 and n <= after + 1, r.stdout)   -- the logs move on by a line or so
    assert.matches("top messages:\n%s+| +%d+  publish to task%-updates failed: retrying", r.stdout)
  end)

  it("finds one request by its correlation id", function()
    local id
    for line in kubectl("logs deploy/todo-chatbot-backend -c backend --tail=50"):gmatch("[^\n]+") do
      local ok, rec = pcall(cjson.decode, line)
      if ok and type(rec) == "table" and rec.correlation_id and rec.level ~= "ERROR" then id = rec.correlation_id end
    end
    local r = cli.run { "run", RUNBOOK, "-p", "deployment=todo-chatbot-backend", "-p", "correlation_id=" .. id }
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("\n    | 1 of %d+ records match", r.stdout)
    assert.matches('"correlation_id": "' .. id .. '"', r.stdout)
  end)
end)
