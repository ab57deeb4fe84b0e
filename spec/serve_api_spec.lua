-- runbook serve's HTTP API (issue 25): POST/GET /v1/runs, a run's journal and
-- its Server-Sent Events, approving and denying plans, /metrics, and the
-- security limits (token, body size, malformed JSON, secrets, TLS, a request
-- sent too slowly). Checked with curl; the runbooks write files, checked with
-- the file system; the sandbox's Prometheus scrapes /metrics.
local cli = require("spec.support.cli")
local cjson = require("cjson")

local TOKEN = "serve-api-token-7d41b0c3"
local SECRET = "hunter2-serve-api-secret"
local dir, serve, url, tls_serve, tls_url

local wait_until = cli.wait_until

local sh = cli.sh

local curl = cli.curl

local function auth(token) return cli.quote("-HAuthorization: Bearer " .. (token or TOKEN)) end

local function get(path, token) return curl(auth(token) .. " " .. cli.quote(url .. path)) end

local function post(path, body, token)
  return curl(("%s -X POST %s --data-binary %s"):format(auth(token), cli.quote(url .. path), cli.quote(body)))
end

--- A runbook that writes `note` to `out` after `go` exists (when given).
local WRITER = [[
name = "writer" description = "writes a note"
param "out" {}
param "note" { default = "hello" }
param "go" { default = "" }
param "api_key" { secret = true, default = "none" }
step "wait" { run = function(ctx)
  if ctx.params.go ~= "" then
    time.wait_until({ timeout = "60s", every = "100ms", what = "the go file" }, function() return fs.exists(ctx.params.go) end)
  end
end }
step "write" { run = function(ctx) fs.write(ctx.params.out, ctx.params.note) end }
]]

local function start_serve(rules, extra)
  local args = { "serve", "--rules", rules, "--listen", "127.0.0.1:0", "--token-file",
    cli.write(dir .. "/token", TOKEN .. "\n") }
  for _, a in ipairs(extra or {}) do args[#args + 1] = a end
  local s = cli.spawn(args, { RUNBOOK_USER = "runbook-serve" })
  local addr = wait_until(60, function() return cli.slurp(s.dir .. "/out"):match("https?://127%.0%.0%.1:%d+") end)
  assert.truthy(addr, "serve did not listen: " .. cli.slurp(s.dir .. "/err"))
  return s, addr
end

setup(function()
  dir = cli.tmpdir()
  local writer = cli.write(dir .. "/writer.lua", WRITER)
  cli.write(dir .. "/other.lua", WRITER)
  local rules = cli.write(dir .. "/rules.yml", ([[
rules:
  - name: plan-only
    match: {alertname: Other}
    runbook: %s/other.lua
    mode: plan
  - name: from-labels
    match: {alertname: ServeApiArgv}
    runbook: %s
    mode: run
    params: {out: "{{ labels.out }}", go: "{{ labels.go }}", api_key: "{{ labels.key }}"}
runs: [%s]
]]):format(dir, writer, writer))
  serve, url = start_serve(rules)
  os.execute(("openssl req -x509 -newkey rsa:2048 -nodes -keyout %s/key.pem -out %s/cert.pem -days 1 "
    .. "-subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1 2>/dev/null"):format(dir, dir))
  tls_serve, tls_url = start_serve(rules, { "--tls-cert", dir .. "/cert.pem", "--tls-key", dir .. "/key.pem",
    "--request-timeout", "2" })
end)

teardown(function()
  for _, s in ipairs { serve or {}, tls_serve or {} } do
    if s.pid then os.execute("kill " .. s.pid) end
  end
  cli.cleanup()
end)

--- POST /v1/runs for the writer: the decoded answer.
local function start_run(params, token)
  params.out = params.out or (dir .. "/out-" .. math.random(1e9))
  local status, body = post("/v1/runs", cjson.encode { runbook = dir .. "/writer.lua", params = params }, token)
  assert.are.equal(202, status, body)
  return cjson.decode(body), params.out
end

describe("runbook serve's API", function()
  it("starts an allow-listed runbook with params, and shows its journal", function()
    local run, out = start_run { note = "from the API" }
    assert.truthy(run.run_id:match("^%d+T%d+Z%-%x+$"), run.run_id)
    assert.are.equal("from the API", wait_until(60, function()
      local text = cli.slurp(out)
      return text ~= "" and text
    end))
    local doc = wait_until(60, function()
      local status, body = get("/v1/runs/" .. run.run_id)
      local d = status == 200 and cjson.decode(body)
      return d and d.run.status == "ok" and d
    end)
    assert.truthy(doc, "the run did not end ok")
    assert.are.equal("run_start", doc.events[1].event)
    assert.are.equal("run_end", doc.events[#doc.events].event)
    local _, body = get("/v1/runs?limit=5")
    local listed = false
    for _, r in ipairs(cjson.decode(body).runs) do listed = listed or r.run_id == run.run_id end
    assert.is_true(listed, body)
  end)

  it("follows a live run with Server-Sent Events to its end", function()
    local go = dir .. "/go-" .. math.random(1e9)
    local run, out = start_run { go = go }
    local stream = dir .. "/stream-" .. run.run_id
    os.execute(("curl -sN -m 120 %s %s >%s 2>&1 &"):format(auth(), cli.quote(url .. run.events), stream))
    -- The stream shows the step waiting before the run can end.
    assert.truthy(wait_until(60, function() return cli.slurp(stream):find('"step":"wait"', 1, true) end),
      cli.slurp(stream))
    assert.is_nil(cli.slurp(stream):find("run_end", 1, true))
    cli.write(go, "")
    local text = wait_until(90, function()
      local t = cli.slurp(stream)
      return t:find("event: end", 1, true) and t
    end)
    assert.truthy(text, cli.slurp(stream))
    assert.truthy(text:find('"event":"run_end"', 1, true))
    assert.truthy(text:find('"exit_code":0', 1, true))
    assert.are.equal("hello", cli.slurp(out))
  end)

  it("counts runs, their durations and last success in /metrics", function()
    local run = start_run {}
    wait_until(60, function() return select(2, get("/v1/runs/" .. run.run_id)):find('"status":"ok"', 1, true) end)
    local rb = (dir .. "/writer.lua"):gsub("%p", "%%%0")
    local metrics = wait_until(60, function()
      local _, m = curl(cli.quote(url .. "/metrics"))
      return m:match('runbook_runs_total{runbook="' .. rb .. '",status="ok"} [1-9]') and m
    end)
    assert.truthy(metrics, "no run counted")
    assert.matches('runbook_run_duration_seconds_count{runbook="' .. rb .. '"} [1-9]', metrics)
    assert.matches('runbook_run_duration_seconds_bucket{runbook="' .. rb .. '",le="%+Inf"} [1-9]', metrics)
    assert.matches('runbook_last_success_timestamp_seconds{runbook="' .. rb .. '"} 1%d+', metrics)
    for _, name in ipairs { "received", "deduplicated", "throttled" } do
      assert.matches("runbook_alerts_" .. name .. "_total %d", metrics)
    end
    assert.matches("runbook_plans_pending_approval %d", metrics)
    if os.execute("command -v promtool >/dev/null") then
      local f = io.popen("promtool check metrics 2>&1", "w")
      f:write(metrics)
      assert.is_true(f:close(), "promtool check metrics failed")
    end
  end)

  --- A plan of the writer by alice, needing one approval: its id and the file apply writes.
  local function alice_plan(note)
    local out = dir .. "/plan-out-" .. math.random(1e9)
    local r = cli.run({ "plan", dir .. "/writer.lua", "-p", "out=" .. out, "-p", "note=" .. note,
      "--require-approval", "1" }, { RUNBOOK_USER = "alice" })
    assert.are.equal(0, r.code, r.stderr)
    return r.stdout:match("plan (%d+T%d+Z%-%x+)"), out
  end

  local function pending()
    local _, m = curl(cli.quote(url .. "/metrics"))
    return tonumber(m:match("runbook_plans_pending_approval (%d+)"))
  end

  it("approves a plan as the identity the request names, never the requester's own", function()
    local before = pending()
    local id, out = alice_plan("approved")
    assert.are.equal(before + 1, pending())
    local status, body = post("/v1/plans/" .. id .. "/approve", '{"by": "alice"}')
    assert.are.equal(403, status)
    assert.truthy(body:find("alice requested plan", 1, true), body)
    assert.are.equal(78, cli.run({ "apply", id, "-p", "api_key=none" }, { RUNBOOK_USER = "alice" }).code)
    status, body = post("/v1/plans/" .. id .. "/approve", '{"by": "bob", "comment": "fine", "expires": "10m"}')
    assert.are.equal(200, status, body)
    local rec = cjson.decode(body)
    assert.are.equal("bob", rec.by)
    assert.truthy(rec.digest:match("^sha256:"))
    assert.are.equal(before, pending())
    local r = cli.run({ "apply", id, "-p", "api_key=none" }, { RUNBOOK_USER = "alice" })
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.are.equal("approved", cli.slurp(out))
  end)

  it("denies a plan: apply refuses it, also once someone else approves", function()
    local id, out = alice_plan("denied")
    local status, body = post("/v1/plans/" .. id .. "/deny", '{"by": "carol", "comment": "not now"}')
    assert.are.equal(200, status, body)
    assert.is_true(cjson.decode(body).denied)
    assert.are.equal(200, (post("/v1/plans/" .. id .. "/approve", '{"by": "bob"}')))
    local r = cli.run({ "apply", id, "-p", "api_key=none" }, { RUNBOOK_USER = "alice" })
    assert.are.equal(78, r.code, r.stdout .. r.stderr)
    assert.truthy(r.stderr:find("denied by carol", 1, true), r.stderr)
    assert.are.equal("", cli.slurp(out))
  end)

  it("answers no secret: a secret param given to a run is in no answer, nor in the run's command line", function()
    local go = dir .. "/go-" .. math.random(1e9)
    local run = start_run { api_key = SECRET, go = go }
    local argv = wait_until(60, function()
      local out = sh("ps -eo args")
      return out:find(run.run_id, 1, true) and out
    end)
    assert.truthy(argv, "the run's process was not seen")
    assert.is_nil(argv:find(SECRET, 1, true))
    cli.write(go, "")
    local body = wait_until(60, function()
      local _, b = get("/v1/runs/" .. run.run_id)
      return b:find('"status":"ok"', 1, true) and b
    end)
    assert.truthy(body, "the run did not end ok")
    assert.is_nil(body:find(SECRET, 1, true))
    local _, stream = curl(auth() .. " " .. cli.quote(url .. run.events))
    assert.truthy(stream:find("event: end", 1, true))
    assert.is_nil(stream:find(SECRET, 1, true))
  end)

  it("puts no param a rule takes from an alert's labels on the run's command line", function()
    local go, out = dir .. "/go-" .. math.random(1e9), dir .. "/out-" .. math.random(1e9)
    local alert = { alertname = "ServeApiArgv", out = out, go = go, key = SECRET }
    local status, body = post("/v1/alertmanager", cjson.encode { version = "4", status = "firing",
      alerts = { { status = "firing", labels = alert, annotations = {} } } })
    assert.are.equal(200, status, body)
    local run_id = cjson.decode(body).started[1].run_id
    local argv = wait_until(60, function()
      local ps = sh("ps -eo args")
      return ps:find(run_id, 1, true) and ps
    end)
    assert.truthy(argv, "the run's process was not seen")
    assert.is_nil(argv:find(SECRET, 1, true))
    cli.write(go, "")
    assert.are.equal("hello", wait_until(60, function()
      local text = cli.slurp(out)
      return text ~= "" and text
    end))
  end)

  local big = nil
  local BAD = {
    { "no token on GET /v1/runs", function() return get("/v1/runs", "") end, 401, "bearer token" },
    { "a wrong token on POST /v1/runs", function() return post("/v1/runs", "{}", "wrong-token-0000000") end, 401,
      "bearer token" },
    { "no token on approve", function() return post("/v1/plans/x/approve", "{}", "") end, 401, "bearer token" },
    { "malformed JSON", function() return post("/v1/runs", "{runbook", TOKEN) end, 400, "malformed JSON" },
    { "no runbook", function() return post("/v1/runs", '{"params": {}}') end, 400, "expected {" },
    { "a runbook not allow-listed", function() return post("/v1/runs", cjson.encode { runbook = dir .. "/other.lua" }) end,
      403, "may not be started here" },
    { "a bad param name", function()
        return post("/v1/runs", cjson.encode { runbook = dir .. "/writer.lua", params = { ["a b"] = 1 } })
      end, 400, "params.a b" },
    { "an unknown run", function() return get("/v1/runs/20200101T000000Z-00000000") end, 404, "no run" },
    { "an unknown run's events", function() return get("/v1/runs/20200101T000000Z-00000000/events") end, 404, "no run" },
    { "an unknown plan", function() return post("/v1/plans/nope/approve", '{"by": "bob"}') end, 404, "no plan" },
    { "approve without by", function() return post("/v1/plans/nope/approve", "{}") end, 400, "by:" },
    { "an oversized body", function()
        big = big or cli.write(dir .. "/big", ("a"):rep(1100000))
        return curl(("%s -X POST %s --data-binary @%s"):format(auth(), cli.quote(url .. "/v1/runs"), big))
      end, 413, "too large" },
  }
  for _, row in ipairs(BAD) do
    it("answers " .. row[1] .. " with " .. row[3], function()
      local status, body = row[2]()
      assert.are.equal(row[3], status, body)
      assert.truthy(body:find(row[4], 1, true), body)
      assert.is_nil(body:find(TOKEN, 1, true))
    end)
  end

  it("is scraped by the sandbox's Prometheus", function()
    package.path = "spec/sandbox/?.lua;" .. package.path
    local sb = require("sandbox_helper")
    local targets = sb.state .. "/prometheus/targets/serve.json"
    cli.write(targets, cjson.encode { { targets = { url:match("//(.*)$") } } })
    local ok, rows = pcall(wait_until, 90, function()
      local r = sb.promql('runbook_plans_pending_approval{job="runbook-serve"}')
      return #r == 1 and r
    end)
    cli.write(targets, "[]")
    assert.is_true(ok, tostring(rows))
    assert.truthy(rows, "Prometheus did not scrape serve within 90 s")
    assert.are.equal(1, sb.promql('up{job="runbook-serve"}')[1].value)
  end)

  it("serves TLS with the certificate given; a client without it refuses", function()
    local status, body = curl(("--cacert %s %s"):format(cli.quote(dir .. "/cert.pem"), cli.quote(tls_url .. "/healthz")))
    assert.are.equal(200, status)
    assert.are.equal("ok\n", body)
    assert.are.equal(0, (curl(cli.quote(tls_url .. "/healthz"))))
    status, body = curl(("--cacert %s %s %s"):format(cli.quote(dir .. "/cert.pem"), auth(),
      cli.quote(tls_url .. "/v1/runs?limit=1")))
    assert.are.equal(200, status, body)
  end)

  it("closes a connection whose request stops coming after --request-timeout", function()
    local t0 = os.time()
    -- The body is announced as 100 bytes and 3 come.
    local status = curl(("--cacert %s %s -H 'Content-Length: 100' -X POST --data-binary abc %s"):format(
      cli.quote(dir .. "/cert.pem"), auth(), cli.quote(tls_url .. "/v1/runs")))
    assert.are.equal(0, status)
    assert.is_true(os.time() - t0 < 25, "took " .. (os.time() - t0) .. " s")
  end)
end)
