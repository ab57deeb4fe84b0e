-- kafka: against the sandbox's librdkafka mock brokers, cross-checked with
-- kcat and an independent librdkafka client (spec/fixtures/kafka_offsets.py,
-- python3-confluent-kafka). Every spec works on topics and groups of its own.
package.path = "spec/sandbox/?.lua;" .. package.path
local sb = require("sandbox_helper")
local kafka = require("kafka")
local host = require("runbook.host")

local fixtures = debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") .. "/fixtures"
local run_id = tostring(os.time()) .. tostring(math.random(1000, 9999))
local k

local serial = 0
local function name(what)
  serial = serial + 1
  return ("spec-%s-%s-%d"):format(what, run_id, serial)
end

local function raises(f, ...)
  local ok, err = pcall(f, ...)
  assert.is_false(ok, "expected an error")
  assert.is_table(err, "expected a structured error, got " .. tostring(err))
  assert.are.equal("kafka", err.module)
  return err
end

local function brokers() return sb.env("KAFKA_BROKERS") end

local function py(args)
  local out, ok = sb.sh("/usr/bin/python3 " .. fixtures .. "/kafka_offsets.py " .. args)
  assert(ok, out)
  return out
end

-- Commits {[partition] = offset} for group from another process.
local function commit(group, topic, offsets)
  local a = {}
  for p, o in pairs(offsets) do a[#a + 1] = p .. ":" .. o end
  py(("commit %s %s %s %s"):format(sb.quote(brokers()), group, topic, table.concat(a, " ")))
end

-- {[partition] = offset or nil}, as another process reads them.
local function committed(group, topic, partitions)
  local out = {}
  for p, o in py(("committed %s %s %s %d"):format(sb.quote(brokers()), group, topic, partitions)):gmatch("(%d+) (%-?%d+)") do
    out[tonumber(p)] = tonumber(o) >= 0 and tonumber(o) or nil
  end
  return out
end

-- Produces `n` messages "key-i:value-i" to one partition with kcat.
local function kcat_produce(topic, partition, n, prefix)
  local lines = {}
  for i = 1, n do lines[i] = ("%s-k%d:%s-v%d"):format(prefix or "m", i, prefix or "m", i) end
  local f = os.tmpname()
  local h = io.open(f, "w")
  h:write(table.concat(lines, "\n"), "\n")
  h:close()
  local out, ok = sb.kcat(("-P -t %s -p %d -K: -l %s"):format(topic, partition, f))
  os.remove(f)
  assert(ok, out)
end

-- {[partition] = high watermark} from kcat -Q.
local function kcat_high(topic, partitions)
  local args = {}
  for p = 0, partitions - 1 do args[#args + 1] = ("-t %s:%d:-1"):format(topic, p) end
  local out, ok = sb.kcat("-Q " .. table.concat(args, " "))
  assert(ok, out)
  local high = {}
  for p, o in out:gmatch("%[(%d+)%] offset (%d+)") do high[tonumber(p)] = tonumber(o) end
  return high
end

-- Sorted lines "partition|key|value|headers" of a whole topic, read by kcat.
local function kcat_dump(topic, with_partition)
  return sb.topic_lines(topic, with_partition and "%p|%k|%s|%h\\n" or "%k|%s|%h\\n")
end

setup(function()
  sb.sh(sb.sandbox .. "/up >/dev/null")
  k = kafka.connect { brokers = brokers(), timeout = 20 }
end)

teardown(function() kafka.close_all() end)

describe("kafka metadata", function()
  it("lists the sandbox topics with their partition counts, as kcat does", function()
    local counts = {}
    for _, t in ipairs(k:topics()) do counts[t.name] = t.partitions end
    local out = sb.kcat("-L")
    for t, n in pairs { ["task-events"] = 12, ["task-updates"] = 3, reminders = 3, ["reminders-dlq"] = 3 } do
      assert.are.equal(n, counts[t])
      assert.matches(('topic "%s" with %d partitions'):format(t:gsub("%-", "%%-"), n), out)
    end
  end)

  it("describes a topic: leaders, replicas, ISR and watermarks equal to kcat's", function()
    local topic = name("describe")
    kcat_produce(topic, 2, 5)
    local d = k:describe_topic(topic)
    local high = kcat_high(topic, 4)
    assert.are.equal(4, #d.partitions)
    for _, p in ipairs(d.partitions) do
      assert.are.equal(high[p.partition], p.high)
      assert.are.equal(0, p.low)
      assert.is_true(p.leader >= 1 and p.leader <= 3)
      assert.are.same({ 1, 2, 3 }, p.replicas)
    end
    assert.are.equal(5, d.messages)
    assert.are.equal("UNKNOWN_TOPIC_OR_PART", raises(k.describe_topic, k, "no-such-topic-" .. run_id).code)
  end)

  it("reports the three brokers reachable", function()
    local bs = k:brokers()
    assert.are.equal(3, #bs)
    for i, b in ipairs(bs) do
      assert.are.same({ i, true }, { b.id, b.reachable })
    end
  end)
end)

describe("kafka.lag", function()
  it("equals produced minus committed per partition (kcat produces, another client commits)", function()
    local topic, group = name("lag"), name("lag-group")
    local produced = { [0] = 7, [1] = 3, [2] = 10, [3] = 0 }
    for p, n in pairs(produced) do
      if n > 0 then kcat_produce(topic, p, n) end
    end
    commit(group, topic, { [0] = 2, [1] = 3, [2] = 9 })
    local r = k:lag { group = group, topics = topic }
    local want = { [0] = 5, [1] = 0, [2] = 1 }
    assert.are.equal(4, #r.partitions)
    for _, p in ipairs(r.partitions) do
      assert.are.equal(produced[p.partition], p.high)
      assert.are.equal(want[p.partition], p.lag)
    end
    assert.is_nil(r.partitions[4].committed)   -- partition 3: no committed offset
    assert.are.same({ 6, 1, 6 }, { r.total, r.no_offset, r.topics[topic].lag })
    assert.are.same({ topic, 0, 5 }, { r.max.topic, r.max.partition, r.max.lag })
    assert.matches("total lag 6", kafka.format_lag(r))
  end)

  it("without topics finds the committed partitions itself", function()
    local topic, group = name("lag-all"), name("lag-all-group")
    kcat_produce(topic, 1, 4)
    commit(group, topic, { [1] = 1 })
    local r = k:lag { group = group }
    assert.are.equal(1, #r.partitions)
    assert.are.same({ topic, 1, 1, 3 }, { r.partitions[1].topic, r.partitions[1].partition,
      r.partitions[1].committed, r.partitions[1].lag })
  end)

  it("agrees with the sandbox's own lag tool for recurring-task-service", function()
    local r = k:lag { group = "recurring-task-service", topics = "task-events" }
    local _, parts = sb.lag("recurring-task-service", "task-events")
    assert.are.equal(12, #r.partitions)
    -- the workload keeps committing: compare offsets that only grow
    for i, p in ipairs(parts) do
      assert.is_true(r.partitions[i].committed <= p.committed)
      assert.is_true(r.partitions[i].high <= p.high)
    end
    assert.is_true(r.total > 1000, "the sandbox keeps this group over 1000 behind")
  end)

  it("serves many groups at once with their total", function()
    local topic = name("lag-many")
    kcat_produce(topic, 0, 10)
    local groups = {}
    for i = 1, 5 do
      groups[i] = name("many-" .. i)
      commit(groups[i], topic, { [0] = i })
    end
    local r = k:lag { groups = groups, topics = topic }
    for i = 1, 5 do assert.are.same({ groups[i], 10 - i }, { r[i].group, r[i].total }) end
    assert.are.equal(35, r.total)
  end)
end)

-- Lag over many groups sends the fewest requests brokers that take one group
-- per request allow: metadata once, a FindCoordinator and an OffsetFetch per
-- group, a ListOffsets per leader broker (counted from debug=protocol lines).
describe("kafka requests at scale", function()
  local cli = require("spec.support.cli")
  after_each(cli.cleanup)

  local function requests(src)
    local r = cli.run({ "run", cli.runbook(src), "--output", "json" },
      { KAFKA_BROKERS = brokers(), RUNBOOK_STATE_DIR = cli.tmpdir() })
    assert.are.equal(0, r.code, r.stderr .. r.stdout)
    local sent = {}
    for what in r.stderr:gmatch("Sent (%a+)Request") do sent[what] = (sent[what] or 0) + 1 end
    local outputs
    for _, e in ipairs(cli.events(r.stdout)) do if e.event == "step_end" then outputs = e.outputs end end
    return sent, outputs
  end

  it("lag of 40 groups: one Metadata, 40 FindCoordinator, 40 OffsetFetch, a ListOffsets per broker", function()
    local out, ok = sb.ctl("kafka groups 40")   -- commits them, and says their total lag
    assert.is_true(ok, out)
    local want = tonumber(out:match("lag=(%d+)"))
    local sent, outputs = requests([[
name = "lag-at-scale"
description = "lag of 40 groups"
step "lag" { run = function()
  local groups = {}
  for g = 1, 40 do groups[g] = "scale-group-" .. g end
  local k = kafka.connect { brokers = os.getenv("KAFKA_BROKERS"), debug = "protocol" }
  return { total = k:lag { groups = groups, topics = "scale-events" }.total }
end }
]])
    assert.are.equal(want, outputs.total)
    assert.are.same({ 1, 40, 40 }, { sent.Metadata, sent.FindCoordinator, sent.OffsetFetch })
    assert.is_true(sent.ListOffsets >= 1 and sent.ListOffsets <= 3, tostring(sent.ListOffsets))
  end)

  it("watermarks of a topic send no more requests than kcat -Q", function()
    assert.is_true(select(2, sb.ctl("kafka groups 1")))
    local sent, outputs = requests([[
name = "watermarks-requests"
description = "watermarks of scale-events"
step "marks" { run = function()
  local k = kafka.connect { brokers = os.getenv("KAFKA_BROKERS"), debug = "protocol" }
  local n = 0
  for _, m in pairs(k:watermarks("scale-events")) do n = n + m.high - m.low end
  return { messages = n }
end }
]])
    assert.are.equal(1200, outputs.messages)
    local n = 0
    for _, c in pairs(sent) do n = n + c end
    local args = {}
    for p = 0, 11 do args[#args + 1] = "-t scale-events:" .. p .. ":-1" end
    local kout = sb.kcat("-Q -X debug=protocol " .. table.concat(args, " ") .. " 2>&1")
    local kn = select(2, kout:gsub("Sent %a+Request", ""))
    assert.is_true(n <= kn, ("runbook %d requests, kcat %d"):format(n, kn))
  end)
end)

-- librdkafka 2.0.2 segfaulted (exit 139, in its own thread) when the
-- OffsetFetch behind lag failed with NOT_COORDINATOR (16) or
-- COORDINATOR_NOT_AVAILABLE (15) while the coordinator moves; modules/kafka.c
-- says why and how it is avoided. Run in a process of its own: a crash must
-- fail this spec, not end the suite.
describe("kafka.lag while the group's coordinator moves", function()
  local cli = require("spec.support.cli")
  after_each(function()
    sb.ctl("kafka clear-errors 9")
    cli.cleanup()
  end)
  for _, code in ipairs { 16, 15, 14 } do
    it(("OffsetFetch failing with error %d: no crash, asked again, the lag comes back"):format(code), function()
      local rb = cli.runbook([[
name = "lag-while-moving"
description = "lag while OffsetFetch fails"
step "lag" { run = function() return { total = kafka.lag { group = "recurring-task-service" }.total } end }
]])
      assert.is_true(select(2, sb.ctl(("kafka errors 9 3 %d"):format(code))))
      local r = cli.run({ "run", rb, "--output", "json" }, { KAFKA_BROKERS = brokers(), RUNBOOK_STATE_DIR = cli.tmpdir() })
      assert.are.equal(0, r.code, r.stderr .. r.stdout)
      local total
      for _, e in ipairs(cli.events(r.stdout)) do if e.event == "step_end" then total = e.outputs.total end end
      local _, parts = sb.lag("recurring-task-service", "task-events")
      assert.is_true(total > 1000 and #parts == 12, "the sandbox keeps this group over 1000 behind")
    end)
  end
end)

describe("kafka.reset_offsets", function()
  local topic, group
  local start = { [0] = 5, [1] = 5, [2] = 5, [3] = 5 }

  before_each(function()
    topic, group = name("reset"), name("reset-group")
    for p = 0, 3 do kcat_produce(topic, p, 10) end
    commit(group, topic, start)
  end)

  after_each(function() host.set_mode("run") end)

  local cases = {
    { to = "earliest", want = { [0] = 0, [1] = 0, [2] = 0, [3] = 0 }, replay = 20 },
    { to = "latest", want = { [0] = 10, [1] = 10, [2] = 10, [3] = 10 }, skip = 20 },
    { to = { offset = 7 }, want = { [0] = 7, [1] = 7, [2] = 7, [3] = 7 }, skip = 8 },
    { to = { offset = 99 }, want = { [0] = 10, [1] = 10, [2] = 10, [3] = 10 }, skip = 20 },
    { to = { shift = -3 }, want = { [0] = 2, [1] = 2, [2] = 2, [3] = 2 }, replay = 12 },
    { to = { shift = 20 }, want = { [0] = 10, [1] = 10, [2] = 10, [3] = 10 }, skip = 20 },
  }
  for _, c in ipairs(cases) do
    local label = type(c.to) == "string" and c.to or next(c.to) .. " " .. tostring(select(2, next(c.to)))
    it("to " .. label .. " commits exactly the plan", function()
      local plan = k:reset_offsets { group = group, topics = topic, to = c.to }
      assert.is_true(plan.applied)
      assert.are.same({ c.replay or 0, c.skip or 0 }, { plan.replay, plan.skip })
      for _, p in ipairs(plan.partitions) do
        assert.are.same({ 5, c.want[p.partition] }, { p.current, p.target })
      end
      assert.are.same(c.want, committed(group, topic, 4))
    end)
  end

  it("only plans in a dry run: nothing is committed and the gate records a simulation", function()
    local effects = {}
    host.set_effect_sink(function(e) effects[#effects + 1] = e end)
    host.set_mode("dry-run")
    local plan = k:reset_offsets { group = group, topics = topic, to = "earliest", partitions = { 1, 2 } }
    host.set_mode("run")
    host.set_effect_sink(nil)
    assert.is_false(plan.applied)
    assert.are.same({ 2, 10 }, { #plan.partitions, plan.replay })
    assert.are.same(start, committed(group, topic, 4))
    assert.are.equal(1, #effects)
    assert.are.same({ "kafka", "reset_offsets", group, "simulated" },
      { effects[1].module, effects[1].op, effects[1].target, effects[1].decision })
    assert.matches("plan: reset group", kafka.format_plan(plan))
  end)

  it("resets to a datetime through offsets-for-times (the mock answers -1: the log end)", function()
    -- The mock does not implement ListOffsets by timestamp: it answers -1,
    -- which Kafka also answers for a time after the last message; both mean
    -- the end of the log. A real broker's answer is not tested here.
    local plan = k:reset_offsets { group = group, topics = topic, to = { datetime = "2999-01-01T00:00:00Z" } }
    for _, p in ipairs(plan.partitions) do assert.are.equal(10, p.target) end
    assert.are.same({ [0] = 10, [1] = 10, [2] = 10, [3] = 10 }, committed(group, topic, 4))
  end)

  it("refuses a group that joined with members, suggesting to scale consumers to zero", function()
    local joined = name("joined")
    -- kcat -G joins the group (JoinGroup) and commits; the broker then refuses outside commits
    local out, ok = sb.kcat(("-G %s -o beginning -e -q %s"):format(joined, topic))
    assert(ok, out)
    local err = raises(k.reset_offsets, k, { group = joined, topics = topic, to = "earliest" })
    assert.are.equal("NON_EMPTY_GROUP", err.code)
    assert.matches("scale its consumers to zero", err.message)
  end)

  local bad = {
    { { topics = "t", to = "earliest" }, "group is required" },
    { { group = "g", to = "earliest" }, "topics must be" },
    { { group = "g", topics = "t", to = "yesterday" }, "to must be" },
    { { group = "g", topics = "t", to = { offset = -1 } }, "to must be" },
    { { group = "g", topics = "t", to = { datetime = "31/12/2025" } }, "expected a datetime" },
    { { group = "g", topics = "t", to = { datetime = "2025-12-31T10:00:00+2" } }, "bad time zone" },
  }
  for _, c in ipairs(bad) do
    it("rejects bad arguments: " .. c[2], function()
      local err = raises(k.reset_offsets, k, c[1])
      assert.are.equal("bad_argument", err.code)
      assert.matches(c[2], err.message, 1, true)
    end)
  end

  it("shift needs a committed offset to shift from", function()
    local err = raises(k.reset_offsets, k, { group = name("fresh"), topics = topic, to = { shift = -1 } })
    assert.matches("no committed offset to shift from", err.message)
  end)
end)

describe("kafka.parse_datetime", function()
  for _, c in ipairs {
    { "1970-01-01T00:00:00Z", 0 },
    { "2025-12-31T10:00:00Z", 1767175200000 },
    { "2025-12-31T10:00:00.250Z", 1767175200250 },
    { "2025-12-31T10:00:00.000", 1767175200000 },
    { "2025-12-31T12:00:00+02:00", 1767175200000 },
    { "2024-02-29T00:00:00Z", 1709164800000 },
  } do
    it(c[1], function() assert.are.equal(c[2], kafka.parse_datetime(c[1])) end)
  end
end)

describe("kafka produce and consume", function()
  after_each(function() host.set_mode("run") end)

  it("round-trips keys, values, headers and partitions with kcat", function()
    local topic = name("roundtrip")
    local r = k:produce { topic = topic, messages = {
      { key = "a", value = "first", headers = { { "trace", "t1" }, { "trace", "t2" } }, partition = 1 },
      { key = "b", value = { n = 2 }, headers = { source = "spec" }, partition = 2 },
    } }
    assert.are.same({ 2, { 1, 2 }, { 0, 0 } }, { r.delivered, r.partitions, r.offsets })
    assert.are.same({ '1|a|first|trace=t1,trace=t2', '2|b|{"n":2}|source=spec' }, kcat_dump(topic, true))
    local got = k:messages { topic = topic }
    table.sort(got, function(x, y) return x.partition < y.partition end)
    assert.are.same({ "a", "first", { { "trace", "t1" }, { "trace", "t2" } }, 1, 0 },
      { got[1].key, got[1].value, got[1].headers, got[1].partition, got[1].offset })
    assert.is_true(got[1].timestamp > 1.6e12)
  end)

  it("reads what kcat produced, from an offset, up to max_messages, without committing", function()
    local topic = name("consume")
    kcat_produce(topic, 0, 6, "x")
    local keys = {}
    for m in k:consume { topic = topic, from = 2, max_messages = 3, partitions = { 0 } } do keys[#keys + 1] = m.key end
    assert.are.same({ "x-k3", "x-k4", "x-k5" }, keys)
    assert.are.equal(0, #k:messages { topic = topic, from = "latest" })
    assert.are.same({}, committed("runbook-reader-no-commit", topic, 4))
  end)

  it("skips produce in a dry run: nothing reaches the topic", function()
    local topic = name("dry")
    kcat_produce(topic, 0, 1)
    host.set_mode("dry-run")
    local r = k:produce { topic = topic, key = "k", value = "v", partition = 0 }
    host.set_mode("run")
    assert.is_true(r.skipped)
    assert.are.equal(1, kcat_high(topic, 4)[0])
  end)

  it("raises a clear error for a partition the topic does not have", function()
    local topic = name("nopart")
    kcat_produce(topic, 0, 1)
    local err = raises(k.produce, k, { topic = topic, value = "v", partition = 9 })
    assert.are.equal("_UNKNOWN_PARTITION", err.code)
  end)

  for _, c in ipairs {
    { { value = "v" }, "topic is required" },
    { { topic = "t", partition = -1 }, "partition must be" },
    { { topic = "t", headers = { { 1, 2 } } }, "headers must be" },
    { { topic = "t", messages = {} }, "no messages" },
  } do
    it("rejects bad produce arguments: " .. c[2], function()
      local err = raises(k.produce, k, c[1])
      assert.are.equal("bad_argument", err.code)
      assert.matches(c[2], err.message, 1, true)
    end)
  end
end)

describe("kafka backup and restore", function()
  local dir
  before_each(function() dir = sb.sh("mktemp -d"):gsub("%s+$", "") end)
  after_each(function() sb.sh("rm -rf " .. sb.quote(dir)) end)

  it("restores every message into a fresh topic (compared with kcat), binary ones too", function()
    local src, dst = name("backup-src"), name("backup-dst")
    kcat_produce(src, 0, 20, "a")
    kcat_produce(src, 3, 7, "b")
    k:produce { topic = src, partition = 1, key = "bin\xff", value = "\x00\x01\xfe", headers = { h = "\xc3\x28" } }
    local file = dir .. "/src.jsonl"
    local b = k:backup_topic { topic = src, file = file }
    assert.are.same({ 28, true }, { b.messages, b.written })
    assert.are.same({ 20, 1, 0, 7 }, { b.partitions["0"].count, b.partitions["1"].count, b.partitions["2"].count,
      b.partitions["3"].count })
    assert.are.equal(sb.sh("sha256sum " .. sb.quote(file)):match("^(%x+)"), b.sha256)
    assert.matches('"key_base64"', (sb.sh("cat " .. sb.quote(file))))
    local r = k:restore_topic { file = file, topic = dst }
    assert.are.equal(28, r.restored)
    assert.are.same(kcat_dump(src, true), kcat_dump(dst, true))
  end)

  it("refuses a backup that does not match its manifest", function()
    local src = name("backup-tamper")
    kcat_produce(src, 0, 3)
    local file = dir .. "/t.jsonl"
    k:backup_topic { topic = src, file = file }
    sb.sh("echo '{}' >> " .. sb.quote(file))
    assert.are.equal("checksum_mismatch", raises(k.restore_topic, k, { file = file, topic = name("never") }).code)
  end)

  it("writes nothing in a dry run", function()
    local src = name("backup-dry")
    kcat_produce(src, 0, 3)
    host.set_mode("dry-run")
    local b = k:backup_topic { topic = src, file = dir .. "/dry.jsonl" }
    host.set_mode("run")
    assert.are.same({ 3, false }, { b.messages, b.written })
    assert.are.equal("", (sb.sh("ls " .. sb.quote(dir))))
  end)
end)

describe("kafka.replay", function()
  it("moves exactly the messages asked, and with a group continues where it stopped", function()
    local dlq, target, group = name("dlq"), name("dlq-target"), name("dlq-group")
    local msgs = {}
    for i = 1, 6 do
      msgs[i] = { key = "r" .. i, value = "reminder " .. i, partition = 0,
                  headers = { { "error", i % 2 == 0 and "smtp: 550" or "template" } } }
    end
    k:produce { topic = dlq, messages = msgs }
    local smtp = function(m) return m.headers[1][2]:match("^smtp") ~= nil end
    local r = k:replay { from_topic = dlq, to_topic = target, filter = smtp, max = 2, group = group }
    assert.are.same({ 2, 2 }, { r.moved, r.matched })
    assert.are.same({ "r2|reminder 2|error=smtp: 550", "r4|reminder 4|error=smtp: 550" }, kcat_dump(target))
    r = k:replay { from_topic = dlq, to_topic = target, filter = smtp, group = group }
    assert.are.equal(1, r.moved)
    assert.are.equal(3, #kcat_dump(target))
    assert.are.equal("r6|reminder 6|error=smtp: 550", kcat_dump(target)[3])
  end)
end)

describe("kafka client closing", function()
  local cli = require("spec.support.cli")
  after_each(cli.cleanup)
  it("a client closed after lag and then collected at exit ends the process cleanly", function()
    -- close() ran again from __gc and destroyed lag's queue twice (exit 139)
    local rb = cli.runbook([[
name = "close-after-lag"
description = "lag, then close every client"
step "lag" { run = function() kafka.lag { group = "recurring-task-service" }; kafka.close_all() end }
]])
    local r = cli.run({ "run", rb }, { KAFKA_BROKERS = brokers(), RUNBOOK_STATE_DIR = cli.tmpdir() })
    assert.are.equal(0, r.code, r.stderr .. r.stdout)
  end)
end)

describe("kafka administration on the mock", function()
  -- The mock implements none of these requests (reference/kafka-mock.md):
  -- what is tested is that its answers become clear errors in time.
  it("describe_group and list_groups say the broker does not support them", function()
    assert.are.equal("_UNSUPPORTED_FEATURE", raises(k.describe_group, k, "websocket-service").code)
    assert.are.equal("_UNSUPPORTED_FEATURE", raises(k.list_groups, k).code)
    assert.is_true(#k:topics() >= 4, "the client still works afterwards")
  end)

  it("create_topic and alter_topic_config time out within their timeout", function()
    local t0 = host.now()
    local err = raises(k.create_topic, k, { name = name("create"), partitions = 3, timeout = 1 })
    assert.are.same({ "timeout", true }, { err.code, err.retryable })
    assert.matches("timed out after 1s", err.message, 1, true)
    err = raises(k.alter_topic_config, k, { topic = "task-updates", set = { ["retention.ms"] = 2592000000 }, timeout = 1 })
    assert.are.equal("timeout", err.code)
    assert.matches("timed out after 1s", err.message, 1, true)
    assert.is_true(host.now() - t0 < 4)
  end)

  it("create_partitions refuses to decrease, as Kafka does", function()
    local err = raises(k.create_partitions, k, { topic = "task-updates", total = 2 })
    assert.are.equal("INVALID_PARTITIONS", err.code)
    assert.matches("can only grow", err.message)
  end)
end)

describe("kafka connection", function()
  it("reuses one client per settings and keeps passwords secret", function()
    assert.are.equal(k, kafka.connect { brokers = brokers(), timeout = 20 })
    kafka.connect { brokers = brokers(), ["sasl.password"] = "kafka-s3cret-pw", ["sasl.username"] = "u" }
    assert.are.equal("***", host.redact("kafka-s3cret-pw"))
  end)

  it("names a bad librdkafka property", function()
    local ok, err = pcall(kafka.connect, { brokers = brokers(), ["no.such.property"] = "1" })
    assert.is_false(ok)
    assert.matches("no.such.property", tostring(err), 1, true)
  end)
end)

describe("kafka with brokers down", function()
  after_each(function()
    for b = 1, 3 do sb.ctl("kafka broker-up " .. b) end
  end)

  it("reports a down broker unreachable and still answers lag from the others", function()
    assert.is_true(select(2, sb.ctl("kafka broker-down 2")))
    local c = kafka.connect { brokers = brokers(), timeout = 10, ["client.id"] = "down-spec" }
    local t0 = host.now()
    local bs = c:brokers { probe_timeout = 1 }
    assert.are.same({ true, false, true }, { bs[1].reachable, bs[2].reachable, bs[3].reachable })
    assert.is_string(bs[2].reason)
    local r = c:lag { group = "recurring-task-service", topics = "task-events" }
    assert.are.equal(12, #r.partitions)
    assert.is_true(host.now() - t0 < 10)
  end)

  it("fails within the timeout, with a retryable error, when every broker is down", function()
    for b = 1, 3 do assert.is_true(select(2, sb.ctl("kafka broker-down " .. b))) end
    local c = kafka.connect { brokers = brokers(), timeout = 2, ["client.id"] = "all-down-spec" }
    local t0 = host.now()
    local err = raises(c.lag, c, { group = "recurring-task-service", topics = "task-events" })
    assert.is_true(err.retryable)
    assert.is_true(host.now() - t0 < 4, "took " .. (host.now() - t0))
    for _, b in ipairs(c:brokers { probe_timeout = 0.5 }) do assert.is_false(b.reachable) end
  end)
end)
