-- runbooks/consumer-offset-reset.lua against the sandbox: recurring-task-service
-- is 1560+ behind on task-events; the runbook stops its consumers, moves the
-- group's offsets and starts them again. Checked with the sandbox's read-only
-- lag client and curl against the Kubernetes API.
local cli = require("spec.support.cli")
local backends = require("spec.support.backends")
local sb = require("spec.sandbox.sandbox_helper")
local kh = require("spec.runbooks.k8s_helper")

local RUNBOOK = "runbooks/consumer-offset-reset.lua"

local function committed(partition)
  local _, parts = sb.lag("recurring-task-service", "task-events")
  for _, p in ipairs(parts) do if p.partition == partition then return p.committed, p.high end end
end

local function restore()
  sb.ctl("workload reset")
  kh.reset_world()
end

describe("consumer-offset-reset", function()
  setup(restore)
  after_each(function()
    restore()
    cli.cleanup()
  end)

  it("skips a backlog: consumers stopped, offsets to latest, consumers back", function()
    assert.is_true(sb.lag("recurring-task-service", "task-events") > 1000)
    local r = cli.run { "run", RUNBOOK, "-p", "to=latest", "--yes", "--output", "json" }
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    local ops = {}
    for _, e in ipairs(cli.only(cli.events(r.stdout), "effect")) do ops[#ops + 1] = e.op end
    assert.are.same({ "scale", "reset_offsets", "scale" }, ops)
    -- checked independently: the backlog is gone and the consumer runs again
    assert.is_true(sb.lag("recurring-task-service", "task-events") < 300)
    assert.are.equal(1, kh.deployment("recurring-task").spec.replicas)
    assert.truthy(kh.wait_rolled_out("recurring-task"))
  end)

  it("replays one partition from the earliest offset, and leaves the others", function()
    local before0 = committed(0)
    local r = cli.run { "run", RUNBOOK, "-p", "to=earliest", "-p", "partitions=0", "--yes" }
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.is_true(committed(0) < before0 - 100, ("partition 0 at %d, was %d"):format(committed(0), before0))
    assert.matches("every selected partition of task%-events is at its target", r.stdout)
  end)

  it("on a terminal: the operator stops the consumers, then declines the reset; they start again where they were", function()
    local before0 = committed(0)
    local code, out = cli.pty("y,n", { "run", RUNBOOK, "-p", "to=earliest", "-p", "partitions=0" })
    assert.are.equal(0, code, out)
    assert.truthy(out:find("Reset the offsets skipped (by the operator)", 1, true), out)
    assert.truthy(out:find("Verify the offsets skipped", 1, true), out)
    assert.truthy(out:find("consumes again from its old offsets: the operator skipped the reset", 1, true), out)
    -- consuming only moves it forward; the declined reset would have moved it back to the earliest offset
    assert.is_true(committed(0) >= before0, ("partition 0 at %d, was %d"):format(committed(0), before0))
    assert.are.equal(1, kh.deployment("recurring-task").spec.replicas)
  end)

  it("on a terminal: the operator declines stopping the consumers, then confirms the reset; it refuses", function()
    local before0 = committed(0)
    local code, out = cli.pty("n,y", { "run", RUNBOOK, "-p", "to=earliest", "-p", "partitions=0" })
    assert.are.equal(1, code, out)
    assert.truthy(out:find("not resetting: todo-chatbot-recurring-task still runs 1 consumer pod(s) because stopping "
      .. "them was declined", 1, true), out)
    assert.falsy(out:find("reset group", 1, true), out)
    assert.is_true(committed(0) >= before0, ("partition 0 at %d, was %d"):format(committed(0), before0))
    assert.are.equal(1, kh.deployment("recurring-task").spec.replicas)
  end)

  it("on a terminal: consumers already stopped by hand, the operator declines the stop and the reset goes ahead", function()
    kh.scale("recurring-task", 0)
    local before0 = committed(0)
    local code, out = cli.pty("n,y", { "run", RUNBOOK, "-p", "to=earliest", "-p", "partitions=0" })
    assert.are.equal(0, code, out)
    assert.truthy(out:find("every selected partition of task-events is at its target", 1, true), out)
    assert.is_true(committed(0) < before0 - 100, ("partition 0 at %d, was %d"):format(committed(0), before0))
    -- the runbook did not stop them, so it leaves them stopped
    assert.truthy(out:find("Start the consumers skipped", 1, true), out)
    assert.are.equal(0, kh.deployment("recurring-task").spec.replicas)
  end)

  it("refuses a target it cannot read before stopping anything", function()
    local r = cli.run { "run", RUNBOOK, "-p", "to=yesterday", "--yes", "--output", "json" }
    assert.are.equal(1, r.code, r.stdout .. r.stderr)
    assert.matches('param to: \\"yesterday\\" is not earliest, latest', r.stdout, 1, true)
    assert.are.same({}, cli.only(cli.events(r.stdout), "effect"))
    assert.are.equal(1, kh.deployment("recurring-task").spec.replicas)
  end)

  it("changes nothing in a dry run, and shows the plan", function()
    local r = backends.assert_unchanged(function()
      return cli.run { "run", RUNBOOK, "-p", "to=latest", "--dry-run" }
    end)
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("would scale deployment todo%-chatbot%-recurring%-task to 0", r.stdout)
    assert.matches("reset group recurring%-task%-service on task%-events to latest", r.stdout)
  end)
end)
