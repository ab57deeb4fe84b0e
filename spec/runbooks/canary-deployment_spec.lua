-- runbooks/canary-deployment.lua against the sandbox: a good canary is
-- promoted, a bad one is aborted at its first gate and removed, and a dry run
-- changes nothing; checked with kubectl and curl (Prometheus, the API).
local cli = require("spec.support.cli")
local backends = require("spec.support.backends")
local sb = require("spec.sandbox.sandbox_helper")
local kh = require("spec.runbooks.k8s_helper")

local RUNBOOK = "runbooks/canary-deployment.lua"
local FAST = { "-p", "interval=3s", "-p", "every=1s", "-p", "window=10s", "-p", "warmup=30s" }

local function run(tag, extra)
  local args = { "run", RUNBOOK, "-p", "deployment=todo-chatbot-backend", "-p", "tag=" .. tag }
  for _, a in ipairs(extra or FAST) do args[#args + 1] = a end
  return cli.run(args)
end

local function canary_objects()
  local out = sb.kubectl("get deploy,svc,ingress -n todo-chatbot -o name")
  local found = {}
  for name in out:gmatch("[^\n]*canary[^\n]*") do found[#found + 1] = name end
  return found
end

describe("canary-deployment", function()
  setup(kh.reset_world)
  after_each(function()
    sb.metrics_reset()
    kh.reset_world()
    cli.cleanup()
  end)

  it("promotes a good canary through 10, 25, 50 and 100%, then removes it", function()
    local r = run("v1.5.0", { "-p", "interval=2s", "-p", "every=1s", "-p", "window=10s", "-p", "warmup=30s", "--yes" })
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    for _, w in ipairs { 10, 25, 50, 100 } do
      assert.matches(w .. "%% of the traffic to todo%-chatbot%-backend now goes to todo%-chatbot%-backend%-canary", r.stdout)
    end
    assert.are.equal("v1.5.0", kh.tag("backend"))
    assert.are.same({}, canary_objects())
    -- the canary's pod served real traffic: Prometheus kept its requests (its series ended with it)
    local rows = sb.promql('sum(max_over_time(http_requests_total{service="backend",version="v1.5.0",pod=~".*-canary-.*"}[5m]))')
    assert.is_true(rows[1] and rows[1].value > 0)
  end)

  it("aborts a canary with a bad image at its first gate: weight 0, canary removed, the run names the gate", function()
    sb.ctl("metrics errors backend:v1.6.0 40%")
    local r = run("v1.6.0", { "-p", "interval=3s", "-p", "every=1s", "-p", "window=10s", "-p", "warmup=30s", "--yes" })
    assert.are.equal(1, r.code, r.stdout .. r.stderr)
    assert.matches("Shift 10%% to the canary failed", r.stdout)
    assert.matches("canary v1.6.0 error rate is [%d.]+%%, not below 1%%", r.stdout)
    assert.matches("gate broken at 10%%: weight back to 0", r.stdout)
    assert.is_nil(r.stdout:find("Shift 25%", 1, true))
    assert.are.same({}, canary_objects())
    assert.are.equal("v1.4.0", kh.tag("backend"))
  end)

  it("changes nothing in a dry run, and reports each gate against live data", function()
    local r = backends.assert_unchanged(function()
      return cli.run { "run", RUNBOOK, "-p", "deployment=todo-chatbot-backend", "-p", "tag=v1.5.0", "--dry-run" }
    end)
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("would wait 2m for canary v1.5.0 error rate < 1%% and canary v1.5.0 p95 latency < 500ms: now", r.stdout)
    assert.matches("would set image of deployment todo%-chatbot%-backend", r.stdout)
    assert.are.same({}, canary_objects())
  end)
end)
