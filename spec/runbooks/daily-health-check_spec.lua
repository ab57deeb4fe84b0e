-- runbooks/daily-health-check.lua against the sandbox, as cron runs it
-- (--yes --output json): healthy once recurring-task-service has caught up,
-- unhealthy (exit 1, each failing check in its step's outputs) with a
-- crash-looping deployment, Redis down and the WebSocket endpoint refusing
-- upgrades (curl sees the 503); and it never writes anything.
local cli = require "spec.support.cli"
local backends = require "spec.support.backends"
local sb = require "spec.sandbox.sandbox_helper"
local kh = require "spec.runbooks.k8s_helper"

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

local function restore()
  sb.ctl("dapr ws-accept websocket")
  sb.ctl("redis start")
  sb.ctl("workload reset")
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

  it("is unhealthy (exit 1) naming a crash-looping deployment, Redis down and the lag", function()
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
    assert.matches("recurring%-task%-service is %d+ messages behind", table.concat(out["Consumer lag"].problems, "\n"))
    assert.are.same({ ("WebSocket %s: handshake rejected: HTTP 503"):format(sb.env("WEBSOCKET_URL")) }, out["WebSocket"].problems)
    assert.matches("^UNHEALTHY: %d+ problems", out["Verdict"].error.message)
    assert.are.equal(1, events[#events].exit_code)
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
    local r3 = cli.run({ "run", RUNBOOK, "--yes", "--output", "json" }, { WEBSOCKET_URL = "" })
    local events = cli.events(r3.stdout)
    assert.are.same({}, cli.only(events, "effect"))
    assert.are.same({ checked = false, problems = {}, warnings = {} }, outputs(events)["WebSocket"])
    assert.matches("Consumer lag", r1.stdout)
    assert.matches("Consumer lag", r2.stdout)
    assert.matches(sb.env("WEBSOCKET_URL"):gsub("%p", "%%%0") .. ": handshake in %d+ms, pong in ", r2.stdout)
  end)
end)
