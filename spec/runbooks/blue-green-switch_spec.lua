-- runbooks/blue-green-switch.lua against the sandbox: a new color comes up
-- beside the live frontend, passes its smoke test and takes the Ingress, is
-- labelled current, and a later rollback=true switches back; a new color that
-- cannot start, fails its smoke test, or fails while watched never keeps the
-- traffic. Checked with curl against the Kubernetes API.
local cli = require("spec.support.cli")
local backends = require("spec.support.backends")
local sb = require("spec.sandbox.sandbox_helper")
local kh = require("spec.runbooks.k8s_helper")

local RUNBOOK = "runbooks/blue-green-switch.lua"
local NSP = "/apis/networking.k8s.io/v1/namespaces/todo-chatbot/ingresses/todo-chatbot"

-- The Ingress's backend service for a path.
local function backend_of(path)
  local status, ing = sb.k8s("GET", NSP)
  assert(status == 200, tostring(ing))
  for _, p in ipairs(ing.spec.rules[1].http.paths) do
    if p.path == path then return p.backend.service.name end
  end
end

-- The `current` label of a deployment.
local function current(app)
  return (kh.deployment(app).metadata.labels or {}).current
end

-- Runs whose error rate is not the point skip it (no PROMETHEUS_URL): the
-- first switch holds it.
local NO_PROM = { PROMETHEUS_URL = "" }

local function exists(kind, name)
  local path = kind == "deployment" and "/apis/apps/v1/namespaces/todo-chatbot/deployments/" or "/api/v1/namespaces/todo-chatbot/services/"
  return sb.k8s("GET", path .. name) == 200
end

describe("blue-green-switch", function()
  setup(kh.reset_world)
  -- A run that fails undoes itself: the world is reseeded only when a case left it switched.
  after_each(function()
    sb.ctl("k8s reset")
    local switched = backend_of("/") ~= "todo-chatbot-frontend" or exists("deployment", "todo-chatbot-frontend-green")
      or kh.deployment("frontend").spec.replicas ~= 2 or current("frontend") ~= nil
    if switched then kh.reset_world() end
    cli.cleanup()
  end)

  it("brings up green, smoke-tests it, switches, retires blue, labels green current; rollback=true switches back", function()
    local dir = cli.tmpdir()
    local smoke = ('echo "$TARGET_SERVICE" > %s/smoked && kubectl get --raw "$TARGET_PROXY/health" >> %s/smoked'):format(dir, dir)
    local r = cli.run { "run", RUNBOOK, "-p", "from=todo-chatbot-frontend", "-p", "tag=v1.5.0", "-p", "observe=3s",
      "-p", "error_rate_window=5s", "-p", "error_rate_hold=2s", "-p", "smoke_paths=/health", "-p", "smoke=" .. smoke, "--yes" }
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.are.equal("todo-chatbot-frontend-green", backend_of("/"))
    assert.are.equal("todo-chatbot-backend", backend_of("/api"))    -- the other paths stay
    assert.are.equal("v1.5.0", kh.tag("frontend-green"))
    assert.are.equal(2, kh.deployment("frontend-green").status.readyReplicas)
    assert.are.equal(0, kh.deployment("frontend").spec.replicas)
    assert.are.equal(200, sb.k8s("GET", "/api/v1/namespaces/todo-chatbot/services/todo-chatbot-frontend-green:3000/proxy/health"))
    assert.matches('^todo%-chatbot%-frontend%-green\n.*"status": "healthy"', cli.slurp(dir .. "/smoked"))
    assert.are.equal("true", current("frontend-green"))
    assert.are.equal("false", current("frontend"))
    -- later, the rollback: blue back up, the Ingress back to it, green retired, the labels swapped
    r = cli.run({ "run", RUNBOOK, "-p", "from=todo-chatbot-frontend-green", "-p", "rollback=true", "-p", "observe=1s", "--yes" }, NO_PROM)
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.are.equal("todo-chatbot-frontend", backend_of("/"))
    assert.truthy(kh.wait_rolled_out("frontend"))
    assert.are.equal(2, kh.deployment("frontend").status.readyReplicas)
    assert.are.equal(0, kh.deployment("frontend-green").spec.replicas)
    assert.are.equal("true", current("frontend"))
    assert.are.equal("false", current("frontend-green"))
    -- and the next release goes to the green kept at 0
    r = cli.run({ "run", RUNBOOK, "-p", "from=todo-chatbot-frontend", "-p", "tag=v1.6.0", "-p", "observe=1s", "--yes" }, NO_PROM)
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.are.equal("todo-chatbot-frontend-green", backend_of("/"))
    assert.are.equal("v1.6.0", kh.tag("frontend-green"))
    assert.are.equal(0, kh.deployment("frontend").spec.replicas)
    assert.truthy(sb.wait_until(20, function()
      local st = kh.deployment("frontend-green").status or {}
      return st.updatedReplicas == 2 and st.readyReplicas == 2 and st.replicas == 2
    end), "green did not settle at 2 replicas of v1.6.0")
  end)

  it("refuses a rollback when the other color is gone", function()
    local r = cli.run { "run", RUNBOOK, "-p", "from=todo-chatbot-frontend", "-p", "rollback=true", "--yes" }
    assert.are.equal(1, r.code, r.stdout .. r.stderr)
    assert.matches("nothing to switch back to: todo%-chatbot%-frontend%-green", r.stdout .. r.stderr)
    assert.are.equal("todo-chatbot-frontend", backend_of("/"))
  end)

  it("never switches to a color whose image cannot be pulled, and removes it", function()
    local r = cli.run { "run", RUNBOOK, "-p", "from=todo-chatbot-frontend", "-p", "tag=does-not-exist", "--yes" }
    assert.are.equal(1, r.code, r.stdout .. r.stderr)
    assert.matches("ImagePullBackOff", r.stdout .. r.stderr)
    assert.are.equal("todo-chatbot-frontend", backend_of("/"))
    assert.truthy(sb.wait_until(10, function() return not exists("deployment", "todo-chatbot-frontend-green") end))
    assert.is_false(exists("service", "todo-chatbot-frontend-green"))
    assert.are.equal(2, kh.deployment("frontend").spec.replicas)
  end)

  it("never switches to a color whose smoke test fails, and removes it", function()
    local r = cli.run({ "run", RUNBOOK, "-p", "from=todo-chatbot-frontend", "-p", "tag=v1.5.0",
      "-p", 'smoke=kubectl get --raw "$TARGET_PROXY/api/tasks"', "--yes" }, NO_PROM)
    assert.are.equal(1, r.code, r.stdout .. r.stderr)
    assert.matches("smoke test: the command exited with status 1", r.stdout .. r.stderr)
    assert.are.equal("todo-chatbot-frontend", backend_of("/"))
    assert.truthy(sb.wait_until(10, function() return not exists("deployment", "todo-chatbot-frontend-green") end))
    assert.is_false(exists("service", "todo-chatbot-frontend-green"))
    assert.are.equal(2, kh.deployment("frontend").spec.replicas)
    assert.is_nil(current("frontend"))
  end)

  it("switches back when the new color fails while it is watched", function()
    local run = cli.spawn { "run", RUNBOOK, "-p", "from=todo-chatbot-frontend", "-p", "tag=v1.5.0", "-p", "observe=30s", "--yes" }
    assert.truthy(sb.wait_until(30, function() return backend_of("/") == "todo-chatbot-frontend-green" end), "never switched")
    sb.ctl("k8s crashloop todo-chatbot-frontend-green")           -- green starts crashing under traffic
    assert.truthy(sb.wait_until(40, function() return cli.slurp(run.dir .. "/code") ~= "" end), "the run did not end")
    local code, out, err = run.wait()
    assert.are.equal(1, code, out .. err)
    assert.matches("failed while watched", out .. err)
    assert.are.equal("todo-chatbot-frontend", backend_of("/"))
    assert.are.equal(2, kh.deployment("frontend").spec.replicas)
    assert.are.equal(200, kh.health("frontend", 3000))
  end)

  it("changes nothing in a dry run", function()
    local r = backends.assert_unchanged(function()
      return cli.run { "run", RUNBOOK, "-p", "from=todo-chatbot-frontend", "-p", "tag=v1.5.0", "--dry-run" }
    end)
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("would", r.stdout)
    assert.are.equal("todo-chatbot-frontend", backend_of("/"))
    assert.is_false(exists("deployment", "todo-chatbot-frontend-green"))
  end)
end)
