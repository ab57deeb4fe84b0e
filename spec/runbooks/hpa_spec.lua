-- runbooks/hpa.lua against the sandbox: the consumers' HPA caps them at 4 on
-- CPU alone while seed 002 wants up to 12 (the partitions) on consumer lag too:
-- adjusted; a deployment without an HPA gets one as kubectl autoscale makes it;
-- one the controller never observes is deleted again; checked with kubectl.
local cli = require("spec.support.cli")
local backends = require("spec.support.backends")
local sb = require("spec.sandbox.sandbox_helper")
local cjson = require("cjson")

local RUNBOOK = "runbooks/hpa.lua"
local HPAS = "/apis/autoscaling/v2/namespaces/todo-chatbot/horizontalpodautoscalers/"

local function hpa(...)
  return cli.run { "run", RUNBOOK, ... }
end

--- kubectl get hpa NAME -o json, or nil when there is none.
local function kubectl_hpa(name)
  local out, ok = sb.kubectl("-n todo-chatbot get hpa " .. name .. " -o json 2>&1")
  if not ok then
    assert.matches("NotFound", out)
    return nil
  end
  return cjson.decode(out)
end

describe("hpa", function()
  local seeded
  setup(function() seeded = kubectl_hpa("recurring-task-service-hpa").spec end)
  after_each(function()
    cli.cleanup()
    sb.k8s("PATCH", HPAS .. "recurring-task-service-hpa", { spec = { minReplicas = seeded.minReplicas,
      maxReplicas = seeded.maxReplicas, metrics = seeded.metrics } })
    sb.k8s("DELETE", HPAS .. "todo-chatbot-backend")
  end)

  it("changes nothing in a dry run", function()
    local r = backends.assert_unchanged(function()
      return hpa("-p", "deployment=todo-chatbot-recurring-task", "-p", "max=12", "-p", "lag_metric=kafka_consumer_lag", "--dry-run")
    end)
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("would patch horizontalpodautoscaler recurring%-task%-service%-hpa", r.stdout)
  end)

  it("raises a consumer HPA's max to the partitions and adds the consumer-lag metric", function()
    local r = hpa("-p", "deployment=todo-chatbot-recurring-task", "-p", "max=12", "-p", "lag_metric=kafka_consumer_lag", "--yes")
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    local h = kubectl_hpa("recurring-task-service-hpa")
    assert.are.equal(12, h.spec.maxReplicas)
    assert.are.equal(1, h.spec.minReplicas)
    assert.are.same({ type = "Resource", resource = { name = "cpu", target = { type = "Utilization", averageUtilization = 70 } } },
      h.spec.metrics[1])
    assert.are.same({ type = "Pods", pods = { metric = { name = "kafka_consumer_lag" },
      target = { type = "AverageValue", averageValue = "100" } } }, h.spec.metrics[2])
    assert.matches("recurring%-task%-service%-hpa: min 1, max 12, desired %d", r.stdout)
  end)

  it("creates an HPA for a deployment that has none, as kubectl autoscale does", function()
    local r = hpa("-p", "deployment=todo-chatbot-backend", "-p", "min=2", "-p", "max=10", "--yes")
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    local h = kubectl_hpa("todo-chatbot-backend")
    assert.are.same({ apiVersion = "apps/v1", kind = "Deployment", name = "todo-chatbot-backend" }, h.spec.scaleTargetRef)
    assert.are.same({ 2, 10, 70 }, { h.spec.minReplicas, h.spec.maxReplicas, h.spec.metrics[1].resource.target.averageUtilization })
    assert.truthy(h.status.desiredReplicas >= 2 and h.status.desiredReplicas <= 10, cjson.encode(h.status))
  end)

  it("deletes the HPA it created when the controller never observes it", function()
    local out, ok = sb.ctl("k8s pause")
    assert(ok, out)
    finally(function() sb.ctl("k8s resume") end)
    local r = hpa("-p", "deployment=todo-chatbot-backend", "-p", "min=2", "-p", "max=10", "-p", "timeout=3s", "--yes")
    assert.are.equal(1, r.code, r.stdout .. r.stderr)
    assert.matches("gave up waiting for the HPA controller", r.stdout)
    assert.is_nil(kubectl_hpa("todo-chatbot-backend"))
  end)

  it("refuses a max below min before changing anything", function()
    local r = hpa("-p", "deployment=todo-chatbot-recurring-task", "-p", "min=5", "-p", "max=2", "--yes")
    assert.are.equal(1, r.code)
    assert.matches("min 5 and max 2: expected 1 <= min <= max", r.stdout)
    assert.are.equal(seeded.maxReplicas, kubectl_hpa("recurring-task-service-hpa").spec.maxReplicas)
  end)
end)
