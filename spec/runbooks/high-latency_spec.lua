-- runbooks/high-latency.lua against the sandbox: pods past their capacity
-- are slow; scaling out brings p95 back under 500ms, verified with Prometheus;
-- a dry run changes nothing.
local cli = require("spec.support.cli")
local backends = require("spec.support.backends")
local sb = require("spec.sandbox.sandbox_helper")
local kh = require("spec.runbooks.k8s_helper")

local RUNBOOK = "runbooks/high-latency.lua"
-- the runbook's own query at window=10s
local P95 = 'histogram_quantile(0.95, sum by (le) (rate(http_request_duration_seconds_bucket{namespace="todo-chatbot",service="backend"}[10s])))'

-- backend's pods slow down above 5 requests/s each: at 2 replicas (15/s each) p95 is near 1s.
local function saturated()
  sb.ctl("metrics capacity backend 5")
  local streak = 0
  assert(sb.wait_until(30, function()   -- three reads in a row, a second apart: past the new pods' first scrapes
    local v = sb.promql(P95)[1]
    streak = (v and v.value > 0.5) and streak + 1 or 0
    if streak < 3 then sb.sleep(1) end
    return streak >= 3
  end), "the saturation never showed")
end

describe("high-latency", function()
  setup(kh.reset_world)
  after_each(function()
    sb.ctl("metrics reset")
    kh.reset_world()
    cli.cleanup()
  end)

  it("finds the slow service, shows the slowest statements, scales out and verifies p95", function()
    saturated()
    sb.psql("SELECT pg_sleep(1), count(*) FROM tasks")   -- the slowest statement of the sandbox
    local stats = sb.env("DATABASE_URL"):gsub("/todo$", "/postgres")   -- where the sandbox installs pg_stat_statements
    local r = cli.run { "run", RUNBOOK, "-p", "service=backend", "-p", "window=10s", "-p", "hold=4s", "-p", "every=1s",
      "-p", "stats_url=" .. stats, "--yes" }
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("backend: p95 latency [%d.]+m?s over 10s %(threshold 500ms%)", r.stdout)
    assert.matches("calls  SELECT pg_sleep%(%$1%), count%(%*%) FROM tasks", r.stdout)
    assert.matches("scale deployment todo%-chatbot%-backend to 4", r.stdout)
    assert.matches("backend p95 latency < 500ms held for 4s", r.stdout)
    assert.are.equal(4, kh.deployment("backend").spec.replicas)
  end)

  it("changes nothing in a dry run", function()
    saturated()
    local r = backends.assert_unchanged(function()
      return cli.run { "run", RUNBOOK, "-p", "service=backend", "-p", "window=10s", "--dry-run" }
    end)
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("would scale deployment todo%-chatbot%-backend to 4", r.stdout)
    assert.matches("would wait 5m for backend p95 latency < 500ms: now", r.stdout)
    assert.are.equal(2, kh.deployment("backend").spec.replicas)
  end)
end)
