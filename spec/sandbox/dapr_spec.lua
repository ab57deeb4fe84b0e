-- The Dapr sidecar stand-in, driven with curl and checked against its real
-- backends with kcat (publish) and redis-cli (state): status codes and error
-- bodies as in reference/dapr-api.md, and the `ctl dapr` health fault; the
-- websocket app's WebSocket echo with python3-websockets and curl.
package.path = "spec/sandbox/?.lua;" .. package.path
local sb = require("sandbox_helper")
local cjson = require("cjson")

local JSON = {"Content-Type: application/json"}

local function decode(body)
    local ok, doc = pcall(cjson.decode, body)
    assert(ok, "not JSON: " .. tostring(body))
    return doc
end

-- A Dapr error: the status and {"errorCode", "message"}.
local function assert_error(status, code, got_status, body)
    assert.equal(status, got_status, body)
    local doc = decode(body)
    assert.equal(code, doc.errorCode)
    assert.is_string(doc.message)
    return doc.message
end

local function by(list, field, value)
    for _, item in ipairs(list) do
        if item[field] == value then return item end
    end
end

-- A key no earlier run used, so specs can run again on a long-lived sandbox.
local function fresh_key(name)
    return ("spec-%s-%d-%d"):format(name, os.time(), math.random(1e6))
end

describe("sandbox Dapr sidecar", function()
    it("answers healthz and healthz/outbound with 204", function()
        assert.equal(204, (sb.dapr("GET", "/v1.0/healthz")))
        assert.equal(204, (sb.dapr("GET", "/v1.0/healthz/outbound")))
    end)

    it("describes itself in metadata: components, and seed 000's subscriptions per app", function()
        local status, body = sb.dapr("GET", "/v1.0/metadata")
        assert.equal(200, status)
        local md = decode(body)
        assert.equal("backend", md.id)
        assert.is_string(md.runtimeVersion)
        assert.equal("state.redis", by(md.components, "name", "statestore").type)
        assert.equal("pubsub.kafka", by(md.components, "name", "kafka-pubsub").type)
        assert.same({}, md.subscriptions)   -- the backend publishes, it subscribes to nothing
        local expected = {
            websocket = {"task-events", "task-updates"},
            ["recurring-task"] = {"task-events"},
            notification = {"reminders"},
        }
        for app, topics in pairs(expected) do
            status, body = sb.dapr("GET", "/v1.0/metadata", nil, nil, app)
            assert.equal(200, status)
            md = decode(body)
            assert.equal(app, md.id)   -- one sidecar per app id
            local got = {}
            for _, s in ipairs(md.subscriptions) do
                assert.equal("kafka-pubsub", s.pubsubname)
                got[#got + 1] = s.topic
            end
            assert.same(topics, got)
        end
        local reminders = decode(select(2, sb.dapr("GET", "/v1.0/metadata", nil, nil, "notification")))
        assert.equal("reminders-dlq", reminders.subscriptions[1].deadLetterTopic)
    end)

    it("publishes a CloudEvent that kcat reads from Kafka", function()
        local marker = fresh_key("publish")
        local status, body = sb.dapr("POST", "/v1.0/publish/kafka-pubsub/task-updates?metadata.partitionKey=42",
            cjson.encode({marker = marker}), JSON)
        assert.equal(204, status, body)
        local out = sb.kcat("-C -t task-updates -o -100 -e -q -f '%k\\t%h\\t%s\\n'")
        local key, headers, value = out:match("([^\n]*)\t([^\n]*)\t([^\n]*" .. marker:gsub("%-", "%%-") .. "[^\n]*)")
        assert.is_string(value, "event not found in task-updates")
        assert.equal("42", key)
        assert.matches("content%-type=application/cloudevents%+json", headers)
        local event = decode(value)
        assert.equal("1.0", event.specversion)
        assert.equal("com.dapr.event.sent", event.type)
        assert.equal("backend", event.source)
        assert.equal("task-updates", event.topic)
        assert.equal("kafka-pubsub", event.pubsubname)
        assert.equal("application/json", event.datacontenttype)
        assert.matches("^%x+%-%x+%-%x+%-%x+%-%x+$", event.id)
        assert.equal(marker, event.data.marker)
    end)

    it("answers 404 ERR_PUBSUB_NOT_FOUND for an unknown pubsub", function()
        local status, body = sb.dapr("POST", "/v1.0/publish/no-such-pubsub/task-updates", "{}", JSON)
        assert.matches("no%-such%-pubsub", assert_error(404, "ERR_PUBSUB_NOT_FOUND", status, body))
    end)

    it("round-trips state through Redis in Dapr's layout, with ETags", function()
        local key = fresh_key("state")
        local hash = sb.quote("backend||" .. key)
        finally(function() sb.redis("DEL " .. hash) end)
        local status, body = sb.dapr("POST", "/v1.0/state/statestore",
            cjson.encode({{key = key, value = {title = "first"}}}), JSON)
        assert.equal(204, status, body)
        local head
        status, body, head = sb.dapr("GET", "/v1.0/state/statestore/" .. key)
        assert.equal(200, status)
        assert.equal("first", decode(body).title)
        local etag = head:match("\n[Ee][Tt]ag: (%S+)")
        -- the same value, seen by redis-cli
        assert.equal("first", decode(sb.redis("HGET " .. hash .. " data")).title)
        assert.equal(etag, (sb.redis("HGET " .. hash .. " version"):gsub("%s+$", "")))

        -- a write with the current ETag succeeds and bumps it
        status, body = sb.dapr("POST", "/v1.0/state/statestore",
            cjson.encode({{key = key, value = {title = "second"}, etag = etag}}), JSON)
        assert.equal(204, status, body)
        local new_etag = select(3, sb.dapr("GET", "/v1.0/state/statestore/" .. key)):match("\n[Ee][Tt]ag: (%S+)")
        assert.equal(tonumber(etag) + 1, tonumber(new_etag))

        -- the old ETag is now stale: 409, and Redis keeps the second value
        status, body = sb.dapr("POST", "/v1.0/state/statestore",
            cjson.encode({{key = key, value = {title = "lost"}, etag = etag}}), JSON)
        assert.matches("etag mismatch", assert_error(409, "ERR_STATE_SAVE", status, body))
        status, body = sb.dapr("DELETE", "/v1.0/state/statestore/" .. key, nil, {"If-Match: " .. etag})
        assert_error(409, "ERR_STATE_DELETE", status, body)
        assert.equal("second", decode(sb.redis("HGET " .. hash .. " data")).title)

        -- delete with the current ETag removes the hash; a missing key reads as 204
        status = sb.dapr("DELETE", "/v1.0/state/statestore/" .. key, nil, {"If-Match: " .. new_etag})
        assert.equal(204, status)
        assert.equal("0", (sb.redis("EXISTS " .. hash):gsub("%s+$", "")))
        assert.equal(204, (sb.dapr("GET", "/v1.0/state/statestore/" .. key)))
    end)

    it("reads seeded state in bulk", function()
        local status, body = sb.dapr("POST", "/v1.0/state/statestore/bulk",
            cjson.encode({keys = {"task-1", "task-2", "no-such-key"}}), JSON)
        assert.equal(200, status, body)
        local items = decode(body)
        assert.equal("Task 1", by(items, "key", "task-1").data.title)
        assert.equal("1", by(items, "key", "task-2").etag)
        assert.is_nil(by(items, "key", "no-such-key").data)
    end)

    it("applies a transaction all or nothing", function()
        local a, b = fresh_key("txa"), fresh_key("txb")
        finally(function() sb.redis("DEL " .. sb.quote("backend||" .. a) .. " " .. sb.quote("backend||" .. b)) end)
        local function tx(ops) return sb.dapr("POST", "/v1.0/state/statestore/transaction",
            cjson.encode({operations = ops}), JSON) end
        local status, body = tx({
            {operation = "upsert", request = {key = a, value = 1}},
            {operation = "upsert", request = {key = b, value = 2, etag = "99"}},   -- b does not exist
        })
        assert_error(409, "ERR_STATE_TRANSACTION", status, body)
        assert.equal("0", (sb.redis("EXISTS " .. sb.quote("backend||" .. a)):gsub("%s+$", "")))
        status, body = tx({
            {operation = "upsert", request = {key = a, value = 1}},
            {operation = "upsert", request = {key = b, value = 2}},
        })
        assert.equal(204, status, body)
        assert.equal("2", (sb.redis("HGET " .. sb.quote("backend||" .. b) .. " data"):gsub("%s+$", "")))
    end)

    it("rejects an unknown state store, a malformed ETag and a malformed body", function()
        local status, body = sb.dapr("POST", "/v1.0/state/no-such-store", "[]", JSON)
        assert_error(400, "ERR_STATE_STORE_NOT_FOUND", status, body)
        status, body = sb.dapr("POST", "/v1.0/state/statestore",
            cjson.encode({{key = "k", value = 1, etag = "not-a-version"}}), JSON)
        assert_error(400, "ERR_STATE_SAVE", status, body)
        status, body = sb.dapr("POST", "/v1.0/state/statestore", "not json", JSON)
        assert_error(400, "ERR_MALFORMED_REQUEST", status, body)
    end)

    it("serves secrets from its local file store", function()
        local status, body = sb.dapr("GET", "/v1.0/secrets/local-secret-store/redis-secrets")
        assert.equal(200, status)
        local password = sb.env("REDIS_URL"):match("^redis://[^:]*:([^@]+)@")
        assert.is_true(decode(body).password == password, "the secret is not REDIS_URL's password")
        status, body = sb.dapr("GET", "/v1.0/secrets/local-secret-store/no-such-secret")
        assert_error(500, "ERR_SECRET_GET", status, body)
    end)

    it("invokes another app's health endpoint, and 404s an unknown app", function()
        local status, body = sb.dapr("GET", "/v1.0/invoke/websocket/method/health")
        assert.equal(200, status)
        assert.equal("websocket", decode(body).service)
        status, body = sb.dapr("GET", "/v1.0/invoke/no-such-app/method/health")
        assert_error(404, "ERR_DIRECT_INVOKE", status, body)
    end)

    it("turns one sidecar unhealthy and healthy again with ctl dapr", function()
        finally(function() sb.ctl("dapr healthy backend") end)
        assert.is_true(select(2, sb.ctl("dapr unhealthy backend")))
        local status, body = sb.dapr("GET", "/v1.0/healthz")
        assert_error(500, "ERR_HEALTH_NOT_READY", status, body)
        assert.equal(204, (sb.dapr("GET", "/v1.0/healthz", nil, nil, "websocket")))
        assert.is_true(select(2, sb.ctl("dapr healthy backend")))
        assert.equal(204, (sb.dapr("GET", "/v1.0/healthz")))
    end)

    it("serves the websocket app's WebSocket echo, counted on /stats, and refuses upgrades with ctl dapr ws-refuse and ws-stuck", function()
        finally(function() sb.ctl("dapr ws-accept websocket"); sb.ctl("dapr ws-load websocket 0") end)
        local url = sb.env("WEBSOCKET_URL")
        local http_url = url:gsub("^ws:", "http:")
        local function stats()
            local out, ok = sb.sh("curl -s -f -m 5 " .. sb.quote((http_url:gsub("/ws$", "/stats"))))
            assert(ok, out)
            return decode(out)
        end
        local function upgrade()
            return tonumber((sb.sh("curl -s -o /dev/null -w '%{http_code}' -m 5 --http1.1 -H 'Connection: Upgrade'"
                .. " -H 'Upgrade: websocket' -H 'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==' -H 'Sec-WebSocket-Version: 13' "
                .. sb.quote(http_url))))
        end
        local before = stats().messages_received
        -- Debian's python3, which python3-websockets is installed for
        local out, ok = sb.sh("/usr/bin/python3 -c " .. sb.quote([[
import asyncio, sys, websockets
async def main():
    async with websockets.connect(sys.argv[1], subprotocols=["chat"]) as ws:
        await ws.send("one")
        await ws.send(b"two")
        print(await ws.recv(), await ws.recv(), ws.subprotocol)
        await (await ws.ping())
asyncio.run(asyncio.wait_for(main(), 10))]]) .. " " .. sb.quote(url))
        assert(ok, out)
        assert.equal("one b'two' chat\n", out)
        assert.equal(before + 2, stats().messages_received)
        assert.equal(426, (tonumber((sb.sh("curl -s -o /dev/null -w '%{http_code}' -m 5 " .. sb.quote(http_url))))))
        assert.equal(101, upgrade())
        assert.is_true(select(2, sb.ctl("dapr ws-refuse websocket")))
        assert.equal(503, upgrade())
        assert.is_true(select(2, sb.ctl("dapr ws-accept websocket")))
        assert.equal(101, upgrade())
        -- ws-stuck refuses as ws-refuse does (the websocket-triage spec heals it with a rollout restart)
        assert.is_true(select(2, sb.ctl("dapr ws-stuck websocket")))
        assert.equal(503, upgrade())
        assert.is_true(select(2, sb.ctl("dapr ws-accept websocket")))
        assert.equal(101, upgrade())
        local open = stats().connections
        assert.is_true(select(2, sb.ctl("dapr ws-load websocket 7")))
        assert.equal(open + 7, stats().connections)
        assert.is_true(select(2, sb.ctl("dapr ws-load websocket 0")))
        assert.equal(open, stats().connections)
    end)

    it("reports its outbound side unhealthy and state errors while Redis is down", function()
        finally(function() sb.ctl("redis start") end)
        assert.is_true(select(2, sb.ctl("redis stop")))
        local status, body = sb.dapr("GET", "/v1.0/healthz/outbound")
        assert_error(500, "ERR_HEALTH_NOT_READY", status, body)
        status, body = sb.dapr("GET", "/v1.0/state/statestore/task-1")
        assert_error(500, "ERR_STATE_GET", status, body)
        assert.is_true(select(2, sb.ctl("redis start")))
        assert.equal(204, (sb.dapr("GET", "/v1.0/healthz/outbound")))
        assert.equal(200, (sb.dapr("GET", "/v1.0/state/statestore/task-1")))
    end)
end)
