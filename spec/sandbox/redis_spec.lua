-- Redis in the sandbox: Dapr's state layout and the stop/start fault.
package.path = "spec/sandbox/?.lua;" .. package.path
local sb = require("sandbox_helper")
local cjson = require("cjson")

describe("sandbox Redis", function()
    it("requires the password in REDIS_URL", function()
        assert.matches("^redis://default:[^@]+@127%.0%.0%.1:%d+/0$", sb.env("REDIS_URL"))
        local out = sb.sh("redis-cli -p " .. sb.env("REDIS_URL"):match(":(%d+)/") .. " PING")
        assert.matches("NOAUTH", out)
    end)

    it("holds Dapr state as <appid>||<key> hashes with data and version", function()
        local data = sb.redis("HGET 'backend||task-1' data")
        assert.equal("Task 1", cjson.decode(data).title)
        assert.equal("1", (sb.redis("HGET 'backend||task-1' version"):gsub("%s+$", "")))
        local keys = sb.redis("--scan --pattern 'backend||*'")
        assert.is_true(select(2, keys:gsub("\n", "")) >= 20)
    end)

    it("stops and starts with ctl redis", function()
        assert.is_true(select(2, sb.ctl("redis stop")))
        local out, ok = sb.redis("PING")
        assert.is_false(ok and out:match("PONG") ~= nil)
        assert.is_true(select(2, sb.ctl("redis start")))
        assert.matches("PONG", (sb.redis("PING")))
        assert.matches("Task 1", (sb.redis("HGET 'backend||task-1' data")))
    end)
end)
