-- runbooks/high-error-rate.lua against the sandbox: a bad version's 5xx is
-- fixed by a rollback and a scale-up, verified with Prometheus and kubectl; a
-- database the app's pods cannot reach (their Secret's DATABASE_URL, while
-- this machine's works) stops it before any change; a dry run changes nothing
-- and names the most frequent error messages of the pods' logs with their counts.
local cli = require("spec.support.cli")
local backends = require("spec.support.backends")
local sb = require("spec.sandbox.sandbox_helper")
local kh = require("spec.runbooks.k8s_helper")

local RUNBOOK = "runbooks/high-error-rate.lua"

-- backend released as v1.5.0, whose image answers 30% of requests with 500.
local function bad_release()
  sb.ctl("metrics errors backend:v1.5.0 30%")
  kh.release("backend", "v1.5.0")
  assert(sb.wait_until(30, function()
    for _, sv in ipairs(sb.erroring(0.05)) do if sv == "backend v1.5.0" then return true end end
  end), "the bad release's errors never showed")
end

-- What the bad release logs (the sandbox's log-errors fault).
local INJECTED = "payment gateway refused the charge: card declined (spec)"

-- kubectl logs of the backend's pods over the last 5m: {[message] = count} of ERROR records.
local function error_counts()
  local out, ok = sb.kubectl("logs -n todo-chatbot -l app.kubernetes.io/component=backend -c backend --since=5m --tail=-1")
  assert(ok, out)
  local counts = {}
  for line in out:gmatch("[^\n]+") do
    local okj, rec = pcall(require("cjson").decode, line)
    if okj and type(rec) == "table" and rec.level == "ERROR" then counts[rec.message] = (counts[rec.message] or 0) + 1 end
  end
  return counts
end

-- The runbook's "top error messages" rows, in its order: {{count, message}, ...}.
local function listed(stdout)
  local block = stdout:match("ERROR records in the last 5m across %d+ pod%(s%):\n(.-)\n%s*ok Top error messages") or ""
  local rows = {}
  for n, msg in block:gmatch("(%d+)  ([^\n]+)") do rows[#rows + 1] = { tonumber(n), msg } end
  return rows
end

local function reset()
  sb.metrics_reset()
  kh.reset_world()
  cli.cleanup()
end

describe("high-error-rate", function()
  setup(kh.reset_world)

  it("rolls back a release whose errors began with it, scales up, and verifies the rate stays down", function()
    finally(reset)
    bad_release()
    local r = cli.run { "run", RUNBOOK, "-p", "service=backend", "-p", "window=10s", "-p", "hold=4s", "-p", "every=1s",
      "-p", "replicas=3", "--yes" }
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("postgres from deploy/todo%-chatbot%-backend: answers", r.stdout)
    assert.matches("backend v1.5.0: [%d.]+%%", r.stdout)
    assert.matches("%d+ ERROR records in the last 5m across %d pod%(s%)", r.stdout)
    assert.matches("the errors began with the last change: roll back to revision 3", r.stdout)
    assert.matches("backend error rate < 1%% held for 4s", r.stdout)
    assert.are.equal("v1.4.0", kh.tag("backend"))
    -- kubectl: 3 replicas, all ready, all of the rolled-back version
    local pods = kh.pods("backend")
    assert.are.equal(3, kh.deployment("backend").spec.replicas)
    assert.are.equal(3, #pods)
    for _, p in ipairs(pods) do assert.matches(":v1%.4%.0$", p.spec.containers[1].image) end
    local now = sb.promql('sum(rate(http_requests_total{service="backend",status=~"5.."}[5s])) / sum(rate(http_requests_total{service="backend"}[5s]))')
    assert.is_true(now[1].value < 0.01, "error rate after the rollback: " .. tostring(now[1].value))
  end)

  -- Neither case changes the release: they share it.
  describe("with a bad release out", function()
    setup(bad_release)
    teardown(reset)

    it("changes nothing in a dry run, and lists the top error messages of the logs with their counts", function()
      local out, ok = sb.ctl("k8s log-errors backend " .. sb.quote(INJECTED))
      assert(ok, out)
      -- The release's pods are seconds old: wait until their logs hold injected lines.
      local before = sb.wait_until(60, function()
        local c = error_counts()
        return (c[INJECTED] or 0) >= 2 and c
      end)
      assert(before, "kubectl logs showed no injected error lines within 60s")
      local r = backends.assert_unchanged(function()
        return cli.run { "run", RUNBOOK, "-p", "service=backend", "-p", "window=10s", "-p", "replicas=3", "--dry-run" }
      end)
      local after = error_counts()
      assert.are.equal(0, r.code, r.stdout .. r.stderr)
      -- The release's pods are younger than 5m, so kubectl's counts before and
      -- after the run bound the runbook's: lines are only ever added.
      local rows, seen = listed(r.stdout), false
      for _, row in ipairs(rows) do
        seen = seen or row[2] == INJECTED
        local n, msg = row[1], row[2]
        assert.is_true((before[msg] or 0) <= n and n <= (after[msg] or 0),
          ("%q listed %d times; kubectl counted %d before the run and %d after"):format(msg, n, before[msg] or 0, after[msg] or 0))
      end
      assert.is_true(seen, "the injected error is not among the top messages:\n" .. r.stdout)
      assert.matches("would roll back deployment todo%-chatbot%-backend to revision 3", r.stdout)
      assert.matches("would scale deployment todo%-chatbot%-backend", r.stdout)
      assert.matches("would wait 5m for backend error rate < 1%%: now [%d.]+%% %(would fail now%)", r.stdout)
      assert.are.equal("v1.5.0", kh.tag("backend"))
      assert.are.equal(2, #kh.pods("backend"))
    end)

    it("stops before any change when the app's own pods cannot reach the database", function()
      -- the fault: the Secret the pods read their DATABASE_URL from names a port nothing listens on;
      -- this machine's DATABASE_URL still works
      local url = sb.env("DATABASE_URL"):gsub(":%d+/", ":1/")
      local out, ok = sb.kubectl(("-n todo-chatbot patch secret todo-chatbot-secrets -p %s"):format(sb.quote(
        require("cjson").encode { data = { DATABASE_URL = (sb.sh("printf %s " .. sb.quote(url) .. " | base64 -w0")) } })))
      assert(ok, out)
      out, ok = sb.kubectl("-n todo-chatbot exec deploy/todo-chatbot-backend -c backend -- sh -c 'pg_isready -t 5 -d \"$DATABASE_URL\"'")
      assert.is_false(ok, "kubectl exec pg_isready answered: " .. out)
      local r = cli.run { "run", RUNBOOK, "-p", "service=backend", "-p", "window=10s", "-p", "replicas=3", "--yes" }
      assert.are.equal(1, r.code, r.stdout .. r.stderr)
      assert.matches("dependencies down: postgres from deploy/todo%-chatbot%-backend %(run outage%-recovery", r.stdout .. r.stderr)
      assert.are.equal("v1.5.0", kh.tag("backend"))
      assert.are.equal(2, #kh.pods("backend"))
    end)
  end)
end)
