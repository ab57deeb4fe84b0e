-- runbooks/outage-recovery.lua against the sandbox: a real outage (a release
-- that crash-loops, an image that cannot be pulled) is injected with the
-- stand-in's faults, the runbook runs as an operator runs it, and the result
-- is checked with curl against the Kubernetes API.
local cli = require("spec.support.cli")
local backends = require("spec.support.backends")
local sb = require("spec.sandbox.sandbox_helper")
local kh = require("spec.runbooks.k8s_helper")

local RUNBOOK = "runbooks/outage-recovery.lua"

local function effects(events, op)
  local out = {}
  for _, e in ipairs(cli.only(events, "effect")) do
    if e.op == op then out[#out + 1] = e.target:match("[^/]+$") end
  end
  table.sort(out)
  return out
end

describe("outage-recovery", function()
  setup(kh.reset_world)
  after_each(function()
    kh.reset_world()
    cli.cleanup()
  end)

  it("restarts what is unhealthy, rolls back the recent changes that still fail, and verifies /health", function()
    kh.release("backend", "v1.5.0")
    sb.ctl("k8s crashloop backend")          -- the new release crashes
    sb.ctl("k8s bad-image notification")     -- and someone pushed an image that does not exist
    kh.wait_waiting("backend", "CrashLoopBackOff")
    kh.wait_waiting("notification", "ImagePullBackOff")
    assert.are.equal(503, kh.health("backend", 8000))

    local r = cli.run { "run", RUNBOOK, "--yes", "--output", "json", "-p", "settle=20s", "-p", "error_rate_window=10s", "-p", "error_rate_hold=2s" }
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    local events = cli.events(r.stdout)
    -- only the crash-looping deployment is restarted (a restart cannot pull a missing image)
    assert.are.same({ "todo-chatbot-backend" }, effects(events, "rollout_restart"))
    assert.are.same({ "todo-chatbot-backend", "todo-chatbot-notification" }, effects(events, "rollout_undo"))

    -- checked independently: the previous images serve again, and /health answers
    assert.are.equal("v1.4.0", kh.tag("backend"))
    assert.are.equal("v1.4.0", kh.tag("notification"))
    assert.truthy(kh.wait_rolled_out("backend"))
    assert.truthy(kh.wait_rolled_out("notification"))
    assert.is_nil(kh.waiting("backend"))
    assert.are.equal(200, kh.health("backend", 8000))
    assert.are.equal(200, kh.health("notification", 8003))
    assert.matches("runbook report %d+T%d+Z%-%x+", r.stdout)
  end)

  it("rolls a Helm release back as helm rollback does when its recent upgrade is what fails", function()
    sb.ctl("k8s helm-upgrade backend v1.5.0")  -- helm upgrade --set backend.image.tag=v1.5.0: revision 4
    sb.ctl("k8s crashloop backend")
    kh.wait_waiting("backend", "CrashLoopBackOff")
    local r = cli.run { "run", RUNBOOK, "--yes", "--output", "json", "-p", "settle=20s", "-p", "error_rate_window=10s", "-p", "error_rate_hold=2s" }
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    local events = cli.events(r.stdout)
    assert.are.same({}, effects(events, "rollout_undo"))
    assert.are.same({ "sh.helm.release.v1.todo-chatbot.v5" }, effects(events, "create"))
    assert.matches("rolled back: release todo%-chatbot %(revision 4 %-> 3, recorded as 5%)", r.stdout)
    -- kubectl: revision 3's image again, and the records as helm rollback leaves them
    assert.are.equal("v1.4.0", kh.tag("backend"))
    local labels = sb.kubectl("-n todo-chatbot get secrets -l owner=helm,status=deployed -o jsonpath='{.items[*].metadata.name}'")
    assert.are.equal("sh.helm.release.v1.todo-chatbot.v5", labels)
    local rec, ok = sb.sh(("KUBECONFIG=%s kubectl -n todo-chatbot get secret sh.helm.release.v1.todo-chatbot.v5 -o jsonpath='{.data.release}'"
      .. " | base64 -d | base64 -d | gunzip"):format(sb.quote(sb.env("KUBECONFIG"))))
    assert(ok, rec)
    assert.matches('"description":"Rollback to 3"', rec)
    assert.matches('"backend":{"image":{"tag":"v1.4.0"}}', rec)
    assert.truthy(kh.wait_rolled_out("backend"))
    assert.are.equal(200, kh.health("backend", 8000))
  end)

  it("does not roll back a deployment whose last change is old, and fails saying what remains", function()
    sb.ctl("k8s crashloop frontend")          -- its current image has run for two days
    kh.wait_waiting("frontend", "CrashLoopBackOff")
    local r = cli.run { "run", RUNBOOK, "--yes", "-p", "settle=1s", "-p", "error_rate_window=10s", "-p", "error_rate_hold=2s" }
    assert.are.equal(1, r.code, r.stdout .. r.stderr)
    assert.matches("not rolling back todo%-chatbot%-frontend: its last change %(revision 2%) is 2d", r.stdout)
    assert.matches("NOT recovered", r.stdout)
    assert.are.equal("v1.4.0", kh.tag("frontend"))
  end)

  it("does nothing to a healthy namespace, and says so", function()
    local r = cli.run { "run", RUNBOOK, "--yes", "--output", "json", "-p", "error_rate_window=10s", "-p", "error_rate_hold=2s" }
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    local events = cli.events(r.stdout)
    assert.are.same({}, effects(events, "rollout_restart"))
    assert.are.same({}, effects(events, "rollout_undo"))
    assert.matches("nothing is failing: nothing to roll back", r.stdout)
    assert.matches("recovered: all 5 deployments healthy, all 5 services answer", r.stdout)
    assert.is_nil(r.stdout:find("from nil", 1, true), "in-pod checks not asked for are not listed")
  end)

  it("walked with --step: the operator previews the rollback, declines it, and the report says so", function()
    sb.ctl("k8s bad-image notification")
    kh.wait_waiting("notification", "ImagePullBackOff")
    -- assess, dependencies, restart, wait, verify: yes; the rollback: preview, then no; final check, report: yes
    local code, out = cli.pty("y,y,y,y,y,p,n,y,y", { "run", RUNBOOK, "--step", "-p", "settle=1s", "-p", "error_rate_window=10s", "-p", "error_rate_hold=2s" })
    assert.are.equal(1, code, out)
    local preview = out:find("would roll back deployment todo-chatbot-notification to revision", 1, true)
    local declined = out:find("Roll back recent changes that still fail skipped (by the operator)", 1, true)
    assert.truthy(preview and declined and preview < declined, out)
    assert.truthy(out:find("rolled back: none (the operator declined the rollback)", 1, true), out)
    assert.truthy(out:find("NOT recovered in todo-chatbot", 1, true), out)
    assert.are.equal("does-not-exist", kh.tag("notification"))
  end)

  it("changes nothing in a dry run, says what it would do, and checks the dependencies from the app's pod", function()
    sb.ctl("k8s bad-image notification")
    kh.wait_waiting("notification", "ImagePullBackOff")
    sb.sleep(1) -- the stuck rollout's last status write
    local r = backends.assert_unchanged(function()
      return cli.run { "run", RUNBOOK, "--dry-run", "-p", "from_pod=deploy/todo-chatbot-backend" }
    end)
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("would roll back deployment todo%-chatbot%-notification to revision", r.stdout)
    -- the in-pod connectivity check, with the backend's own env, agrees with kubectl exec
    assert.matches("postgres from deploy/todo%-chatbot%-backend: answers", r.stdout)
    assert.matches("redis from deploy/todo%-chatbot%-backend: answers", r.stdout)
    local out, ok = sb.kubectl("-n todo-chatbot exec deploy/todo-chatbot-backend -c backend -- sh -c 'pg_isready -t 5 -d \"$DATABASE_URL\"'")
    assert(ok, out)
    assert.matches("Dry run: NOT recovered", r.stdout)
    assert.are.equal("does-not-exist", kh.tag("notification"))
  end)
end)
