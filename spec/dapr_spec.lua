-- dapr: every call against the sandbox's Dapr sidecar stand-in (Redis-backed
-- state, Kafka-backed pub/sub), cross-checked with redis-cli and kcat.
package.path = "spec/sandbox/?.lua;" .. package.path
local sb = require("sandbox_helper")
local dapr = require("dapr")
local host = require("runbook.host")
local cjson = require("cjson")
local cli = require("spec.support.cli")

local function raises(f, ...)
  local ok, err = pcall(f, ...)
  assert.is_false(ok, "expected an error")
  assert.is_table(err, "expected a structured error, got " .. tostring(err))
  assert.are.equal("dapr", err.module)
  return err
end

local function unique(prefix)
  local f = assert(io.open("/dev/urandom", "rb"))
  local b = f:read(6)
  f:close()
  return prefix .. "-" .. b:gsub(".", function(c) return ("%02x"):format(c:byte()) end)
end

local function sidecar(app)
  local f = assert(io.open(sb.state .. "/dapr.json"))
  local doc = cjson.decode(f:read("a"))
  f:close()
  return dapr.connect{ endpoint = doc[app].endpoint, app_id = app }
end

-- The stand-in (Python's http.server) answers some errors without reading
-- the request body, and the unread bytes then corrupt the next request on
-- the kept-alive connection (a real daprd, Go's net/http, discards them).
-- Until the stand-in drains bodies, one throwaway request after such a case
-- makes the stand-in close that connection.
local function after_unread_body(endpoint)
  pcall(require("http").get, (endpoint or sb.env("DAPR_HTTP_ENDPOINT")) .. "/v1.0/healthz")
end

-- Messages on `topic` (the last 300 per partition) whose key is `key`, read with kcat.
local function kafka_values(topic, key)
  local out = sb.kcat("-C -t " .. topic .. " -o -300 -e -q -f '%k\\t%s\\n'")
  local values = {}
  for k, v in out:gmatch("([^\t\n]*)\t([^\n]*)") do
    if k == key then values[#values + 1] = v end
  end
  return values
end

local function redis_field(key, field)
  return (sb.redis(("HGET %s %s"):format(sb.quote("backend||" .. key), field)):gsub("%s+$", ""))
end

describe("dapr.connect", function()
  it("finds the sidecar from DAPR_HTTP_ENDPOINT, else DAPR_HTTP_PORT", function()
    assert.are.equal(sb.env("DAPR_HTTP_ENDPOINT"), dapr.connect().endpoint)
    local rb = cli.runbook([[
name = "who" description = "prints the sidecar's app id"
step "ask" { run = function() return { id = dapr.metadata().id } end }
]])
    local port = sb.env("DAPR_HTTP_PORT")
    local r = cli.run({ "run", rb, "--output", "json" }, { DAPR_HTTP_ENDPOINT = "", DAPR_HTTP_PORT = port })
    assert.are.equal(0, r.code, r.stderr)
    local ends = cli.only(cli.events(r.stdout), "step_end")
    assert.are.equal("backend", ends[1].outputs.id)
    r = cli.run({ "run", rb }, { DAPR_HTTP_ENDPOINT = "", DAPR_HTTP_PORT = "1" })
    assert.are.equal(1, r.code)
    assert.matches("couldnt_connect", r.stdout .. r.stderr)
  end)

  it("sends the API token as dapr-api-token and never prints it", function()
    local dir = cli.tmpdir()
    local server = io.popen(("python3 spec/fixtures/http_server.py %s/port >/dev/null 2>&1 & echo $!;"
      .. " i=0; while [ ! -s %s/port ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done"):format(dir, dir))
    local pid = server:read("l")
    server:close()
    local base = "http://127.0.0.1:" .. cli.slurp(dir .. "/port")
    local c = dapr.connect{ endpoint = base .. "/capture", token = "tok-5ecret-value" }
    assert.is_true(c:healthz())
    local log = require("http").get(base .. "/requests").json
    os.execute("kill " .. pid)
    assert.are.equal("/capture/v1.0/healthz", log[1].path)
    assert.are.equal("tok-5ecret-value", log[1].headers["dapr-api-token"])
    assert.are.equal("***", host.redact("tok-5ecret-value"))
  end)

  it("rejects an endpoint that is not a URL", function()
    assert.has_error(function() dapr.connect{ endpoint = "127.0.0.1:3500" } end)
  end)
end)

describe("dapr health", function()
  after_each(function() sb.ctl("dapr healthy backend") end)

  it("reports a ready sidecar", function()
    assert.is_true(dapr.healthz())
    assert.is_true(dapr.healthz_outbound())
  end)

  it("reports an unhealthy sidecar as false with Dapr's error", function()
    assert.is_true(select(2, sb.ctl("dapr unhealthy backend")))
    local ok, err = dapr.healthz()
    assert.is_false(ok)
    assert.are.same({ "dapr", "ERR_HEALTH_NOT_READY", 500, true }, { err.module, err.code, err.status, err.retryable })
    assert.is_false((dapr.healthz_outbound()))
    -- the other apps' sidecars are not affected
    assert.is_true(sidecar("frontend"):healthz())
    sb.ctl("dapr healthy backend")
    assert.is_true(dapr.healthz())
  end)

  it("reports a sidecar that cannot be reached, and raises for calls to it", function()
    local c = dapr.connect{ endpoint = "http://127.0.0.1:1", timeout = "2s" }
    local ok, err = c:healthz()
    assert.is_false(ok)
    assert.are.same({ "dapr", "couldnt_connect", true }, { err.module, err.code, err.retryable })
    local e = raises(c.metadata, c)
    assert.are.equal("couldnt_connect", e.code)
    assert.matches("127.0.0.1:1", e.message, 1, true)
  end)
end)

describe("dapr.metadata", function()
  it("lists components, subscriptions and the app connection", function()
    local md = sidecar("websocket"):metadata()
    assert.are.equal("websocket", md.id)
    local types = {}
    for _, c in ipairs(md.components) do types[c.name] = c.type end
    assert.are.same({ statestore = "state.redis", ["kafka-pubsub"] = "pubsub.kafka",
      ["local-secret-store"] = "secretstores.local.file" }, types)
    local topics = {}
    for _, s in ipairs(md.subscriptions) do topics[#topics + 1] = s.topic end
    table.sort(topics)
    assert.are.same({ "task-events", "task-updates" }, topics)
    assert.are.equal("http", md.appConnectionProperties.protocol)
  end)
end)

describe("dapr.publish", function()
  it("publishes JSON as a CloudEvent that arrives on Kafka", function()
    local id = unique("evt")
    assert.are.same({ ok = true }, dapr.publish("kafka-pubsub", "task-updates", { id = id, title = "spec" },
      { metadata = { partitionKey = id } }))
    local got = sb.wait_until(20, function() return kafka_values("task-updates", id)[1] end)
    assert.is_string(got, "the event did not arrive on Kafka")
    local ev = cjson.decode(got)
    assert.are.same({ "1.0", "com.dapr.event.sent", "backend", "kafka-pubsub", "task-updates", "application/json" },
      { ev.specversion, ev.type, ev.source, ev.pubsubname, ev.topic, ev.datacontenttype })
    assert.are.same({ id = id, title = "spec" }, ev.data)
  end)

  it("publishes a raw payload as it is", function()
    local id = unique("raw")
    dapr.publish("kafka-pubsub", "task-updates", "plain " .. id, { raw = true, metadata = { partitionKey = id } })
    local got = sb.wait_until(20, function() return kafka_values("task-updates", id)[1] end)
    assert.are.equal("plain " .. id, got)
  end)

  it("raises Dapr's 404 for an unknown pubsub", function()
    local err = raises(dapr.publish, "no-such-pubsub", "task-events", { x = 1 })
    after_unread_body()
    assert.are.same({ "ERR_PUBSUB_NOT_FOUND", 404, false, "publish" }, { err.code, err.status, err.retryable, err.op })
    assert.matches("no-such-pubsub/task-events", err.message, 1, true)
  end)

  it("rejects data that is neither a table nor a string", function()
    assert.has_error(function() dapr.publish("kafka-pubsub", "t", 42) end)
    assert.has_error(function() dapr.publish("", "t", "x") end)
  end)
end)

describe("dapr.state", function()
  local key
  before_each(function() key = unique("spec-key") end)
  after_each(function() sb.redis("DEL " .. sb.quote("backend||" .. key)) end)

  it("answers nil for a missing key (Dapr's 204)", function()
    local value, etag = dapr.state.get("statestore", key)
    assert.is_nil(value)
    assert.is_nil(etag)
  end)

  it("reads the seeded state with its ETag", function()
    local value, etag = dapr.state.get("statestore", "task-1")
    assert.are.equal("Task 1", value.title)
    assert.are.equal(redis_field("task-1", "version"), etag)
  end)

  it("saves, reads back and deletes, in Dapr's Redis layout", function()
    assert.are.same({ ok = true }, dapr.state.save("statestore", key, { n = 1, tags = { "a" } }))
    local value, etag = dapr.state.get("statestore", key)
    assert.are.same({ n = 1, tags = { "a" } }, value)
    assert.are.equal("1", etag)
    assert.are.same({ n = 1, tags = { "a" } }, cjson.decode(redis_field(key, "data")))
    dapr.state.save("statestore", key, "a string")
    assert.are.same({ "a string", "2" }, { dapr.state.get("statestore", key) })
    assert.are.same({ ok = true }, dapr.state.delete("statestore", key))
    assert.is_nil((dapr.state.get("statestore", key)))
    assert.are.equal("0", (sb.redis("EXISTS " .. sb.quote("backend||" .. key)):gsub("%s+$", "")))
  end)

  it("raises a conflict on an ETag mismatch, and saves with the right one", function()
    dapr.state.save("statestore", key, { v = 1 })
    local _, etag = dapr.state.get("statestore", key)
    dapr.state.save("statestore", key, { v = 2 }, { etag = etag })
    local err = raises(dapr.state.save, "statestore", key, { v = 3 }, { etag = etag })
    assert.are.same({ "conflict", 409, "ERR_STATE_SAVE", true }, { err.code, err.status, err.dapr_code, err.retryable })
    assert.matches("statestore/" .. key, err.message, 1, true)
    assert.are.same({ v = 2 }, (dapr.state.get("statestore", key)))
    err = raises(dapr.state.delete, "statestore", key, { etag = etag })
    assert.are.same({ "conflict", 409 }, { err.code, err.status })
    local _, now = dapr.state.get("statestore", key)
    dapr.state.delete("statestore", key, { etag = now })
    assert.is_nil((dapr.state.get("statestore", key)))
  end)

  it("refuses first-write without an ETag on an existing key", function()
    dapr.state.save("statestore", key, 1)
    local err = raises(dapr.state.save, "statestore", key, 2, { concurrency = "first-write" })
    assert.are.equal("conflict", err.code)
  end)

  it("raises Dapr's 400 for a malformed ETag and an unknown store", function()
    local err = raises(dapr.state.save, "statestore", key, 1, { etag = "not-a-number" })
    assert.are.same({ "ERR_STATE_SAVE", 400, false }, { err.code, err.status, err.retryable })
    err = raises(dapr.state.get, "no-such-store", key)
    assert.are.same({ "ERR_STATE_STORE_NOT_FOUND", 400 }, { err.code, err.status })
    err = raises(dapr.state.save, "no-such-store", key, 1)
    after_unread_body()
    assert.are.equal("ERR_STATE_STORE_NOT_FOUND", err.code)
  end)

  it("saves several items at once and sets a TTL", function()
    local other = key .. "-b"
    dapr.state.save("statestore", { { key = key, value = "one", ttl = "1h" }, { key = other, value = "two" } })
    local ttl = tonumber((sb.redis("TTL " .. sb.quote("backend||" .. key))))
    assert.is_true(ttl > 3500 and ttl <= 3600, "TTL " .. tostring(ttl))
    assert.are.equal("two", (dapr.state.get("statestore", other)))
    sb.redis("DEL " .. sb.quote("backend||" .. other))
  end)

  it("gets keys in bulk, missing ones marked", function()
    dapr.state.save("statestore", key, { v = 1 })
    local got = dapr.state.bulk("statestore", { key, "task-2", key .. "-missing" })
    assert.are.same({ key, true, { v = 1 }, "1" }, { got[1].key, got[1].found, got[1].value, got[1].etag })
    assert.are.equal("Task 2", got[2].value.title)
    assert.are.same({ key .. "-missing", false }, { got[3].key, got[3].found })
    assert.is_nil(got[3].value)
    assert.are.same({}, dapr.state.bulk("statestore", {}))
  end)

  it("applies a transaction all or nothing", function()
    local other = key .. "-t"
    dapr.state.save("statestore", key, "old")
    dapr.state.transaction("statestore", { { op = "upsert", key = other, value = { t = 1 } }, { op = "delete", key = key } })
    assert.are.same({ t = 1 }, (dapr.state.get("statestore", other)))
    assert.is_nil((dapr.state.get("statestore", key)))
    -- a stale ETag fails the whole transaction: the upsert before it does not happen
    local err = raises(dapr.state.transaction, "statestore",
      { { op = "upsert", key = key, value = "new" }, { op = "upsert", key = other, value = 2, etag = "99" } })
    assert.are.same({ "conflict", "ERR_STATE_TRANSACTION" }, { err.code, err.dapr_code })
    assert.is_nil((dapr.state.get("statestore", key)))
    sb.redis("DEL " .. sb.quote("backend||" .. other))
  end)

  it("rejects misuse before sending anything", function()
    assert.has_error(function() dapr.state.get("statestore", "") end)
    assert.has_error(function() dapr.state.save("statestore", key, nil) end)
    assert.has_error(function() dapr.state.save("statestore", key, 1, { concurrency = "whenever" }) end)
    assert.has_error(function() dapr.state.transaction("statestore", { { op = "merge", key = key } }) end)
    assert.has_error(function() dapr.state.bulk("statestore", "task-1") end)
  end)
end)

describe("dapr.invoke", function()
  it("calls another app's method through the sidecar", function()
    local r = dapr.invoke("notification", "health")
    assert.are.same({ 200, "healthy", "notification" }, { r.status, r.json.status, r.json.service })
  end)

  it("raises Dapr's 404 for an unknown app", function()
    local err = raises(dapr.invoke, "no-such-app", "health")
    assert.are.same({ "ERR_DIRECT_INVOKE", 404 }, { err.code, err.status })
  end)

  it("raises with the app's own status when the app fails", function()
    local err = raises(dapr.invoke, "backend", "no/such/route")
    assert.are.same({ "404", 404 }, { err.code, err.status })
  end)
end)

describe("dapr.secret", function()
  it("reads a secret and registers its values", function()
    local s = dapr.secret("local-secret-store", "app-secrets")
    assert.matches("^sk%-sandbox%-", s["openai-api-key"])
    assert.are.equal("key: ***", host.redact("key: " .. s["openai-api-key"]))
    local all = dapr.secret("local-secret-store")
    assert.are.equal("todo", all["database-secrets"].username)
    assert.are.equal("***", host.redact(all["redis-secrets"].password))
  end)

  it("raises Dapr's errors for an unknown secret or store", function()
    assert.are.equal("ERR_SECRET_GET", raises(dapr.secret, "local-secret-store", "nope").code)
    assert.are.equal("ERR_SECRET_STORE_NOT_FOUND", raises(dapr.secret, "vault", "x").code)
  end)
end)

describe("dapr writes and the effect gate", function()
  local effects, key
  before_each(function()
    effects, key = {}, unique("dry-key")
    host.set_effect_sink(function(e) effects[#effects + 1] = e end)
  end)
  after_each(function()
    host.set_mode("run")
    host.set_effect_sink(nil)
    sb.redis("DEL " .. sb.quote("backend||" .. key))
  end)

  it("skips every write in dry-run; reads still run", function()
    host.set_mode("dry-run")
    local id = unique("dry-evt")
    assert.are.same({ skipped = true }, dapr.publish("kafka-pubsub", "task-updates", { id = id },
      { metadata = { partitionKey = id } }))
    assert.are.same({ skipped = true }, dapr.state.save("statestore", key, 1))
    assert.are.same({ skipped = true }, dapr.state.delete("statestore", "task-3"))
    assert.are.same({ skipped = true }, dapr.state.transaction("statestore", { { op = "delete", key = "task-4" } }))
    assert.are.same({ skipped = true }, dapr.invoke("backend", "health", { verb = "POST", json = {} }))
    assert.are.equal("Task 3", dapr.state.get("statestore", "task-3").title)
    assert.are.equal(2, #dapr.state.bulk("statestore", { "task-3", "task-4" }))
    host.set_mode("run")
    assert.are.equal("0", (sb.redis("EXISTS " .. sb.quote("backend||" .. key)):gsub("%s+$", "")))
    assert.are.equal("Task 4", dapr.state.get("statestore", "task-4").title)
    assert.are.same({}, kafka_values("task-updates", id))
    local seen = {}
    for _, e in ipairs(effects) do seen[#seen + 1] = e.module .. " " .. e.op .. " " .. e.decision end
    assert.are.same({ "dapr publish skipped", "dapr state.save skipped", "dapr state.delete skipped",
      "dapr state.transaction skipped", "dapr invoke skipped" }, seen)
    assert.matches("^publish %d+ bytes to kafka%-pubsub/task%-updates$", effects[1].summary)
  end)

  it("records performed writes under the dapr module", function()
    dapr.state.save("statestore", key, 1)
    assert.are.same({ "dapr", "state.save", "statestore/" .. key, "performed", true },
      { effects[1].module, effects[1].op, effects[1].target, effects[1].decision, effects[1].ok })
  end)
end)

describe("dapr.check_app", function()
  local ws = function() return sidecar("websocket") end
  after_each(function() sb.ctl("dapr healthy websocket") end)

  it("passes a correctly wired app", function()
    local rep = ws():check_app("websocket", {
      components = { ["kafka-pubsub"] = "pubsub.kafka", statestore = "state.redis" },
      topics = { "task-events", "kafka-pubsub/task-updates" } })
    assert.are.same({}, rep.problems)
    assert.is_true(rep.ok and rep.healthy and rep.outbound)
    assert.are.same({ "kafka-pubsub/task-events", "kafka-pubsub/task-updates" }, rep.subscriptions)
  end)

  it("names each problem it finds", function()
    sb.ctl("dapr unhealthy websocket")
    local rep = ws():check_app("websocket", {
      components = { ["kafka-pubsub"] = "pubsub.redis", ["missing-store"] = "state.postgresql" },
      topics = { "reminders" } })
    assert.is_false(rep.ok)
    local text = table.concat(rep.problems, "\n")
    for _, want in ipairs { "sidecar not healthy", "ERR_HEALTH_NOT_READY", "component kafka-pubsub is pubsub.kafka, expected pubsub.redis",
      "component missing-store (state.postgresql) is not loaded", "no subscription to reminders" } do
      assert.matches(want, text, 1, true)
    end
  end)

  it("notices a sidecar that belongs to another app", function()
    local rep = ws():check_app("notification")
    assert.is_false(rep.ok)
    assert.matches("belongs to app websocket, not notification", rep.problems[1], 1, true)
  end)

  it("confirms a test publish on Kafka", function()
    -- the test event is keyed by its check id, so kcat finds it among the workload's messages
    local function seen_on(topic)
      return function(ev)
        return sb.wait_until(topic == ev.topic and 20 or 2, function()
          for _, v in ipairs(kafka_values(topic, ev.check_id)) do
            if cjson.decode(v).data.check_id == ev.check_id then return true end
          end
        end)
      end
    end
    local rep = ws():check_app("websocket", { test_publish = { pubsub = "kafka-pubsub", topic = "task-updates",
      confirm = seen_on("task-updates") } })
    assert.are.same({}, rep.problems)
    assert.is_true(rep.publish.published and rep.publish.confirmed)
    rep = ws():check_app("websocket", { test_publish = { pubsub = "kafka-pubsub", topic = "task-updates",
      confirm = seen_on("reminders") } })
    assert.is_false(rep.ok or rep.publish.confirmed)
    assert.matches("published to kafka-pubsub/task-updates but not seen", rep.problems[1], 1, true)
  end)

  it("reports a failed test publish and skips it in dry-run", function()
    local rep = ws():check_app("websocket", { test_publish = { pubsub = "no-such-pubsub", topic = "task-updates" } })
    after_unread_body(ws().endpoint)
    assert.matches("test publish to no%-such%-pubsub/task%-updates failed: .*ERR_PUBSUB_NOT_FOUND", rep.problems[1])
    host.set_mode("dry-run")
    rep = ws():check_app("websocket", { test_publish = { pubsub = "kafka-pubsub", topic = "task-updates",
      confirm = function() error("must not be asked in dry-run") end } })
    host.set_mode("run")
    assert.is_true(rep.ok)
    assert.is_true(rep.publish.skipped)
  end)
end)

describe("dapr.sidecar_status (through the k8s module, against the Kubernetes stand-in)", function()
  local NS = "todo-chatbot"
  local PODS = [[
apiVersion: v1
kind: Pod
metadata:
  name: spec-no-sidecar
  namespace: todo-chatbot
  labels: {spec: sidecar-status}
  annotations: {dapr.io/enabled: "true", dapr.io/app-id: spec-no-sidecar}
spec:
  containers: [{name: app, image: busybox}]
---
apiVersion: v1
kind: Pod
metadata:
  name: spec-sidecar-pull-fails
  namespace: todo-chatbot
  labels: {spec: sidecar-status}
  annotations: {dapr.io/enabled: "true", dapr.io/app-id: spec-pull-fails}
spec:
  containers:
  - {name: app, image: busybox}
  - {name: daprd, image: "docker.io/daprio/daprd:does-not-exist"}
---
apiVersion: v1
kind: Pod
metadata:
  name: spec-not-dapr
  namespace: todo-chatbot
  labels: {spec: sidecar-status}
spec:
  containers: [{name: app, image: busybox}]
]]

  local function kubectl(args) return sb.sh("timeout 20 kubectl " .. args) end

  after_each(function() kubectl("delete pods -n " .. NS .. " -l spec=sidecar-status --wait=false") end)

  it("finds every todo-chatbot pod's daprd injected and ready, as kubectl sees them", function()
    local st = dapr.sidecar_status(NS)
    assert.is_true(st.ok)
    local out, ok = kubectl("get pods -n " .. NS .. [[ -o jsonpath='{range .items[*]}{.metadata.name} {.spec.containers[*].name}{"\n"}{end}']])
    assert.is_true(ok, out)
    local with_daprd = {}
    for name, containers in out:gmatch("(%S+) ([^\n]*)") do
      if (" " .. containers .. " "):find(" daprd ", 1, true) then with_daprd[#with_daprd + 1] = name end
    end
    table.sort(with_daprd)
    local names = {}
    for i, p in ipairs(st.pods) do
      names[i] = p.pod
      assert.is_true(p.injected and p.ready, p.pod)
      assert.is_string(p.app_id)
    end
    assert.is_true(#names >= 5)
    assert.are.same(with_daprd, names)
  end)

  it("reports a pod whose sidecar was not injected and one whose daprd is not ready", function()
    local path = os.tmpname()
    local f = assert(io.open(path, "w"))
    f:write(PODS)
    f:close()
    local out, ok = kubectl("apply -f " .. path)
    os.remove(path)
    assert.is_true(ok, out)
    local st = sb.wait_until(20, function()
      local s = dapr.sidecar_status(NS, { selector = "spec=sidecar-status" })
      local p = s.pods[1]
      if #s.pods == 2 and p and p.pod == "spec-no-sidecar" and s.pods[2].problem then return s end
    end)
    assert.is_table(st, "the stand-in did not report the pods")
    assert.is_false(st.ok)
    local none, fails = st.pods[1], st.pods[2]
    assert.are.same({ "spec-no-sidecar", "spec-no-sidecar", false, false },
      { none.pod, none.app_id, none.injected, none.ready })
    assert.matches("not injected", none.problem, 1, true)
    assert.are.same({ "spec-sidecar-pull-fails", true, false, "daprd is not ready" },
      { fails.pod, fails.injected, fails.ready, fails.problem })
    -- the rest of the namespace is still fine
    local all = dapr.sidecar_status(NS)
    local bad = 0
    for _, p in ipairs(all.pods) do if p.problem then bad = bad + 1 end end
    assert.are.equal(2, bad)
  end)

  it("rejects a missing namespace", function()
    assert.has_error(function() dapr.sidecar_status() end)
  end)
end)
