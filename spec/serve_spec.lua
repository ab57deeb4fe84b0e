-- runbook serve (issue 25): a real Alertmanager (the sandbox's binary, with a
-- webhook receiver pointing at serve and serve's bearer token) delivers an
-- alert; serve makes a plan, a second person approves it, apply scales the
-- deployment (curl against the API server says so); a rule in run mode runs
-- at once. Bad requests and bad rules files are rows of their own.
package.path = "spec/sandbox/?.lua;" .. package.path
local sb = require("sandbox_helper")
local cli = require("spec.support.cli")
local cjson = require("cjson")

local NS, DEPLOY = "plan-spec", "serve-web"
local PATH = "/apis/apps/v1/namespaces/" .. NS .. "/deployments/" .. DEPLOY
local TOKEN = "serve-spec-token-5f1c2a9e"
local FIXTURE = require("lfs").currentdir() .. "/spec/fixtures/plan/add_capacity.lua"

local RULES = ([[
rules:
  - name: capacity-plan
    match:
      alertname: ServeSpecCapacity
      labels: {namespace: plan-spec, deployment: "=~serve%%-.*"}
    runbook: %s
    mode: plan
    require_approval: 1
    params:
      deployment: "{{ labels.deployment }}"
      namespace: "{{ labels.namespace }}"
      reason: "{{ annotations.summary }}"
  - name: capacity-run
    match:
      alertname: ServeSpecRun
    runbook: %s
    mode: run
    params:
      deployment: "{{ labels.deployment }}"
      namespace: "{{ labels.namespace }}"
      reason: "{{ annotations.summary }}"
  - name: capacity-locked
    match:
      alertname: ServeSpecLocked
    runbook: %s
    mode: run
    lock: k8s:plan-spec/serve-spec
    params:
      deployment: "{{ labels.deployment }}"
      namespace: "{{ labels.namespace }}"
      reason: "{{ annotations.summary }}"
      hold: 5s
]]):format(FIXTURE, FIXTURE, FIXTURE)

local function replicas()
  local status, d = sb.k8s("GET", PATH)
  return status == 200 and d.spec.replicas or nil
end

local write = cli.write

local dir, serve, url, am_url, am_pid, serve2

--- curl: returns the HTTP status and the body.
local function curl(args)
  local out = sb.sh("curl -s -m 20 -w '\\n%{http_code}' " .. args)
  local body, status = out:match("^(.*)\n(%d+)%s*$")
  return tonumber(status), body
end

local function post(path, body, token)
  return curl(("%s -X POST %s --data-binary %s"):format(token and sb.quote("-HAuthorization: Bearer " .. token) or "",
    sb.quote(url .. path), sb.quote(body)))
end

local function runbook(args, who) return cli.run(args, { RUNBOOK_USER = who }) end

setup(function()
  dir = cli.tmpdir()
  sb.kubectl("create namespace " .. NS)
  sb.kubectl("-n " .. NS .. " create deployment " .. DEPLOY .. " --image=nginx --replicas=1")
  cli.eventually(function() return replicas() ~= nil end, "the deployment")
  sb.psql("CREATE TABLE IF NOT EXISTS plan_spec (reason text)")
  -- Two replicas of serve with the same rules; Alertmanager sends ServeSpecLocked to both.
  local function start_serve()
    local s = cli.spawn({ "serve", "--rules", write(dir .. "/rules.yml", RULES), "--listen", "127.0.0.1:0",
      "--token-file", write(dir .. "/token", TOKEN .. "\n") }, { RUNBOOK_USER = "runbook-serve" })
    cli.eventually(function() return cli.slurp(s.dir .. "/out"):match("127%.0%.0%.1:%d+") end, "serve to listen")
    return s, "http://" .. cli.slurp(s.dir .. "/out"):match("127%.0%.0%.1:%d+")
  end
  local url2
  serve, url = start_serve()
  serve2, url2 = start_serve()
  local port = cli.free_port()
  am_url = "http://127.0.0.1:" .. port
  local config = write(dir .. "/alertmanager.yml", ([[
route:
  receiver: serve
  group_by: [alertname]
  group_wait: 1s
  group_interval: 5s
  repeat_interval: 1h
  routes:
    - {matchers: ['alertname="ServeSpecLocked"'], receiver: both}
receivers:
  - name: serve
    webhook_configs:
      - {url: %s/v1/alertmanager, http_config: {authorization: {credentials: %s}}}
  - name: both
    webhook_configs:
      - {url: %s/v1/alertmanager, http_config: {authorization: {credentials: %s}}}
      - {url: %s/v1/alertmanager, http_config: {authorization: {credentials: %s}}}
]]):format(url, TOKEN, url, TOKEN, url2, TOKEN))
  os.execute(("prometheus-alertmanager --config.file=%s --storage.path=%s/am --cluster.listen-address= "
    .. "--web.listen-address=127.0.0.1:%s --log.level=warn >%s/am.log 2>&1 & echo $! >%s/am.pid"):format(
    config, dir, port, dir, dir))
  am_pid = cli.slurp(dir .. "/am.pid"):match("%d+")
  sb.wait_until(60, function() return curl(am_url .. "/-/ready") == 200 end)
end)

teardown(function()
  if am_pid then os.execute("kill " .. am_pid) end
  for _, s in ipairs { serve or {}, serve2 or {} } do
    if s.pid then os.execute("kill " .. s.pid) end
  end
  sb.kubectl("-n " .. NS .. " delete deployment " .. DEPLOY)
  cli.cleanup()
end)

before_each(function()
  assert.are.equal(200, (sb.k8s("PATCH", PATH, { spec = { replicas = 1 } })))
end)

--- Fire an alert at Alertmanager, as Prometheus does (POST /api/v2/alerts).
local function fire(alertname, summary)
  local alert = { { labels = { alertname = alertname, namespace = NS, deployment = DEPLOY },
    annotations = { summary = summary } } }
  local status, body = curl(("-X POST -H 'Content-Type: application/json' %s --data-binary %s"):format(
    sb.quote(am_url .. "/api/v2/alerts"), sb.quote(cjson.encode(alert))))
  assert.are.equal(200, status, body)
end

describe("runbook serve", function()
  local BAD = {
    { "no token", function() return post("/v1/alertmanager", "{}") end, 401, "missing or wrong bearer token" },
    { "a wrong token", function() return post("/v1/alertmanager", "{}", "wrong-token-0000000") end, 401, "bearer" },
    { "malformed JSON", function() return post("/v1/alertmanager", "{bad", TOKEN) end, 400, "malformed JSON" },
    { "not a version 4 payload", function() return post("/v1/alertmanager", '{"alerts":[]}', TOKEN) end, 400,
      "version" },
    { "an oversized body", function()
        local big = write(cli.tmpdir() .. "/big", ("a"):rep(1100000))
        return curl(("%s -X POST %s --data-binary @%s"):format(sb.quote("-HAuthorization: Bearer " .. TOKEN),
          sb.quote(url .. "/v1/alertmanager"), sb.quote(big)))
      end, 413, "too large" },
    { "an unknown endpoint", function() return post("/v1/nothing", "{}", TOKEN) end, 404, "no endpoint POST" },
    { "/healthz without a token", function() return curl(url .. "/healthz") end, 200, "ok" },
  }
  for _, row in ipairs(BAD) do
    it("answers " .. row[1] .. " with " .. row[3], function()
      local status, body = row[2]()
      assert.are.equal(row[3], status, body)
      assert.truthy(body:find(row[4], 1, true), body)
      assert.is_nil(body:find(TOKEN, 1, true))
    end)
  end

  local RULE_ERRORS = {
    { "an unknown field", "rules:\n  - name: a\n    mach: {alertname: X}\n    runbook: %s\n",
      ":3: rule 1: unknown field 'mach'" },
    { "an unknown runbook", "rules:\n  - name: a\n    match: {alertname: X}\n    runbook: no-such-runbook\n",
      ":4: rule 1: rule 'a': no runbook named 'no-such-runbook'" },
    { "a bad mode", "rules:\n  - name: a\n    match: {alertname: X}\n    runbook: %s\n  - name: b\n"
      .. "    match: {alertname: Y}\n    runbook: %s\n    mode: fix-it\n", ":8: rule 2: rule 'b': mode must be" },
    { "no rules", "rule: []\n", ":1: expected 'rules:'" },
  }
  for _, row in ipairs(RULE_ERRORS) do
    it("refuses a rules file with " .. row[1] .. ", naming the line", function()
      local path = write(cli.tmpdir() .. "/rules.yml", row[2]:format(FIXTURE, FIXTURE))
      local r = runbook({ "serve", "--rules", path, "--listen", "127.0.0.1:0" })
      assert.are.equal(2, r.code, r.stderr)
      assert.truthy(r.stderr:find(path .. row[3], 1, true), r.stderr)
    end)
  end

  --- The id of the plan whose text holds `summary`, once serve's child wrote it.
  local function plan_for(summary)
    local plans = os.getenv("RUNBOOK_STATE_DIR") .. "/plans"
    local id = sb.wait_until(90, function()
      if not require("lfs").attributes(plans) then return nil end
      for f in require("lfs").dir(plans) do
        if f:match("%.json$") and cli.slurp(plans .. "/" .. f):find(summary, 1, true) then return f:sub(1, -6) end
      end
    end)
    assert.truthy(id, "no plan from the alert: " .. cli.slurp(serve.dir .. "/err"))
    return id
  end

  it("plans from an alert Alertmanager delivers; a second person approves; apply fixes it", function()
    local summary = "capacity low " .. os.time()
    fire("ServeSpecCapacity", summary)
    local id = plan_for(summary)
    assert.are.equal(1, replicas())
    assert.are.equal(78, runbook({ "apply", id }, "alice").code)
    assert.are.equal(0, runbook({ "approve", id }, "bob").code)
    local r = runbook({ "apply", id }, "alice")
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.are.equal(2, replicas())
  end)

  it("cancels a plan still waiting for approval when its alert resolves", function()
    local summary = "resolves " .. os.time()
    local function payload(status)
      return cjson.encode { version = "4", status = status, alerts = { { status = status,
        labels = { alertname = "ServeSpecCapacity", namespace = NS, deployment = DEPLOY, instance = summary },
        annotations = { summary = summary } } } }
    end
    assert.are.equal(200, (post("/v1/alertmanager", payload("firing"), TOKEN)))
    local id = plan_for(summary)
    local status, body = post("/v1/alertmanager", payload("resolved"), TOKEN)
    assert.are.equal(200, status)
    assert.is_true(cjson.decode(body).started[1].cancelled)
    assert.are.equal(0, runbook({ "approve", id }, "bob").code)
    local r = runbook({ "apply", id }, "alice")
    assert.are.equal(77, r.code, r.stdout .. r.stderr)
    assert.truthy(r.stderr:find("resolved at", 1, true), r.stderr)
    assert.are.equal(1, replicas())
  end)

  it("runs a rule in run mode without approval", function()
    fire("ServeSpecRun", "run at once " .. os.time())
    assert.are.equal(2, sb.wait_until(90, function() return replicas() == 2 and 2 end))
  end)

  -- On a fresh Lease both children may read it free and write it at once: the loser's write gets a
  -- 409, and it names the winner ("held by") as when the Lease was already held.
  it("runs an alert two replicas receive once: the rule's Lease lets one run, the other ends locked", function()
    local logs = os.getenv("RUNBOOK_STATE_DIR") .. "/serve"
    local earlier = {}   -- an earlier run of the suite in the same state directory
    for f in require("lfs").dir(logs) do earlier[f] = true end
    local function locked_logs()
      local texts = {}
      for f in require("lfs").dir(logs) do
        if f:match("capacity%-locked%.log$") and not earlier[f] then texts[#texts + 1] = cli.slurp(logs .. "/" .. f) end
      end
      return texts
    end
    fire("ServeSpecLocked", "two replicas " .. os.time())
    -- Both children ended: one ok, one refused the Lease (exit 75).
    local texts = sb.wait_until(120, function()
      local t = locked_logs()
      local all = table.concat(t, "\n")
      return #t == 2 and all:find("\nok: ", 1, true) and all:find("held by", 1, true) and t
    end)
    assert.truthy(texts, table.concat(locked_logs(), "\n----\n") .. "\n---- serve 1:\n" .. cli.slurp(serve.dir .. "/err")
      .. "\n---- serve 2:\n" .. cli.slurp(serve2.dir .. "/err") .. "\n---- alertmanager:\n" .. cli.slurp(dir .. "/am.log"))
    assert.are.equal(2, replicas())
  end)

  it("acts on an alert once within the rule's throttle period, and counts the rest", function()
    local payload = cjson.encode { version = "4", status = "firing", alerts = { { status = "firing",
      labels = { alertname = "ServeSpecCapacity", namespace = NS, deployment = "serve-other" },
      annotations = { summary = "again" } } } }
    local _, first = post("/v1/alertmanager", payload, TOKEN)
    local _, second = post("/v1/alertmanager", payload, TOKEN)
    assert.are.equal(1, #cjson.decode(first).started)
    assert.are.same({}, cjson.decode(second).started)
    local _, metrics = curl(url .. "/metrics")
    assert.matches("runbook_alerts_deduplicated_total [1-9]", metrics)
    assert.matches('runbook_serve_started_total{runbook="[^"]+",mode="plan"} [1-9]', metrics)
  end)
end)
