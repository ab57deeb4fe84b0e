-- runbooks/dapr-pubsub-check.lua against the sandbox: the backend's Dapr
-- sidecar publishes to the sandbox's Kafka. Faults: Produce requests failing
-- at the brokers, Redis (the sidecar's outbound dependency) down, a sidecar
-- reporting not ready. kcat reads the test event back independently.
local cli = require("spec.support.cli")
local backends = require("spec.support.backends")
local sb = require("spec.sandbox.sandbox_helper")

local RUNBOOK = "runbooks/dapr-pubsub-check.lua"

describe("dapr-pubsub-check", function()
  after_each(function()
    sb.ctl("kafka clear-errors 0")
    sb.ctl("dapr healthy backend")
    sb.ctl("redis start")
    cli.cleanup()
  end)

  it("passes on a working pub/sub, and its test event is on the topic", function()
    local r = cli.run { "run", RUNBOOK, "--yes" }
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    local id = r.stdout:match("test event (runbook%-check%-%x+) is on task%-events")
    assert.truthy(id, r.stdout)
    -- kcat finds the event, keyed by its check id, as a CloudEvent from the backend's sidecar
    local found = sb.kcat("-C -t task-events -o -40 -e -q -f '%k %s\\n'"):match(id:gsub("%-", "%%-") .. " ([^\n]+)")
    assert.truthy(found, "the test event is not on task-events")
    assert.are.equal("backend", require("cjson").decode(found).source)
  end)

  it("fails naming the broker's answer when publishing does not work", function()
    -- the next Produce requests fail with MESSAGE_TOO_LARGE; the workload is paused so its
    -- own producer does not use them up first
    sb.ctl("workload pause")
    finally(function() sb.ctl("workload resume") end)
    sb.ctl("kafka errors 0 5 10")
    local r = cli.run { "run", RUNBOOK, "--yes" }
    assert.are.equal(1, r.code, r.stdout .. r.stderr)
    assert.matches("1 problem with Dapr pub/sub kafka%-pubsub", r.stdout)
    assert.matches("test publish to kafka%-pubsub/task%-events failed: .*Message size too large", r.stdout)
  end)

  it("names every problem: a sidecar not ready and its outbound dependency down", function()
    sb.ctl("dapr unhealthy backend")
    sb.ctl("redis stop")
    local r = cli.run { "run", RUNBOOK, "--yes", "-p", "test_publish=false" }
    assert.are.equal(1, r.code, r.stdout .. r.stderr)
    assert.matches("2 problems with Dapr pub/sub", r.stdout)
    assert.matches("sidecar not healthy: ERR_HEALTH_NOT_READY", r.stdout)
    assert.matches("sidecar outbound not ready", r.stdout)
  end)

  it("changes nothing in a dry run: no test event is published", function()
    local r = backends.assert_unchanged(function()
      return cli.run { "run", RUNBOOK, "--dry-run" }
    end)
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("would publish %d+ bytes to kafka%-pubsub/task%-events", r.stdout)
  end)
end)
