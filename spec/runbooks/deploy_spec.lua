-- runbooks/deploy.lua against the sandbox: a new image rolled out after a
-- backup, each pod and the smoke test checked; an image that never becomes
-- ready, a failing smoke test and a hotfix that crashes while watched each
-- end on the image that ran before. Checked with curl against the Kubernetes
-- API, ls and the smoke command's own file.
local cli = require("spec.support.cli")
local backends = require("spec.support.backends")
local sb = require("spec.sandbox.sandbox_helper")
local kh = require("spec.runbooks.k8s_helper")

local RUNBOOK = "runbooks/deploy.lua"

local function deploy(tag, ...)
  return cli.run { "run", RUNBOOK, "-p", "deployment=todo-chatbot-websocket", "-p", "tag=" .. tag, "--yes", ... }
end

local function ls(dir)
  local p = io.popen("ls " .. cli.quote(dir))
  local out = p:read("a")
  p:close()
  return out
end

--- The run failed, and websocket is back on `tag`, rolled out.
local function rolled_back(r, tag)
  assert.are.equal(1, r.code, r.stdout .. r.stderr)
  assert.matches("rolling todo%-chatbot%-websocket back to revision", r.stdout)
  assert.are.equal(tag, kh.tag("websocket"))
  assert.truthy(kh.wait_rolled_out("websocket"), "websocket did not settle on " .. tag)
end

describe("deploy", function()
  setup(kh.reset_world)
  teardown(kh.reset_world)   -- the images as seeded, for the specs after this one
  after_each(function()
    sb.ctl("k8s reset")
    cli.cleanup()
  end)

  it("backs the database up, rolls the image out, checks each pod and smoke-tests it", function()
    local dir = cli.tmpdir()
    local smoke = ('echo "$TARGET_SERVICE" > %s/smoked && kubectl get --raw "$TARGET_PROXY/health" >> %s/smoked')
      :format(dir, dir)
    local r = deploy("v1.5.0", "-p", "backup=true", "-p", "dir=" .. dir, "-p", "smoke_paths=/health", "-p", "smoke=" .. smoke)
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.are.equal("v1.5.0", kh.tag("websocket"))
    assert.truthy(kh.wait_rolled_out("websocket"))
    for _, pod in ipairs(kh.pods("websocket")) do
      assert.matches(":v1%.5%.0$", pod.spec.containers[1].image)
      assert.matches(("pod %s /health: HTTP 200"):format(pod.metadata.name):gsub("%-", "%%-"), r.stdout)
    end
    assert.matches("todo%-pre%-deploy%-%d+T%d+Z", ls(dir))
    local smoked = cli.slurp(dir .. "/smoked")
    assert.matches("^todo%-chatbot%-websocket\n", smoked)
    assert.matches('"status": "healthy"', smoked)
  end)

  it("rolls back an image that never becomes ready", function()
    local before = kh.tag("websocket")
    local r = deploy("does-not-exist")
    assert.matches("ImagePullBackOff", r.stdout .. r.stderr)
    rolled_back(r, before)
  end)

  it("rolls back when the smoke test fails", function()
    local before = kh.tag("websocket")
    local r = deploy("v1.6.0", "-p", "smoke_paths=/health,/api/tasks")
    assert.matches("smoke test: todo%-chatbot%-websocket /api/tasks: HTTP 404", r.stdout .. r.stderr)
    rolled_back(r, before)
  end)

  it("watches a hotfix closely and rolls it back when it starts crashing", function()
    local before = kh.tag("websocket")
    local run = cli.spawn { "run", RUNBOOK, "-p", "deployment=todo-chatbot-websocket", "-p", "tag=hotfix-critical-fix",
      "-p", "hotfix=true", "-p", "observe=30s", "--yes" }
    assert.truthy(sb.wait_until(30, function() return cli.slurp(run.dir .. "/out"):find("[7/7] Watch the hotfix", 1, true) end),
      "the hotfix was never watched")
    sb.ctl("k8s crashloop todo-chatbot-websocket")
    assert.truthy(sb.wait_until(40, function() return cli.slurp(run.dir .. "/code") ~= "" end), "the run did not end")
    local code, out, err = run.wait()
    assert.matches("pods restarted again after the fix", out .. err)
    rolled_back({ code = code, stdout = out, stderr = err }, before)
  end)

  it("changes nothing in a dry run", function()
    local dir = cli.tmpdir()
    local before = kh.tag("websocket")
    local r = backends.assert_unchanged(function()
      return cli.run { "run", RUNBOOK, "-p", "deployment=todo-chatbot-websocket", "-p", "tag=v1.7.0", "-p", "backup=true",
        "-p", "dir=" .. dir, "-p", "smoke=touch " .. dir .. "/smoked", "--dry-run" }
    end)
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("would set image of deployment todo%-chatbot%-websocket", r.stdout)
    assert.are.equal(before, kh.tag("websocket"))
    assert.are.equal("", ls(dir))
  end)
end)
