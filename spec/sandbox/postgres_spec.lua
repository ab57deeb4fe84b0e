-- PostgreSQL in the sandbox: the todo schema, its data, roles, and the stop/start fault.
package.path = "spec/sandbox/?.lua;" .. package.path
local sb = require("sandbox_helper")

describe("sandbox PostgreSQL", function()
    it("has a password in DATABASE_URL and listens on loopback", function()
        assert.matches("^postgresql://todo:[^@]+@127%.0%.0%.1:%d+/todo$", sb.env("DATABASE_URL"))
    end)

    local counts = {
        {"users", 50},
        {"tasks", 3000},
        {"audit_log", 6000},
        {"checkpoints", 2000},
    }
    for _, c in ipairs(counts) do
        it("seeds " .. c[1] .. " with " .. c[2] .. " rows", function()
            local out, ok = sb.psql("SELECT count(*) FROM " .. c[1])
            assert.is_true(ok, out)
            assert.equal(c[2], tonumber(out))
        end)
    end

    it("has the task columns the runbooks query", function()
        local out, ok = sb.psql("SELECT count(*) FROM tasks WHERE user_id IS NOT NULL"
            .. " AND due_date IS NOT NULL AND status <> '' AND recurrence <> ''")
        assert.is_true(ok, out)
        assert.equal(3000, tonumber(out))
    end)

    it("numbers audit_log without gaps", function()
        local out = sb.psql("SELECT max(sequence_number) - min(sequence_number) + 1 - count(*) FROM audit_log")
        assert.equal(0, tonumber(out))
    end)

    it("keeps checkpoints older than 30 days for the maintenance runbook", function()
        local out = sb.psql("SELECT count(*) FROM checkpoints WHERE created_at < now() - interval '30 days'")
        assert.is_true(tonumber(out) > 1000, out)
    end)

    it("has a read-only role that cannot write", function()
        local pw = io.open(sb.state .. "/secrets/todo_readonly"):read("l")
        local url = sb.env("DATABASE_URL"):gsub("todo:[^@]+@", "todo_readonly:" .. pw .. "@")
        local out, ok = sb.psql("SELECT count(*) FROM tasks", url)
        assert.is_true(ok, out)
        out, ok = sb.psql("DELETE FROM tasks", url)
        assert.is_false(ok)
        assert.matches("permission denied", out)
    end)

    it("stops and starts with ctl postgres", function()
        assert.is_true(select(2, sb.ctl("postgres stop")))
        local out, ok = sb.psql("SELECT 1")
        assert.is_false(ok, out)
        assert.is_true(select(2, sb.ctl("postgres start")))
        out, ok = sb.psql("SELECT 1")
        assert.is_true(ok, out)
    end)
end)
