-- How `runbook serve` starts a run (issue 25, docs/design.md "runbook serve:
-- the zygote"): whatever the mechanism, a run serve starts is the run
-- `runbook run` starts with the same command line, input and environment.
-- Its journal and output are the CLI's, its exit status is serve's to account
-- for, ps shows its command line, it is serve's child, and it draws its own
-- random numbers. Checked with the file system, /proc, ps and curl.
local cli = require("spec.support.cli")
local cjson = require("cjson")

local TOKEN = "serve-spawn-token-52c0e1f7"
local SECRET = "serve-spawn-secret-9d3a"
local dir, serve, url

--- The runbook: it reports what it sees to `out`, waits for `go` when given, fails when asked.
local PROBE = [[
name = "probe" description = "reports what a run sees"
param "out" {}
param "note" { default = "hello" }
param "go" { default = "" }
param "fail" { default = "no" }
param "api_key" { secret = true, default = "none" }
local drawn_at_load = ("%010d"):format(math.random(1 << 30))   -- one width: the journal says how much was written
step "see" { run = function(ctx)
  log.info("note: %s, key: %s", ctx.params.note, ctx.params.api_key)
  if ctx.params.go ~= "" then
    time.wait_until({ timeout = "60s", every = "100ms", what = "the go file" }, function() return fs.exists(ctx.params.go) end)
  end
  fs.write(ctx.params.out, json.encode { at_load = drawn_at_load, in_step = ("%010d"):format(math.random(1 << 30)),
    user = os.getenv("RUNBOOK_USER") })
  if ctx.params.fail == "yes" then error("asked to fail") end
  return { note = ctx.params.note }
end }
]]

local sh = cli.sh

local curl = cli.curl

local function get(path)
  return curl(cli.quote("-HAuthorization: Bearer " .. TOKEN) .. " " .. cli.quote(url .. path))
end

--- POST /v1/runs of the probe by alice: the answer.
local function start(params)
  local status, body = curl(("%s -X POST %s --data-binary %s"):format(cli.quote("-HAuthorization: Bearer " .. TOKEN),
    cli.quote(url .. "/v1/runs"), cli.quote(cjson.encode { runbook = dir .. "/probe.lua", params = params, by = "alice" })))
  assert.are.equal(202, status, body)
  return cjson.decode(body)
end

--- The run's end as serve accounted for it: its exit status (the events stream's last word).
local function exit_code(run)
  local _, stream = curl(cli.quote("-HAuthorization: Bearer " .. TOKEN) .. " " .. cli.quote(url .. run.events))
  return tonumber(stream:match('event: end\ndata: .-"exit_code":(%d+)'))
end

--- A journal's events with what differs between two runs of one request taken out.
local function journal(run_id)
  local events = {}
  for line in io.lines(os.getenv("RUNBOOK_STATE_DIR") .. "/runs/" .. run_id .. ".jsonl") do
    local e = cjson.decode((line:gsub(run_id:gsub("%p", "%%%0"), "RUN")))
    e.time, e.run_id, e.pid, e.duration = nil, nil, nil, nil
    events[#events + 1] = e
  end
  return events
end

local function new_id(n) return ("20260101T00000%dZ-%08x"):format(n, math.random(0, 0x7fffffff)) end

setup(function()
  dir = cli.tmpdir()
  cli.write(dir .. "/probe.lua", PROBE)
  local rules = cli.write(dir .. "/rules.yml", ([[
rules:
  - name: probe
    match: {alertname: ServeSpawnProbe}
    runbook: %s/probe.lua
    mode: dry-run
runs: [%s/probe.lua]
]]):format(dir, dir))
  serve, url = cli.serve({ "--rules", rules, "--token-file", cli.write(dir .. "/token", TOKEN .. "\n"), "--max-runs", "10" },
    { RUNBOOK_USER = "runbook-serve" })
end)

teardown(function()
  if serve and serve.pid then os.execute("kill " .. serve.pid) end
  cli.cleanup()
end)

describe("a run runbook serve starts", function()
  it("journals and prints what the CLI does for the same command line, input and user", function()
    local params = { out = dir .. "/same", note = "same note", api_key = SECRET }
    local run = start(params)
    assert.truthy(cli.wait_until(60, function() return exit_code(run) end), "the run did not end")
    assert.are.equal(0, exit_code(run))
    -- The CLI, as serve's children are started: params as JSON on stdin (a pipe), a run id, output to a log.
    local id = new_id(1)
    cli.write(dir .. "/params.json", cjson.encode(params))
    local code = os.execute(("cat %s | "):format(dir .. "/params.json") .. cli.command({ "run", dir .. "/probe.lua",
      "--yes", "--run-id", id, "--params-file", "/dev/stdin" }, { RUNBOOK_USER = "alice" })
      .. (" >%s 2>&1"):format(dir .. "/cli.log"))
    assert.is_true(code)
    assert.are.same(journal(id), journal(run.run_id))
    local function output(text, run_id)
      return (text:gsub(run_id:gsub("%p", "%%%0"), "RUN"):gsub("%d+ms", "Nms"):gsub("%(%d+s%)", "(Ns)"))
    end
    assert.are.equal(output(cli.slurp(dir .. "/cli.log"), id), output(cli.slurp(run.log), run.run_id))
    assert.is_nil(cli.slurp(run.log):find(SECRET, 1, true))
    assert.are.equal("alice", cjson.decode(cli.slurp(params.out)).user)
  end)

  it("ends with the CLI's exit status, and serve counts it", function()
    local run = start { out = dir .. "/failed", fail = "yes" }
    assert.truthy(cli.wait_until(60, function() return exit_code(run) end), "the run did not end")
    local r = cli.run { "run", dir .. "/probe.lua", "--yes", "-p", "out=" .. dir .. "/failed-cli", "-p", "fail=yes" }
    assert.are.equal(1, r.code, r.stderr)
    assert.are.equal(r.code, exit_code(run))
    local rb = (dir .. "/probe.lua"):gsub("%p", "%%%0")
    assert.truthy(cli.wait_until(30, function()
      return select(2, curl(cli.quote(url .. "/metrics"))):match('runbook_runs_total{runbook="' .. rb .. '",status="failed"} 1')
    end), "serve did not count the failed run")
  end)

  it("is serve's child, and ps shows its command line, not a secret", function()
    local go = dir .. "/go"
    local run = start { out = dir .. "/child", go = go, api_key = SECRET }
    local pid = cli.wait_until(60, function()
      local ok, events = pcall(journal, run.run_id)
      return ok and events[1] and tonumber(cli.slurp(os.getenv("RUNBOOK_STATE_DIR") .. "/runs/" .. run.run_id .. ".jsonl")
        :match('"pid":(%d+)'))
    end)
    assert.truthy(pid, "no run_start")
    local stat = cli.slurp("/proc/" .. pid .. "/stat")
    assert.are.equal(serve.pid, stat:match("^%d+ %b() %a (%d+)"))
    local args = sh("ps -o args= -p " .. pid)
    assert.truthy(args:find("run " .. dir .. "/probe.lua --yes --run-id " .. run.run_id .. " --params-file /dev/stdin",
      1, true), args)
    assert.is_nil(args:find(SECRET, 1, true))
    cli.write(go, "")
    assert.truthy(cli.wait_until(60, function() return exit_code(run) end), "the run did not end")
  end)

  it("draws its own random numbers, also when started right after another", function()
    local a, b = start { out = dir .. "/random-a" }, start { out = dir .. "/random-b" }
    for _, run in ipairs { a, b } do
      assert.truthy(cli.wait_until(60, function() return exit_code(run) end), "a run did not end")
    end
    local x, y = cjson.decode(cli.slurp(dir .. "/random-a")), cjson.decode(cli.slurp(dir .. "/random-b"))
    assert.are_not.equal(x.at_load, y.at_load)
    assert.are_not.equal(x.in_step, y.in_step)
  end)
end)
