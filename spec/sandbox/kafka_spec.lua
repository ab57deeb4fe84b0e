-- Kafka in the sandbox, seen through kcat and an independent librdkafka client
-- (and the Kubernetes API through curl):
-- topics, events, consumer lag that follows the replica count (from the file
-- or from the Kubernetes deployment), the workload pause, and the faults.
package.path = "spec/sandbox/?.lua;" .. package.path
local sb = require("sandbox_helper")
local cjson = require("cjson")

local TOPICS = {["task-events"] = 12, ["task-updates"] = 3, reminders = 3, ["reminders-dlq"] = 3}
local GROUPS = {
    {"recurring-task-service", "task-events"},
    {"websocket-service", "task-events"},
    {"websocket-service", "task-updates"},
    {"notification-service", "reminders"},
}

local function partitions(metadata, topic)
    return tonumber(metadata:match('topic "' .. topic:gsub("%-", "%%-") .. '" with (%d+) partitions'))
end

local function recurring_lag()
    return (sb.lag("recurring-task-service", "task-events"))
end

-- Everything a dry run could change: every group's committed offsets, and
-- every topic's high watermarks as kcat sees them.
local function kafka_state()
    local state = {}
    for _, g in ipairs(GROUPS) do
        local _, parts = sb.lag(g[1], g[2])
        state[g[1] .. "/" .. g[2]] = parts
    end
    for topic, n in pairs(TOPICS) do state[topic] = sb.watermarks(topic, n) end
    return state
end

describe("sandbox Kafka", function()
    it("has three brokers and the todo-chatbot topics", function()
        local md, ok = sb.kcat("-L")
        assert.is_true(ok, md)
        assert.matches("3 brokers", md)
        for topic, n in pairs(TOPICS) do
            assert.equal(n, partitions(md, topic), topic)
        end
    end)

    it("carries task events", function()
        local out, ok = sb.kcat("-C -t task-events -o beginning -c 5 -e -q")
        assert.is_true(ok, out)
        local first = cjson.decode(out:match("[^\n]+"))
        assert.matches("^task%.", first.event_type)
        assert.is_number(first.task_id)
    end)

    it("holds failed reminders with headers saying why in reminders-dlq", function()
        local out = sb.kcat("-C -t reminders-dlq -o beginning -e -q -f '%h\\t%s\\n'")
        local n = 0
        for headers, value in out:gmatch("([^\t\n]*)\t([^\n]*)") do
            n = n + 1
            assert.matches("error=", headers)
            assert.matches("original%-topic=reminders", headers)
            assert.is_string(cjson.decode(value).reminder_id)
        end
        assert.equal(25, n)
    end)

    it("reports the same high watermarks to kcat -Q and to the lag client", function()
        sb.ctl("workload pause")
        finally(function() sb.ctl("workload resume") end)
        local _, parts = sb.lag("recurring-task-service", "task-events")
        local marks = sb.watermarks("task-events", 12)
        assert.equal(12, #parts)
        for _, p in ipairs(parts) do
            assert.equal(marks[p.partition], p.high, "partition " .. p.partition)
        end
    end)

    describe("recurring-task-service", function()
        local before_replicas
        before_each(function()
            before_replicas = sb.replicas("recurring-task")
            assert.is_true(select(2, sb.ctl("workload reset")))
        end)
        after_each(function()
            sb.ctl("replicas recurring-task " .. before_replicas)
            sb.ctl("workload reset")
        end)

        it("is over 1000 behind and drains when its replica file count rises", function()
            local before = recurring_lag()
            assert.is_true(before > 1000, "lag " .. before)
            assert.is_true(select(2, sb.ctl("replicas recurring-task 8")))
            local after = sb.wait_until(5, function()
                local lag = recurring_lag()
                return lag < before - 50 and lag
            end)
            assert.is_truthy(after, "lag did not fall from " .. before)
        end)

        it("drains when its Kubernetes deployment is scaled up (ready replicas)", function()
            local scale = "/apis/apps/v1/namespaces/todo-chatbot/deployments/todo-chatbot-recurring-task/scale"
            local status, doc = sb.k8s("GET", scale)
            assert.equal(200, status, doc)
            local spec_replicas = doc.spec.replicas
            finally(function()
                sb.k8s("PATCH", scale, {spec = {replicas = spec_replicas}})
                sb.wait_until(10, function() return sb.replicas("recurring-task") == before_replicas end)
            end)
            local before = recurring_lag()
            status, doc = sb.k8s("PATCH", scale, {spec = {replicas = 8}})
            assert.equal(200, status, doc)
            assert.is_true(sb.wait_until(10, function() return sb.replicas("recurring-task") == 8 end),
                "the stand-in did not report 8 ready replicas")
            local after = sb.wait_until(5, function()
                local lag = recurring_lag()
                return lag < before - 50 and lag
            end)
            assert.is_truthy(after, "lag did not fall from " .. before)
        end)
    end)

    it("keeps websocket-service nearly caught up", function()
        assert.is_true(sb.lag("websocket-service", "task-events") < 200)
    end)

    it("changes nothing while the workload is paused, and moves again on resume", function()
        finally(function() sb.ctl("workload resume") end)
        assert.is_true(select(2, sb.ctl("workload pause")))
        local before = kafka_state()
        sb.sleep(1.2)   -- longer than one workload tick
        assert.same(before, kafka_state())
        assert.is_true(select(2, sb.ctl("workload resume")))
        local moved = sb.wait_until(5, function()
            local now = sb.watermarks("task-events", 12)
            for p = 0, 11 do
                if now[p] ~= before["task-events"][p] then return true end
            end
        end)
        assert.is_true(moved)
    end)

    it("takes a broker down and brings it back", function()
        finally(function() sb.ctl("kafka broker-up 2") end)
        local broker2 = sb.env("KAFKA_BROKERS"):match("^[^,]+,([^,]+)")
        assert.is_true(select(2, sb.ctl("kafka broker-down 2")))
        local out, ok = sb.sh("timeout 10 kcat -L -m 1 -b " .. broker2)
        assert.is_false(ok, out)
        assert.matches("Broker transport failure", out)
        -- leaders moved to the brokers still up, so the cluster keeps serving
        local md = sb.kcat("-L -t task-events")
        assert.matches("leader 3,", md)
        assert.is_nil(md:match("leader 2,"), md)
        assert.is_true(select(2, sb.ctl("kafka broker-up 2")))
        out, ok = sb.sh("timeout 10 kcat -L -m 5 -b " .. broker2)
        assert.is_true(ok, out)
        -- preferred leaders return
        assert.matches("leader 2,", (sb.kcat("-L -t task-events")))
    end)

    it("adds round-trip time to every broker", function()
        finally(function() sb.ctl("kafka rtt 0") end)
        local function metadata_ms()
            local out = sb.sh("s=$(date +%s%N); timeout 20 kcat -L -t task-updates -b "
                .. sb.quote(sb.env("KAFKA_BROKERS")) .. " >/dev/null; echo $((($(date +%s%N) - s) / 1000000))")
            return tonumber(out:match("(%d+)%s*$"))
        end
        -- Far above kcat's own time on a loaded machine.
        assert.is_true(select(2, sb.ctl("kafka rtt 2s")))
        local slow = metadata_ms()
        assert.is_true(slow >= 2000, slow)
        assert.is_true(select(2, sb.ctl("kafka rtt 0")))
        local fast = metadata_ms()
        assert.is_true(fast < 2000, fast)
    end)

    it("fails the next requests of one kind with ctl kafka errors", function()
        sb.ctl("workload pause")   -- so that kcat's Produce is the next one
        finally(function()
            sb.ctl("kafka clear-errors 0")
            sb.ctl("workload resume")
        end)
        local marks = sb.watermarks("task-updates", 3)
        assert.is_true(select(2, sb.ctl("kafka errors 0 1 10")))   -- Produce, MESSAGE_TOO_LARGE
        local out, ok = sb.sh("echo sandbox-spec | " .. "timeout 20 kcat -P -p 0 -t task-updates -b "
            .. sb.quote(sb.env("KAFKA_BROKERS")))
        assert.is_false(ok, out)
        assert.matches("Message size too large", out)
        assert.same(marks, sb.watermarks("task-updates", 3))
        out, ok = sb.sh("echo sandbox-spec | " .. "timeout 20 kcat -P -p 0 -t task-updates -b "
            .. sb.quote(sb.env("KAFKA_BROKERS")))
        assert.is_true(ok, out)
        assert.equal(marks[0] + 1, sb.watermarks("task-updates", 3)[0])
    end)

    it("makes N consumer groups with committed offsets on scale-events with ctl kafka groups", function()
        local out, ok = sb.ctl("kafka groups 30")
        assert.is_true(ok, out)
        assert.matches("groups=30 topic=scale-events partitions=12", out, 1, true)
        -- group g commits (7g + 3p) % 100 on partition p of 100 messages
        local total, parts = sb.lag("scale-group-30", "scale-events")
        assert.equal(12, #parts)
        local want = 0
        for _, p in ipairs(parts) do
            assert.same({100, (7 * 30 + 3 * p.partition) % 100}, {p.high, p.committed})
            want = want + 100 - p.committed
        end
        assert.equal(want, total)
        out, ok = sb.ctl("kafka groups 30")   -- idempotent: the same offsets again
        assert.is_true(ok, out)
        assert.equal(want, (sb.lag("scale-group-30", "scale-events")))
        out, ok = sb.ctl("kafka groups 0")
        assert.is_false(ok)
        assert.matches("N >= 1", out)
    end)

    it("rejects control commands it cannot carry out, saying why", function()
        local out, ok = sb.ctl("kafka broker-down 4")
        assert.is_false(ok)
        assert.matches("N = 1, 2 or 3", out)
        out, ok = sb.ctl("kafka rtt fast")
        assert.is_false(ok)
        assert.matches("bad duration: 'fast'", out)
        out, ok = sb.ctl("replicas nosuch 3")
        assert.is_false(ok)
        assert.matches("DEPLOYMENT: backend", out)
    end)
end)
