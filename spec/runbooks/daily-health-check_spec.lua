-- runbooks/daily-health-check.lua against the sandbox, as cron runs it
-- (--yes --output json): healthy once recurring-task-service has caught up,
-- unhealthy (exit 1, each failing check in its step's outputs) with a
-- crash-looping deployment, Redis down and the WebSocket endpoint refusing
-- upgrades (curl sees the 503); an evicted pod, every namespace and node as
-- kubectl lists and tops them; and it never writes anything.
local cli = require("spec.support.cli")
local backends = require("spec.support.backends")
local sb = require("spec.sandbox.sandbox_helper")
local kh = require("spec.runbooks.k8s_helper")
local cjson = require("cjson")

local RUNBOOK = "runbooks/daily-health-check.lua"

local function outputs(events)
  local out = {}
  for _, e in ipairs(events) do
    if e.event == "step_end" then out[e.step] = e.outputs or { error = e.error } end
  end
  return out
end

-- curl's upgrade request to the sandbox's WebSocket endpoint, as seed 003 sends it: the status.
local function ws_status()
  return tonumber((sb.sh("curl -s -o /dev/null -w '%{http_code}' -m 5 --http1.1 -H 'Connection: Upgrade' -H 'Upgrade: websocket'"
    .. " -H 'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==' -H 'Sec-WebSocket-Version: 13' "
    .. sb.quote(sb.env("WEBSOCKET_URL"):gsub("^ws:", "http:")))))
end

-- kubectl ARGS -o json, decoded.
local function kubectl_json(args)
  local out, ok = sb.kubectl(args .. " -o json")
  assert(ok, out)
  return cjson.decode(out)
end

local function restore()
  sb.ctl("dapr ws-accept websocket")
  sb.ctl("redis start")
  sb.ctl("workload reset")
  sb.kubectl("-n dapr-system scale sts/dapr-placement-server --replicas=1")
  kh.reset_world()
end

describe("daily-health-check", function()
  setup(restore)
  after_each(function()
    restore()
    cli.cleanup()
  end)

  it("is healthy (exit 0) once the lagging consumer has caught up", function()
    local status = sb.k8s("PATCH", "/apis/apps/v1/namespaces/todo-chatbot/deployments/todo-chatbot-recurring-task",
      { spec = { replicas = 12 } })
    assert.are.equal(200, status)
    assert.truthy(sb.wait_until(40, function() return sb.lag("recurring-task-service", "task-events") < 500 end),
      "recurring-task-service did not catch up")
    local r = cli.run { "run", RUNBOOK, "--yes", "--output", "json" }
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    local out = outputs(cli.events(r.stdout))
    assert.is_true(out["Verdict"].healthy)
    assert.are.equal(5, out["Services answer health checks"].services)
    assert.are.same({}, out["Consumer lag"].problems)
    assert.are.equal(101, ws_status())
    assert.is_true(out["WebSocket"].checked)
    assert.are.equal(sb.env("WEBSOCKET_URL"), out["WebSocket"].url)
    assert.are.same({}, out["WebSocket"].problems)
    assert.is_true(out["WebSocket"].pong >= 0)
    assert.are.equal("ok", out["Verdict"].checks["WebSocket"])
  end)

  it("is unhealthy (exit 1) naming a crash-looping deployment, Redis down, the lag and Dapr's placement server at 0", function()
    assert(sb.kubectl("-n dapr-system scale sts/dapr-placement-server --replicas=0"))
    sb.ctl("k8s crashloop websocket")
    kh.wait_waiting("websocket", "CrashLoopBackOff")
    sb.ctl("redis stop")
    sb.ctl("dapr ws-refuse websocket")
    assert.are.equal(503, ws_status())
    local r = cli.run { "run", RUNBOOK, "--yes", "--output", "json" }
    assert.are.equal(1, r.code, r.stdout .. r.stderr)
    local events = cli.events(r.stdout)
    local out = outputs(events)
    -- between its restarts a crash-looping pod is briefly running: the problem names the deployment either way
    assert.matches("deployment todo%-chatbot%-websocket: ", table.concat(out["Deployments and nodes"].problems, "\n"))
    assert.matches("^redis: ", table.concat(out["Dependencies"].problems, "\n"))
    assert.are.same({ "dapr-system: statefulset dapr-placement-server: scaled to 0" }, out["Dapr control plane"].problems)
    assert.matches("recurring%-task%-service is %d+ messages behind", table.concat(out["Consumer lag"].problems, "\n"))
    assert.are.same({ ("WebSocket %s: handshake rejected: HTTP 503"):format(sb.env("WEBSOCKET_URL")) }, out["WebSocket"].problems)
    assert.matches("^UNHEALTHY: %d+ problems", out["Verdict"].error.message)
    assert.are.equal(1, events[#events].exit_code)
  end)

  it("checks every namespace, the nodes' use against what they can allocate, Dapr's control plane, and names an evicted pod", function()
    local out, ok = sb.ctl("k8s evicted backend")
    assert(ok, out)
    local r = cli.run { "run", RUNBOOK, "--yes", "--output", "json", "-p", "namespaces=all" }
    local checks = outputs(cli.events(r.stdout))
    -- kubectl get pods -A --field-selector=status.phase=Failed
    local failed = kubectl_json("get pods -A --field-selector=status.phase=Failed").items
    assert.are.equal(#failed, #checks["Failed and evicted pods"].failed)
    local evicted = checks["Failed and evicted pods"].failed[1]
    assert.are.same({ failed[1].metadata.namespace, failed[1].metadata.name, "Evicted", failed[1].status.message },
      { evicted.namespace, evicted.pod, evicted.reason, evicted.message })
    assert.matches("^pod todo%-chatbot/todo%-chatbot%-backend%-evicted%-%d+ was evicted: The node was low on resource: memory",
      checks["Failed and evicted pods"].warnings[1])
    -- kubectl get deploy -A, get deploy -n dapr-system, top nodes
    local deploys = kubectl_json("get deploy -A").items
    assert.are.equal(#deploys, checks["Deployments and nodes"].deployments)
    local dapr = kubectl_json("get deploy -n dapr-system").items
    assert.is_true(#dapr > 0 and checks["Dapr control plane"].checked)
    local sets = kubectl_json("get statefulsets -n dapr-system").items
    assert.are.equal(#dapr + #sets, checks["Dapr control plane"].workloads)
    local top, top_ok = sb.kubectl("top nodes --no-headers")
    assert(top_ok, top)
    local nodes = checks["Resource use"].nodes
    assert.is_true(#nodes > 0)
    for _, n in ipairs(nodes) do
      local cpu, mem = top:match(n.name:gsub("%p", "%%%0") .. "%s+(%d+)m%s+%d+%%%s+(%d+)Mi")
      assert.are.equal(tonumber(cpu), n.cpu_millicores, top)
      assert.are.equal(tonumber(mem), n.memory_bytes // 1048576, top)
      assert.is_true(n.cpu_share > 0 and n.cpu_share < 1 and n.memory_share > 0 and n.memory_share < 1)
    end
  end)

  it("measures every group the Dapr components give their apps, and mails the lag a burst of events raised", function()
    local dir = cli.tmpdir()
    local port, pid = cli.fixture("smtp_server.py", dir .. "/mailbox.jsonl")
    finally(function() os.execute("kill " .. pid) end)
    -- the groups kubectl's components and deployments name: {appID}-service of each Dapr app
    local want = {}
    for _, d in ipairs(kubectl_json("get deploy -n todo-chatbot").items) do
      local app = (d.spec.template.metadata.annotations or {})["dapr.io/app-id"]
      if app then want[#want + 1] = app .. "-service" end
    end
    table.sort(want)
    -- the fault: 1500 task events at once, more than the consumers take in the run's time
    local out, ok = sb.sh(("seq 1500 | sed 's/.*/{\"event_type\":\"task.created\",\"burst\":&}/' | timeout 30 kcat -P -b %s -t task-events")
      :format(sb.quote(sb.env("KAFKA_BROKERS"))))
    assert(ok, out)
    local TOPICS = { ["recurring-task-service"] = "task-events", ["websocket-service"] = "task-events", ["notification-service"] = "reminders" }
    local list = {}
    for g, t in pairs(TOPICS) do list[#list + 1] = { g, t } end
    local before = sb.lags(list)
    local r = cli.run({ "run", RUNBOOK, "--yes", "--output", "json" },
      { SMTP_URL = "smtp://127.0.0.1:" .. port, ALERT_EMAIL = "ops@example.com" })
    local after = sb.lags(list)
    assert.are.equal(1, r.code, r.stdout .. r.stderr)
    local lag = outputs(cli.events(r.stdout))["Consumer lag"]
    assert.are.same(want, lag.groups)
    for i, gt in ipairs(list) do
      -- kafka-sandbox lag, an independent client, before and after the run
      local lo, hi = math.min(before[i][1], after[i][1]), math.max(before[i][1], after[i][1])
      assert.is_true(lag.lag[gt[1]] >= lo - 100 and lag.lag[gt[1]] <= hi + 100,
        ("%s: %s, kafka-sandbox lag %d .. %d"):format(gt[1], tostring(lag.lag[gt[1]]), lo, hi))
    end
    assert.matches("group recurring%-task%-service is %d+ messages behind", table.concat(lag.problems, "\n"))
    -- the mail, as seed 002's `mail -s "KAFKA LAG ALERT" ops@example.com`
    local first = cli.slurp(dir .. "/mailbox.jsonl"):match("[^\n]+")
    assert.truthy(first, "no mail")
    local mail = cjson.decode(first)
    assert.are.same({ "ops@example.com" }, mail.to)
    assert.matches("Subject: %[runbook%] daily%-health%-check failed", mail.data)
    assert.matches("group recurring%-task%-service is %d+ messages behind", mail.data)
  end)

  it("reviews the error logs, the topics' partitions and leaders and the database's long queries, as kubectl, kcat and psql see them", function()
    -- the faults: half the backend's lines ERROR, a query running long
    local out, ok = sb.ctl("k8s log-errors backend")
    assert(ok, out)
    os.execute(("PGAPPNAME=daily-spec psql -X -q %s -c 'SELECT pg_sleep(40)' >/dev/null 2>&1 &"):format(sb.quote(sb.env("DATABASE_URL"))))
    finally(function() sb.psql("SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE application_name = 'daily-spec'") end)
    local pid = sb.wait_until(20, function()
      return tonumber((sb.psql("SELECT pid FROM pg_stat_activity WHERE application_name = 'daily-spec' AND state = 'active' "
        .. "AND now() - query_start > interval '1 second'")):match("%d+"))
    end)
    assert.truthy(pid, "the long query did not start")
    local r = cli.run { "run", RUNBOOK, "--yes", "--output", "json", "-p", "log_since=5m", "-p", "slow_query=1s" }
    local checks = outputs(cli.events(r.stdout))
    -- psql: the query is active, and named with its pid
    local db = checks["Database performance"]
    assert.matches(("^query %d %%(%%S+, daily%%-spec%%) active for [%%d.]+%%a+: SELECT pg_sleep%%(40%%)"):format(pid),
      table.concat(db.warnings, "\n"))
    assert.is_true(db.cache_hit_ratio > 0 and db.cache_hit_ratio <= 1)
    -- kcat -L: each topic's partitions and the brokers leading them, as the check counted them
    local meta, kok = sb.kcat("-L")
    assert(kok, meta)
    assert.is_true(#checks["Topics"].topics >= 4)
    for _, t in ipairs(checks["Topics"].topics) do
      local leads, n = {}, 0
      local block = meta:match('topic "' .. t.topic:gsub("%p", "%%%0") .. '" with %d+ partitions:\n(.-)\n  topic') or
        meta:match('topic "' .. t.topic:gsub("%p", "%%%0") .. '" with %d+ partitions:\n(.*)$')
      for leader in block:gmatch("leader (%d+),") do
        n = n + 1
        leads[tonumber(leader)] = (leads[tonumber(leader)] or 0) + 1
      end
      assert.are.equal(n, t.partitions, t.topic)
      for id, c in pairs(leads) do assert.are.equal(c, t.leaders[id] or t.leaders[tostring(id)], t.topic .. " broker " .. id) end
    end
    -- kubectl logs --since=5m | jq: the backend's ERROR share, over error_log_warn, with the fault's message
    local errors, total = 0, 0
    for pod in (sb.kubectl("get pods -n todo-chatbot -l app.kubernetes.io/component=backend -o name")):gmatch("pod/(%S+)") do
      for line in (sb.kubectl("logs -n todo-chatbot " .. pod .. " -c backend --since=5m")):gmatch("[^\n]+") do
        total = total + 1
        local dok, rec = pcall(cjson.decode, line)
        if dok and type(rec) == "table" and rec.level == "ERROR" then errors = errors + 1 end
      end
    end
    assert.is_true(errors / total >= 0.2, ("kubectl: %d of %d"):format(errors, total))
    local backend
    for _, row in ipairs(checks["Error logs"].deployments) do if row.deployment == "todo-chatbot-backend" then backend = row end end
    assert.is_true(math.abs(backend.errors - errors) <= 4, ("%d errors, kubectl %d"):format(backend.errors, errors))
    assert.are.equal("upstream call failed: connection reset by peer (fault log-errors)", backend.top_error)
    assert.matches("todo%-chatbot/todo%-chatbot%-backend: %d+%% of its log records are ERROR",
      table.concat(checks["Error logs"].warnings, "\n"))
  end)

  it("measures each pod's log volume with df in the pod, warning from disk_warn", function()
    local r = cli.run { "run", RUNBOOK, "--yes", "--output", "json", "-p", "disk_warn=0" }
    local disk = outputs(cli.events(r.stdout))["Disk use in pods"]
    assert.is_true(disk.pods > 0, r.stdout)
    local found = #disk.warnings + #disk.problems
    assert.are.equal(disk.pods, found)   -- every pod is at least 0% full
    assert.matches("^todo%-chatbot%-[%w-]+: /var/log is %d+%% full", (disk.warnings[1] or disk.problems[1]))
  end)

  it("names the pods whose log volume a fault filled, as df in the pod shows it, and tells to run disk-cleanup", function()
    local out, ok = sb.ctl("k8s disk-full recurring-task 96")
    assert(ok, out)
    local r = cli.run { "run", RUNBOOK, "--yes", "--output", "json" }
    local problems = table.concat(outputs(cli.events(r.stdout))["Disk use in pods"].problems, "\n")
    local n = 0
    for _, p in ipairs(kh.pods("recurring-task")) do
      if p.status.phase == "Running" then
        local df = assert(sb.kubectl("exec -n todo-chatbot " .. p.metadata.name .. " -c recurring-task -- df -Pk /var/log"))
        local use = tonumber(df:match("(%d+)%% /var/log"))
        assert.is_true(use >= 95, df)
        assert.truthy(problems:find(p.metadata.name .. ": /var/log is " .. use .. "% full: run disk-cleanup", 1, true), problems)
        n = n + 1
      end
    end
    assert.is_true(n > 0)
  end)

  it("writes nothing, run for real or dry", function()
    local r1, r2 = backends.assert_unchanged(function()
      return cli.run { "run", RUNBOOK, "--yes" }, cli.run { "run", RUNBOOK, "--dry-run" }
    end)
    -- without an endpoint the WebSocket check is left out, and the verdict says so
    -- nor Dapr's control plane where its namespace has nothing
    local r3 = cli.run({ "run", RUNBOOK, "--yes", "--output", "json", "-p", "dapr_namespace=no-such-namespace" }, { WEBSOCKET_URL = "" })
    local events = cli.events(r3.stdout)
    assert.are.same({}, cli.only(events, "effect"))
    assert.are.same({ checked = false, problems = {}, warnings = {} }, outputs(events)["WebSocket"])
    assert.are.same({ checked = false, problems = {}, warnings = {} }, outputs(events)["Dapr control plane"])
    assert.matches("Dapr's control plane is not installed %(no deployments or statefulsets in namespace no%-such%-namespace%)", r3.stdout)
    assert.matches("Consumer lag", r1.stdout)
    assert.matches("Consumer lag", r2.stdout)
    assert.matches(sb.env("WEBSOCKET_URL"):gsub("%p", "%%%0") .. ": handshake in %d+ms, pong in ", r2.stdout)
  end)
end)
