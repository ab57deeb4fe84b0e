-- runbooks/log-search.lua against the sandbox's pods' logs, counted again
-- from kubectl logs read before and after the run; its follow against
-- kubectl logs -f of each pod, run beside it.
local cli = require("spec.support.cli")
local sb = require("spec.sandbox.sandbox_helper")
local cjson = require("cjson")

local RUNBOOK = "runbooks/log-search.lua"
local KUBECTL = "/usr/lib/google-cloud-sdk/bin/kubectl.1.32"
local cache

local function kubectl(args)
  local out, ok = sb.sh(("%s --cache-dir=%s -n todo-chatbot %s"):format(KUBECTL, cache, args))
  assert(ok, args .. ": " .. out)
  return out
end

local function backend_pods()
  local pods = {}
  for pod in kubectl("get pods -l app.kubernetes.io/component=backend -o name"):gmatch("pod/(%S+)") do pods[#pods + 1] = pod end
  return pods
end

-- The backend's pods' records that `pred` keeps (default: ERROR) as kubectl
-- and jq would count them, in the last hour or the last `tail` lines of each pod.
local function count(pred, tail)
  local n = 0
  for _, pod in ipairs(backend_pods()) do
    for line in kubectl(("logs %s -c backend %s"):format(pod, tail and ("--tail=" .. tail) or "--since=1h")):gmatch("[^\n]+") do
      local ok, rec = pcall(cjson.decode, line)
      if ok and type(rec) == "table" and (pred or function(r) return r.level == "ERROR" end)(rec) then n = n + 1 end
    end
  end
  return n
end

local function errors(pred)
  return count(function(rec) return rec.level == "ERROR" and (not pred or pred(rec)) end)
end

-- The matched lines a run printed: "stamp pod line" of each.
local function matched(stdout)
  local out = {}
  for stamp, pod, line in stdout:gmatch("\n    |   (%d%d%d%d%-%S+) (todo%-chatbot%-%S+) ({[^\n]*})") do
    out[#out + 1] = { stamp = stamp, pod = pod, line = line }
  end
  return out
end

describe("log-search", function()
  setup(function() cache = cli.tmpdir() end)
  teardown(cli.cleanup)

  it("finds the errors a fault raised, names their message first, and counts them as kubectl and jq do", function()
    local out, ok = sb.ctl("k8s log-errors backend")
    assert(ok, out)
    finally(function() sb.ctl("k8s reset") end)
    local fault = function(rec) return rec.message == "upstream call failed: connection reset by peer (fault log-errors)" end
    -- pods younger than the fault's 5 minutes have fewer lines: wait for the first of its errors
    local before = sb.wait_until(90, function() local n = errors(fault); return n > 0 and n end)
    assert.truthy(before, "kubectl logs never showed the fault's errors")
    local r = cli.run { "run", RUNBOOK, "-p", "deployment=todo-chatbot-backend", "-p", "level=ERROR", "-p", "since=10m",
      "-p", "pattern=fault log%-errors" }
    local after = errors(fault)
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    local n = tonumber(r.stdout:match("(%d+) of %d+ records match in 2 pod%(s%)"))
    assert.is_true(n ~= nil and n >= before and n <= after, r.stdout)
    assert.matches("top messages:\n%s+| +%d+  upstream call failed: connection reset by peer %(fault log%-errors%)", r.stdout)
  end)

  it("counts a deployment's errors across its pods and names the top message", function()
    local before = errors()
    local r = cli.run { "run", RUNBOOK, "-p", "deployment=todo-chatbot-backend", "-p", "level=ERROR", "-p", "since=1h" }
    local after = errors()
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    local n = tonumber(r.stdout:match("(%d+) of %d+ records match in 2 pod%(s%)"))
    assert.is_true(n ~= nil and n >= before - 1 and n <= after + 1, r.stdout)   -- the logs move on by a line or so
    assert.matches("top messages:\n%s+| +%d+  publish to task%-updates failed: retrying", r.stdout)
  end)

  it("finds one request by its correlation id", function()
    local id
    for line in kubectl("logs deploy/todo-chatbot-backend -c backend --tail=50"):gmatch("[^\n]+") do
      local ok, rec = pcall(cjson.decode, line)
      if ok and type(rec) == "table" and rec.correlation_id and rec.level ~= "ERROR" then id = rec.correlation_id end
    end
    local r = cli.run { "run", RUNBOOK, "-p", "deployment=todo-chatbot-backend", "-p", "correlation_id=" .. id }
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("\n    | 1 of %d+ records match", r.stdout)
    assert.matches('"correlation_id": "' .. id .. '"', r.stdout)
  end)

  it("selects records by any JSON field, as jq select(.user_id == ... and .event_type == ...) does", function()
    local want
    for line in kubectl("logs deploy/todo-chatbot-backend -c backend --tail=200"):gmatch("[^\n]+") do
      local ok, rec = pcall(cjson.decode, line)
      if ok and type(rec) == "table" and rec.event_type then want = rec end
    end
    assert.truthy(want, "no event line in the backend's last 200 lines")
    local pred = function(rec) return rec.user_id == want.user_id and rec.event_type == want.event_type end
    local r = cli.run { "run", RUNBOOK, "-p", "deployment=todo-chatbot-backend",
      "-p", ("where=user_id=%s,event_type=%s"):format(want.user_id, want.event_type) }
    local kubectl_count = count(pred)
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    local n = tonumber(r.stdout:match("(%d+) of %d+ records match in 2 pod%(s%)"))
    -- a matching line is rare: one may come, or leave the hour, between the run and kubectl
    assert.is_true(n ~= nil and n > 0 and math.abs(n - kubectl_count) <= 1, r.stdout)
    for _, m in ipairs(matched(r.stdout)) do
      local rec = cjson.decode(m.line)
      assert.is_true(pred(rec), m.line)
    end
  end)

  it("counts the errors in each pod's last N lines, as kubectl logs --tail=N | jq does", function()
    local r = cli.run { "run", RUNBOOK, "-p", "deployment=todo-chatbot-backend", "-p", "level=ERROR", "-p", "tail=300" }
    local kubectl_count = count(nil, 300)
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    local n, scanned = r.stdout:match("(%d+) of (%d+) records match in 2 pod%(s%)")
    assert.are.equal(600, tonumber(scanned), r.stdout)
    assert.is_true(math.abs(tonumber(n) - kubectl_count) <= 2, r.stdout)   -- the window moves on by a line or so
  end)

  it("follows the pods' logs as kubectl logs -f does, a fault's errors as they come, and stops at max matches", function()
    finally(function() sb.ctl("k8s reset") end)
    -- kubectl logs -f of each pod beside the run, as the independent client
    local dir, pids, pods = cli.tmpdir(), {}, backend_pods()
    for i, pod in ipairs(pods) do
      sb.sh(("sh -c 'echo $$ >%s/%d.pid; exec timeout 60 %s --cache-dir=%s -n todo-chatbot logs -f --tail=0 --timestamps %s -c backend' >%s/%d.log 2>&1 &"):format(
        dir, i, KUBECTL, cache, pod, dir, i))
      pids[i] = sb.wait_until(10, function() return (sb.sh("cat " .. dir .. "/" .. i .. ".pid 2>/dev/null")):match("%d+") end)
    end
    finally(function() for _, pid in ipairs(pids) do sb.sh("kill " .. pid .. " 2>/dev/null") end end)
    local run = cli.spawn { "run", RUNBOOK, "-p", "deployment=todo-chatbot-backend", "-p", "since=1m", "-p", "level=ERROR",
      "-p", "pattern=fault log%-errors", "-p", "follow=50s", "-p", "max=1" }
    assert.truthy(sb.wait_until(20, function() return (sb.sh("cat " .. run.dir .. "/out")):find("following the pods of", 1, true) end))
    local out, ok = sb.ctl("k8s log-errors backend")
    assert(ok, out)
    local code, stdout, stderr = run.wait()
    assert.are.equal(0, code, stdout .. stderr)
    assert.matches("followed 2 pod%(s%) for [%d.ms]+: 1 of %d+ new records match %(max 1 reached%)", stdout)
    local follows = matched(stdout:sub((stdout:find("following the pods of", 1, true))))
    assert.are.equal(1, #follows, stdout)
    for _, m in ipairs(follows) do
      assert.matches("fault log%-errors", m.line)
      -- kubectl -f saw the same line with the same timestamp, in the same pod
      assert.truthy(sb.wait_until(10, function()
        for i, pod in ipairs(pods) do
          if pod == m.pod and (sb.sh("cat " .. dir .. "/" .. i .. ".log")):find(m.stamp .. " " .. m.line, 1, true) then return true end
        end
      end), "kubectl logs -f did not see " .. m.stamp .. " " .. m.line)
    end
  end)

  it("ends a follow at Ctrl-C at once: exit 130, resumable", function()
    local run = cli.spawn { "run", RUNBOOK, "-p", "deployment=todo-chatbot-backend", "-p", "level=NONE", "-p", "follow=5m" }
    assert.truthy(sb.wait_until(20, function() return (sb.sh("cat " .. run.dir .. "/out")):find("following the pods of", 1, true) end))
    local t0 = os.time()
    sb.sh("kill -INT " .. run.pid)
    local code, stdout = run.wait()
    assert.are.equal(130, code, stdout)
    assert.is_true(os.time() - t0 <= 5, "the follow did not stop at Ctrl-C")
    assert.matches("Follow the logs interrupted", stdout)
    assert.matches("runbook resume ", stdout)
  end)

  it("follows in a dry run too, with no effect", function()
    local r = cli.run { "run", RUNBOOK, "--dry-run", "--output", "json", "-p", "deployment=todo-chatbot-backend",
      "-p", "since=1m", "-p", "follow=3s" }
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    local events = cli.events(r.stdout)
    assert.are.same({}, cli.only(events, "effect"))
    local ended = {}
    for _, e in ipairs(cli.only(events, "step_end")) do ended[e.step] = e.status end
    assert.are.same({ ["Search the logs"] = "ok", ["Top messages"] = "ok", ["Follow the logs"] = "ok" }, ended)
  end)

  it("names a where that is not FIELD=VALUE, without a traceback", function()
    local r = cli.run { "run", RUNBOOK, "-p", "deployment=todo-chatbot-backend", "-p", "where=user_id" }
    assert.are.equal(1, r.code)
    assert.matches('param where: "user_id" is not FIELD=VALUE', r.stdout .. r.stderr)
    assert.not_matches("traceback", r.stdout .. r.stderr)
  end)
end)
