-- runbooks/kafka-lag-remediation.lua against the sandbox: recurring-task-service
-- starts 1560 behind on task-events and, at its one replica, falls further
-- behind. The runbook scales it and the lag really drains; checked with the
-- sandbox's read-only lag client and curl against the Kubernetes API.
local cli = require("spec.support.cli")
local backends = require("spec.support.backends")
local sb = require("spec.sandbox.sandbox_helper")
local kh = require("spec.runbooks.k8s_helper")

local RUNBOOK = "runbooks/kafka-lag-remediation.lua"
local HPA = "/apis/autoscaling/v2/namespaces/todo-chatbot/horizontalpodautoscalers/recurring-task-service-hpa"

local function lag() return (sb.lag("recurring-task-service", "task-events")) end

local function restore()
  kh.reset_world()                 -- one replica again, the HPA as seeded
  sb.ctl("workload reset")         -- the group's offsets back where they start
  assert(sb.wait_until(20, function() return sb.replicas("recurring-task") == 1 end), "recurring-task not back at 1 replica")
end

describe("kafka-lag-remediation", function()
  setup(restore)
  after_each(function()
    restore()
    cli.cleanup()
  end)

  it("scales the consumers to the partition count at most, and the lag drains below the threshold", function()
    assert.is_true(lag() > 1000)
    local r = cli.run { "run", RUNBOOK, "--yes", "-p", "watch=60s", "-p", "interval=2s" }
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    -- ceil(1560+ / 100) is over 12: capped at task-events' 12 partitions
    assert.matches("todo%-chatbot%-recurring%-task: 1 %-> 12 replicas", r.stdout)
    assert.matches("within the threshold 1000", r.stdout)
    assert.matches("%d+ ERROR records in the last 15m across 1 pod%(s%)", r.stdout)

    -- checked independently: the deployment, the HPA raised so it does not scale back, the lag itself
    assert.are.equal(12, kh.deployment("recurring-task").spec.replicas)
    local _, hpa = sb.k8s("GET", HPA)
    assert.are.same({ 12, 12 }, { hpa.spec.minReplicas, hpa.spec.maxReplicas })
    assert.is_true(lag() <= 1000)
  end)

  it("escalates and fails when the lag does not fall in time", function()
    local hook = cli.webhook()
    finally(hook.stop)
    local r = cli.run({ "run", RUNBOOK, "--yes", "-p", "max_replicas=2", "-p", "threshold=10",
      "-p", "watch=4s", "-p", "interval=1s" }, { SLACK_WEBHOOK = hook.url })
    assert.are.equal(1, r.code, r.stdout .. r.stderr)
    assert.matches("consumer lag of recurring%-task%-service on task%-events is %d+ after", r.stdout .. r.stderr)
    local posts = hook.posts()
    assert.are.equal(1, #posts)
    assert.matches("Escalating to engineering", posts[1].body)
    assert.are.equal(2, kh.deployment("recurring-task").spec.replicas)
  end)

  it("on a terminal: the operator declines scaling; it watches the lag anyway and escalates saying so", function()
    local code, out = cli.pty("n", { "run", RUNBOOK, "-p", "watch=3s", "-p", "interval=1s" })
    assert.are.equal(1, code, out)
    assert.truthy(out:find("Scale the consumers skipped (by the operator)", 1, true), out)
    assert.truthy(out:find("Wait for the new consumers skipped", 1, true), out)
    assert.truthy(out:find("no scaling: the operator declined todo-chatbot-recurring-task 1 -> 12", 1, true), out)
    assert.are.equal(1, kh.deployment("recurring-task").spec.replicas)
  end)

  it("leaves a group within the threshold alone", function()
    local r = cli.run { "run", RUNBOOK, "--yes", "-p", "group=websocket-service", "-p", "deployment=todo-chatbot-websocket",
      "--output", "json" }
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.are.same({}, cli.only(cli.events(r.stdout), "effect"))
    assert.matches("nothing to do", r.stdout)
    assert.are.equal(2, kh.deployment("websocket").spec.replicas)
  end)

  it("changes nothing in a dry run, says what it would do, and names the consumer's processing errors", function()
    local out, ok = sb.ctl("k8s log-errors recurring-task 'reminder processing failed: template not found'")
    assert(ok, out)
    assert.truthy(sb.wait_until(90, function()   -- a fresh pod has written few lines yet
      local logs = sb.kubectl("-n todo-chatbot logs deploy/todo-chatbot-recurring-task -c recurring-task --since=15m")
      return logs:find('"level": "ERROR"[^\n]*"message": "reminder processing failed: template not found"')
    end), "kubectl logs never showed the fault's errors")
    local r = backends.assert_unchanged(function()
      return cli.run { "run", RUNBOOK, "--dry-run" }
    end)
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("would scale deployment todo%-chatbot%-recurring%-task to 12", r.stdout)
    assert.matches("\n%s+| +%d+  reminder processing failed: template not found\n", r.stdout)
    assert.are.equal(1, kh.deployment("recurring-task").spec.replicas)
  end)
end)
