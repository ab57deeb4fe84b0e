-- The acceptance of `runbook serve` (issue 25), end to end against the
-- sandbox's real Prometheus and Alertmanager: a release whose version answers
-- 30% of requests with 500 (`ctl metrics errors backend:v1.5.0 30%`) fires
-- HighErrorRate in Prometheus; Alertmanager (`ctl alertmanager webhook`)
-- delivers it to serve; serve plans high-error-rate; a second person approves;
-- apply rolls the release back; the alert resolves. The same rule in run mode
-- rolls back without anyone. curl against the API server, Alertmanager and
-- Prometheus says what happened. Waits are polls with generous deadlines: the
-- alert needs its 30 s rate window and `for: 10s` to fire, and to resolve.
local cli = require("spec.support.cli")
local sb = require("spec.sandbox.sandbox_helper")
local kh = require("spec.runbooks.k8s_helper")
local cjson = require("cjson")

local TOKEN = "serve-e2e-token-8c1d5e7a"
local RUNBOOK = require("lfs").currentdir() .. "/runbooks/high-error-rate.lua"

local RULES = [[
rules:
  - name: backend-errors
    match:
      alertname: HighErrorRate
      labels: {namespace: todo-chatbot, service: backend, severity: critical}
    runbook: %s
    mode: %s
    require_approval: 1
    params:
      service: "{{ labels.service }}"
      namespace: "{{ labels.namespace }}"
      window: 10s
      hold: 4s
      every: 1s
]]

local serve, started

--- Start serve with the rule in `mode`, and point the sandbox's Alertmanager at it.
local function start_serve(mode)
  local dir = cli.tmpdir()
  local rules = cli.write(dir .. "/rules.yml", RULES:format(RUNBOOK, mode))
  local token = cli.write(dir .. "/token", TOKEN .. "\n")
  serve = cli.spawn({ "serve", "--rules", rules, "--listen", "127.0.0.1:" .. cli.free_port(), "--token-file", token },
    { RUNBOOK_USER = "runbook-serve" })
  cli.eventually(function() return cli.slurp(serve.dir .. "/out"):match("127%.0%.0%.1:%d+") end, "serve to listen")
  local url = "http://" .. cli.slurp(serve.dir .. "/out"):match("127%.0%.0%.1:%d+") .. "/v1/alertmanager"
  local out, ok = sb.ctl("alertmanager webhook " .. url .. " " .. token)
  assert(ok, out)
end

local function stop_serve()
  sb.ctl("alertmanager webhook none")
  if serve and serve.pid then os.execute("kill " .. serve.pid) end
  serve = nil
end

--- backend released as v1.5.0, whose image answers 30% of requests with 500.
local function bad_release()
  sb.ctl("metrics errors backend:v1.5.0 30%")
  kh.release("backend", "v1.5.0")
end

local function get_json(url)
  local out = sb.sh("curl -s -m 10 -G " .. url)
  local ok, doc = pcall(cjson.decode, out)
  return ok and doc or nil
end

--- Is HighErrorRate critical for backend firing: in Prometheus, and in Alertmanager?
local function firing()
  local prom, am = false, false
  local p = get_json(sb.quote(sb.env("PROMETHEUS_URL") .. "/api/v1/alerts"))
  for _, a in ipairs(p and p.data and p.data.alerts or {}) do
    local l = a.labels
    prom = prom or (l.alertname == "HighErrorRate" and l.service == "backend" and l.severity == "critical"
      and a.state == "firing")
  end
  local list = get_json(sb.quote(sb.env("ALERTMANAGER_URL") .. "/api/v2/alerts") .. " --data-urlencode "
    .. sb.quote('filter=alertname="HighErrorRate"') .. " --data-urlencode " .. sb.quote('filter=service="backend"')
    .. " --data-urlencode " .. sb.quote('filter=severity="critical"'))
  for _, a in ipairs(list or {}) do am = am or (a.status or {}).state == "active" end
  return prom, am
end

local function wait_resolved()
  assert.truthy(sb.wait_until(240, function()
    local prom, am = firing()
    return not prom and not am
  end), "HighErrorRate still firing 240 s after the fix")
end

--- The id of the plan serve made for the backend-errors rule since the case started.
local function serve_plan()
  local plans = os.getenv("RUNBOOK_STATE_DIR") .. "/plans"
  return sb.wait_until(240, function()
    if not require("lfs").attributes(plans) then return nil end
    for f in require("lfs").dir(plans) do
      if f:match("%.json$") then
        local ok, plan = pcall(cjson.decode, cli.slurp(plans .. "/" .. f))
        if ok and tostring(plan.alert):match("^backend%-errors{") and plan.created_at >= started then return plan.id end
      end
    end
  end)
end

local function serve_log()
  return "serve:\n" .. cli.slurp(serve.dir .. "/err") .. "\nchildren:\n"
    .. sb.sh("tail -n 30 " .. sb.quote(os.getenv("RUNBOOK_STATE_DIR")) .. "/serve/*backend-errors*.log")
end

describe("runbook serve end to end", function()
  setup(kh.reset_world)
  before_each(function()
    -- An alert an earlier spec left firing was notified already, and Alertmanager
    -- would not send it again for its repeat_interval (1h): each case starts resolved.
    sb.metrics_reset()
    wait_resolved()
    started = os.date("!%Y-%m-%dT%H:%M:%SZ")
  end)
  after_each(function()
    stop_serve()
    sb.metrics_reset()
    kh.reset_world()
    cli.cleanup()
  end)

  it("a firing HighErrorRate becomes a plan; a second person approves; apply fixes it; the alert resolves", function()
    start_serve("plan")
    bad_release()
    local id = serve_plan()
    assert.truthy(id, "no plan from the alert within 240 s\n" .. serve_log())
    assert.is_true((firing()))
    assert.are.equal("v1.5.0", kh.tag("backend"))   -- a plan changes nothing
    assert.are.equal(78, cli.run({ "apply", id, "--yes" }, { RUNBOOK_USER = "alice" }).code)
    local r = cli.run({ "approve", id, "--comment", "rollback of v1.5.0" }, { RUNBOOK_USER = "bob" })
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    r = cli.run({ "apply", id, "--yes" }, { RUNBOOK_USER = "alice" })
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("roll back to revision 3", r.stdout)
    assert.are.equal("v1.4.0", kh.tag("backend"))
    wait_resolved()
  end)

  it("the same rule in run mode rolls back without approval, and the alert resolves", function()
    start_serve("run")
    bad_release()
    assert.truthy(sb.wait_until(240, function() return kh.tag("backend") == "v1.4.0" end),
      "serve's run did not roll back within 240 s\n" .. serve_log())
    assert.truthy(sb.wait_until(60, function()
      return sb.sh("grep -l '^ok: ' " .. sb.quote(os.getenv("RUNBOOK_STATE_DIR")) .. "/serve/*backend-errors*.log")
        :find("backend-errors", 1, true)
    end), serve_log())
    wait_resolved()
  end)
end)
