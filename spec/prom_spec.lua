-- prom: runbooks querying the sandbox's real Prometheus, each answer checked
-- against curl's; every error path; and the metric gate (passing, failing,
-- dry run) with faults from `ctl metrics`.
local cli = require("spec.support.cli")
local sb = require("spec.sandbox.sandbox_helper")
local cjson = require("cjson")

local function runbook(body, args)
  local path = cli.runbook(('name = "prom-spec"\ndescription = "prom spec"\nstep "s" { run = function(ctx)\n%s\nend }\n'):format(body))
  local argv = { "run", path }
  for _, a in ipairs(args or {}) do argv[#argv + 1] = a end
  return cli.run(argv, { PROMETHEUS_URL = sb.env("PROMETHEUS_URL") })
end

-- A runbook that prints its result as JSON on a line of its own.
local function result_of(body)
  local r = runbook(("local out = (function() %s end)()\nio.write('RESULT ', json.encode(out), '\\n')"):format(body))
  assert.are.equal(0, r.code, r.stdout .. r.stderr)
  return cjson.decode((assert(r.stdout:match("RESULT ([^\n]+)"), r.stdout)))
end

local function fails_with(body, code, env)
  local path = cli.runbook(('name = "prom-spec"\ndescription = "prom spec"\nstep "s" { run = function(ctx)\n%s\nend }\n'):format(body))
  local r = cli.run({ "run", path, "--output", "json" }, env or { PROMETHEUS_URL = sb.env("PROMETHEUS_URL") })
  assert.are.equal(1, r.code, r.stdout .. r.stderr)
  assert.matches('"code":"' .. code .. '"', r.stdout, 1, true)
  return r.stdout
end

describe("prom", function()
  after_each(function()
    sb.metrics_reset()
    cli.cleanup()
  end)

  it("query returns the vector curl sees, with labels and numbers", function()
    local q = 'count by (service) (up{job="todo-chatbot"})'
    local function curl()
      local t = {}
      for _, row in ipairs(sb.promql(q)) do t[row.labels.service] = row.value end
      return t
    end
    -- Pods an earlier spec scaled may still come and go: compare while curl's answer holds still.
    local mine, theirs
    assert.truthy(sb.wait_until(60, function()
      local before = curl()
      mine = result_of(("return prom.query(%q)"):format(q))
      theirs = curl()
      for k, v in pairs(before) do if theirs[k] ~= v then return false end end
      for k in pairs(theirs) do if before[k] == nil then return false end end
      return true
    end), "the targets kept changing")
    assert.are.equal(5, #mine)
    for _, row in ipairs(mine) do assert.are.equal(theirs[row.labels.service], row.value) end
  end)

  it("value, query_range, alerts, rules and targets read the API", function()
    local out = result_of([[
      local range = prom.query_range('sum(up{job="todo-chatbot"})', {start = "20s", step = "5s"})
      local names = {}
      for _, g in ipairs(prom.rules()) do for _, r in ipairs(g.rules) do names[r.name or r.alert] = true end end
      local lag
      for _, a in ipairs(prom.alerts()) do if a.labels.alertname == "KafkaConsumerLag" then lag = a.state end end
      return { value = prom.value('count(up{job="todo-chatbot"})'), points = #range[1].values,
        first = range[1].values[1], targets = #prom.targets(), dropped = #prom.targets{state = "dropped"},
        has_error_rule = names.HighErrorRate, lag_alert = lag, at = prom.value("time()", {time = 1700000000}) }
    ]])
    assert.are.equal(sb.promql('count(up{job="todo-chatbot"})')[1].value, out.value)
    assert.is_true(out.points >= 4)
    assert.are.equal("number", type(out.first[1]))
    assert.are.equal(#sb.promql("up"), out.targets)
    assert.are.equal(0, out.dropped)
    assert.is_true(out.has_error_rule)
    assert.is_truthy(out.lag_alert) -- recurring-task-service starts 1560 behind
    assert.are.equal(1700000000, out.at)
  end)

  it("raises no_data for an empty result or a NaN, unless allow_empty", function()
    fails_with('prom.query("nosuch_metric_total")', "no_data")
    fails_with('prom.value("vector(0) / vector(0)")', "no_data")
    fails_with('prom.query_range("nosuch_metric_total", {start = "1m"})', "no_data")
    local out = result_of([[
      return { n = #prom.query("nosuch_metric_total", {allow_empty = true}),
               v = prom.value("nosuch_metric_total", {allow_empty = true}) == nil }
    ]])
    assert.are.same({ n = 0, v = true }, out)
  end)

  it("turns Prometheus's errors into structured errors, and names every other failure", function()
    local out = fails_with('prom.query("sum(")', "bad_data")
    assert.matches("unclosed left parenthesis", out)
    fails_with('prom.value("up")', "ambiguous")
    fails_with('prom.query("up")', "couldnt_connect", { PROMETHEUS_URL = "http://127.0.0.1:1" })
    -- Alertmanager is not Prometheus: its answer is not an API response
    fails_with('prom.query("up")', "404", { PROMETHEUS_URL = sb.env("ALERTMANAGER_URL") })
    local r = cli.run({ "run", cli.runbook('name = "x"\ndescription = "x"\nstep "s" { run = function() prom.query("up") end }\n') },
      { PROMETHEUS_URL = "" })
    assert.are.equal(1, r.code)
    assert.matches("set PROMETHEUS_URL", r.stdout .. r.stderr)
  end)

  it("sends a bearer token or basic auth, which never print", function()
    local dir = cli.tmpdir()
    local pid = sb.sh(("python3 spec/fixtures/http_server.py %s/port >/dev/null 2>&1 & echo $!"):format(dir)):match("%d+")
    finally(function() sb.sh("kill " .. pid) end)
    assert(sb.wait_until(10, function() return cli.slurp(dir .. "/port") ~= "" end))
    local base = "http://127.0.0.1:" .. cli.slurp(dir .. "/port")
    local out = fails_with(([[
      local ok, e = pcall(function() prom.connect{url = %q, token = "tok-s3cret"}:query("up") end)
      log.info("token: %%s", tostring(e))
      prom.connect{url = %q, username = "u", password = "pw-s3cret"}:query("up")
    ]]):format(base .. "/capture/t", base .. "/capture/b"), "bad_response")
    assert.is_nil(out:find("s3cret", 1, true))
    local seen = cjson.decode((sb.sh("curl -s " .. base .. "/requests")))
    assert.are.equal("Bearer tok-s3cret", seen[1].headers.authorization)
    assert.are.equal("Basic " .. require("base64").encode("u:pw-s3cret"), seen[2].headers.authorization)
    assert.matches("^/capture/t/api/v1/query%?query=up", seen[1].path)
  end)
end)

describe("prom.verify (the metric gate)", function()
  local ERRORS = 'sum(service:http_errors:ratio_rate30s{service="frontend"})'

  after_each(function()
    sb.metrics_reset()
    cli.cleanup()
  end)

  it("passes once the condition has held for the whole period", function()
    -- An earlier spec's errors leave the 30 s rate window first.
    assert(sb.wait_until(60, function()
      local v = sb.promql(ERRORS)[1]
      return not v or v.value < 0.05
    end), "the frontend's error rate stayed over 5%")
    local r = runbook(([[prom.verify{name = "error rate", query = %q, below = 0.05, unit = "percent", hold = "3s", every = "1s"}]]):format(ERRORS))
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("error rate < 5%% held for 3s: error rate [%d.]+%%", r.stdout)
  end)

  it("fails as soon as it breaks, naming the value, the threshold and the query", function()
    sb.ctl("metrics errors frontend 50%")
    assert(sb.wait_until(15, function()
      local v = sb.promql(ERRORS)[1]
      return v and v.value > 0.05
    end))
    local t0 = os.time()
    local r = runbook(([[prom.verify{name = "error rate", query = %q, below = 0.05, unit = "percent", hold = "2m", every = "1s"}]]):format(ERRORS))
    assert.are.equal(1, r.code, r.stdout .. r.stderr)
    assert.is_true(os.time() - t0 < 30)
    assert.matches("error rate is [%d.]+%%, not below 5%% %(query: sum%(service:http_errors", r.stdout)
  end)

  it("in a dry run evaluates once against live data and reports", function()
    local r = cli.run({ "run", cli.runbook(([[name = "g"
description = "g"
step "gate" { run = function()
  prom.verify{name = "error rate", query = %q, below = 0.01, unit = "percent", hold = "2m", every = "15s"}
  prom.verify{name = "canary error rate", query = 'sum(service_version:http_errors:ratio_rate30s{version="v9"})', below = 0.01, hold = "1m"}
end }
]]):format(ERRORS)), "--dry-run" }, { PROMETHEUS_URL = sb.env("PROMETHEUS_URL") })
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("would wait 2m for error rate < 1%%: now [%d.]+%%", r.stdout)
    assert.matches("would wait 1m for canary error rate < 0.01: now no data", r.stdout)
  end)

  it("fails on no data after the warmup, and on a bad query at once, even in a dry run", function()
    local out = fails_with('prom.verify{name = "x", query = "nosuch_metric", below = 1, hold = "10s", every = "1s", warmup = "2s"}', "no_data")
    assert.matches("no data yet", out)
    local r = cli.run({ "run", cli.runbook('name = "g"\ndescription = "g"\nstep "s" { run = function() prom.verify{query = "sum(", below = 1} end }\n'),
      "--dry-run" }, { PROMETHEUS_URL = sb.env("PROMETHEUS_URL") })
    assert.are.equal(1, r.code)
    assert.matches("parse error", r.stdout .. r.stderr)
    r = runbook('prom.verify{query = "up", hold = "1s"}')
    assert.are.equal(1, r.code)
    assert.matches("needs exactly one of below= or above=", r.stdout .. r.stderr)
  end)
end)
