-- runbooks/kafka-topics.lua against the sandbox's brokers: every topic and
-- partition kcat's metadata shows, with its leader and ISR; a broker taken down
-- (seed 002 describes topics when the cluster misbehaves) is named and the run fails.
local cli = require("spec.support.cli")
local backends = require("spec.support.backends")
local sb = require("spec.sandbox.sandbox_helper")

local RUNBOOK = "runbooks/kafka-topics.lua"

local function topics(...)
  return cli.run { "run", RUNBOOK, "-p", "config_timeout=1s", ... }
end

describe("kafka-topics", function()
  after_each(function()
    for b = 1, 3 do sb.ctl("kafka broker-up " .. b) end
    cli.cleanup()
  end)

  it("lists every topic and describes each partition as kcat's metadata has it", function()
    local r = topics()
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    local meta = sb.kcat("-L")
    local n = 0
    for name, count in meta:gmatch('topic "([^"]+)" with (%d+) partitions') do
      n = n + 1
      assert.matches(name:gsub("%-", "%%-") .. "%s+" .. count .. " partitions", r.stdout)
      assert.matches("Topic: " .. name:gsub("%-", "%%-") .. "  PartitionCount: " .. count, r.stdout)
    end
    assert.is_true(n >= 4, meta)
    for part, leader, isr in (meta .. '\n  topic'):match('topic "task%-events".-\n  topic'):gmatch("partition (%d+), leader (%d+), replicas: [%d,]+, isrs: ([%d,]+)") do
      assert.matches(("Partition: %s  Leader: %s  Replicas: [%%d,]+  Isr: %s "):format(part, leader, isr), r.stdout)
    end
    assert.matches("every broker answers", r.stdout)
  end)

  it("fails naming a broker that does not answer", function()
    assert.is_true(select(2, sb.ctl("kafka broker-down 2")))
    local r = topics("-p", "topic=task-events")
    assert.are.equal(1, r.code, r.stdout .. r.stderr)
    assert.matches("broker 2 %(127%.0%.0%.1:%d+%): unreachable", r.stdout)
    assert.matches("broker 2 does not answer", r.stdout)
  end)

  it("changes nothing in a dry run", function()
    local r = backends.assert_unchanged(function() return topics("-p", "topic=task-events", "--dry-run") end)
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
  end)
end)
