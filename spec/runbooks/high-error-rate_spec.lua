-- runbooks/high-error-rate.lua against the sandbox: a bad version's 5xx is
-- fixed by a rollback, verified with Prometheus; a dry run changes nothing.
local cli = require "spec.support.cli"
local backends = require "spec.support.backends"
local sb = require "spec.sandbox.sandbox_helper"
local kh = require "spec.runbooks.k8s_helper"

local RUNBOOK = "runbooks/high-error-rate.lua"

-- backend released as v1.5.0, whose image answers 30% of requests with 500.
local function bad_release()
  sb.ctl("metrics errors backend:v1.5.0 30%")
  kh.release("backend", "v1.5.0")
  assert(sb.wait_until(30, function()
    for _, sv in ipairs(sb.erroring(0.05)) do if sv == "backend v1.5.0" then return true end end
  end), "the bad release's errors never showed")
end

describe("high-error-rate", function()
  setup(kh.reset_world)
  after_each(function()
    sb.metrics_reset()
    kh.reset_world()
    cli.cleanup()
  end)

  it("rolls back a release whose errors began with it, and verifies the rate stays down", function()
    bad_release()
    local r = cli.run { "run", RUNBOOK, "-p", "service=backend", "-p", "window=10s", "-p", "hold=4s", "-p", "every=1s", "--yes" }
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("backend v1.5.0: [%d.]+%%", r.stdout)
    assert.matches("%d+ ERROR records in the last 10s across %d pod%(s%)", r.stdout)
    assert.matches("the errors began with the last change: roll back to revision 3", r.stdout)
    assert.matches("backend error rate < 1%% held for 4s", r.stdout)
    assert.are.equal("v1.4.0", kh.tag("backend"))
    local now = sb.promql('sum(rate(http_requests_total{service="backend",status=~"5.."}[5s])) / sum(rate(http_requests_total{service="backend"}[5s]))')
    assert.is_true(now[1].value < 0.01, "error rate after the rollback: " .. tostring(now[1].value))
  end)

  it("changes nothing in a dry run", function()
    bad_release()
    local r = backends.assert_unchanged(function()
      return cli.run { "run", RUNBOOK, "-p", "service=backend", "-p", "window=10s", "--dry-run" }
    end)
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("would roll back deployment todo%-chatbot%-backend to revision 3", r.stdout)
    assert.matches("would wait 5m for backend error rate < 1%%: now [%d.]+%% %(would fail now%)", r.stdout)
    assert.are.equal("v1.5.0", kh.tag("backend"))
  end)
end)
