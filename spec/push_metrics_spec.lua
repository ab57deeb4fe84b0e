-- Run metrics pushed to a Pushgateway when a run ends (issue 25): the
-- sandbox's real prometheus-pushgateway, read back with curl on its /metrics,
-- and Prometheus, which scrapes it. Each case runs a runbook of its own name,
-- in a state directory of its own, so the counts start at zero.
package.path = "spec/sandbox/?.lua;" .. package.path
local sb = require("sandbox_helper")
local cli = require("spec.support.cli")

local GATEWAY = sb.env("RUNBOOK_PUSHGATEWAY")   -- the sandbox's (make test clears it for the other specs)

local function runbook(name, fails)
  return cli.runbook(('name = %q\ndescription = "a cron job"\nstep "work" { run = function() %s end }\n'):format(
    name, fails and 'error("the backup failed")' or ""))
end

--- The gateway's samples of `runbook`: {["metric{labels}"] = value}, labels in the order it prints them.
local function pushed(name)
  local samples = {}
  for line in sb.sh("curl -s -m 10 " .. cli.quote(GATEWAY .. "/metrics")):gmatch("[^\n]+") do
    local metric, labels, value = line:match('^(runbook_[%w_]+){(.-)} (%S+)$')
    if metric and labels:find('runbook="' .. name .. '"', 1, true) then
      labels = labels:gsub('instance="",', ""):gsub('job="runbook",', ""):gsub('runbook="[^"]*",?', "")
      samples[metric .. "{" .. labels .. "}"] = tonumber(value)
    end
  end
  return samples
end

local function run(name, args, env)
  local a = { "run", runbook(name, args.fails), "--yes" }
  for _, x in ipairs(args) do a[#a + 1] = x end
  env = env or {}
  env.RUNBOOK_STATE_DIR = env.RUNBOOK_STATE_DIR or args.state
  return cli.run(a, env)
end

teardown(function() cli.cleanup() end)

describe("run metrics pushed to a Pushgateway", function()
  it("counts each run by status, with its duration and last success, under job runbook", function()
    local name, state = "cron-" .. os.time() .. "-a", cli.tmpdir()
    local before = os.time()
    local r = run(name, { "--push-metrics", GATEWAY, state = state }, { RUNBOOK_PUSHGATEWAY = "" })
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    r = run(name, { "--push-metrics", GATEWAY, state = state, fails = true }, { RUNBOOK_PUSHGATEWAY = "" })
    assert.are.equal(1, r.code, r.stdout .. r.stderr)
    local s = pushed(name)
    assert.are.same({ 1, 1, 2, 2 }, { s['runbook_runs_total{status="ok"}'], s['runbook_runs_total{status="failed"}'],
      s["runbook_run_duration_seconds_count{}"], s['runbook_run_duration_seconds_bucket{le="+Inf"}'] })
    local last = s["runbook_last_success_timestamp_seconds{}"]
    assert.truthy(last and last >= before - 1 and last <= os.time() + 1, tostring(last))
  end)

  it("pushes to RUNBOOK_PUSHGATEWAY without the flag; Prometheus scrapes it with the runbook's label", function()
    local name = "cron-" .. os.time() .. "-b"
    local r = run(name, { state = cli.tmpdir() }, { RUNBOOK_PUSHGATEWAY = GATEWAY })
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.are.equal(1, pushed(name)['runbook_runs_total{status="ok"}'])
    local value = sb.wait_until(90, function()
      local out = sb.sh("curl -s -m 10 -G " .. cli.quote(os.getenv("PROMETHEUS_URL") .. "/api/v1/query")
        .. " --data-urlencode " .. cli.quote('query=runbook_runs_total{job="runbook",runbook="' .. name .. '"}'))
      return out:match('"value":%[[%d%.]+,"(%d+)"%]')
    end)
    assert.are.equal("1", value)
  end)

  it("pushes nothing for a dry run", function()
    local name = "cron-" .. os.time() .. "-c"
    local r = run(name, { "--dry-run", "--push-metrics", GATEWAY, state = cli.tmpdir() })
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.are.same({}, pushed(name))
  end)

  it("keeps the run's exit status when the gateway cannot be reached, and says so", function()
    local name = "cron-" .. os.time() .. "-d"
    local r = run(name, { "--push-metrics", "http://127.0.0.1:1", state = cli.tmpdir() })
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.truthy(r.stderr:find("metrics were not pushed to http://127.0.0.1:1", 1, true), r.stderr)
  end)
end)
