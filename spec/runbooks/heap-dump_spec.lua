-- runbooks/heap-dump.lua against the sandbox: the app's dump command runs in
-- the pod, the copy is checked against kubectl exec sha256sum, the restart
-- against kubectl get; a pod that OOMs gets the memory limit asked for, after
-- its dump is safe (kubectl reads the limit rolled out); a dry run leaves the
-- pod, its limit and the directory as they were.
local cli = require("spec.support.cli")
local sb = require("spec.sandbox.sandbox_helper")
local cjson = require("cjson")

local RUNBOOK = "runbooks/heap-dump.lua"
local kh = require("spec.runbooks.k8s_helper")
local KUBECTL = "/usr/lib/google-cloud-sdk/bin/kubectl.1.32"
local cache

local function kubectl(args, may_fail)
  local out, ok = sb.sh(("%s --cache-dir=%s -n todo-chatbot %s"):format(KUBECTL, cache, args))
  if may_fail then return out, ok end
  assert(ok, args .. ": " .. out)
  return out
end

local function pods()
  local names = {}
  for _, p in ipairs(cjson.decode(kubectl("get pods -l app.kubernetes.io/component=backend -o json")).items) do
    names[#names + 1] = p.metadata.name
  end
  table.sort(names)
  return names
end

local function resources()
  return kh.deployment("backend").spec.template.spec.containers[1].resources
end


local function clear_dumps()
  for _, pod in ipairs(pods()) do kubectl(("exec %s -c backend -- rm -f /tmp/heap.hprof"):format(pod)) end
end

describe("heap-dump", function()
  setup(function() cache = cli.tmpdir() end)
  teardown(cli.cleanup)

  it("changes nothing in a dry run: no dump in any pod, no copy, no restart", function()
    clear_dumps()
    local before, dir = pods(), cli.tmpdir() .. "/dumps"
    local r = cli.run { "run", RUNBOOK, "-p", "deployment=todo-chatbot-backend", "-p", "dir=" .. dir, "-p", "restart=true",
      "-p", "memory_limit=512Mi", "--dry-run" }
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches('would run "sh %-c %./heapdump /tmp/heap%.hprof" in pod', r.stdout)
    assert.matches("backend: memory limit 256Mi %-> 512Mi", r.stdout)
    assert.matches("would patch deployment todo%-chatbot%-backend", r.stdout)
    assert.are.equal("256Mi", resources().limits.memory)
    for _, pod in ipairs(before) do
      local _, there = kubectl(("exec %s -c backend -- test -e /tmp/heap.hprof"):format(pod), true)
      assert.is_false(there, pod)
    end
    assert.are.same(before, pods())
    assert.is_nil(io.open(dir))
  end)

  it("copies the dump out byte for byte, then restarts the pod", function()
    clear_dumps()
    local dir = cli.tmpdir()
    local r = cli.run { "run", RUNBOOK, "-p", "deployment=todo-chatbot-backend", "-p", "dir=" .. dir, "--yes" }
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    local file = r.stdout:match("copied to (%S+),")
    local pod = file:match("heap%-(.-)%-%d+T%d+Z%.hprof$")
    local sum = sb.sh("sha256sum " .. file):match("^%x+")
    assert.are.equal(kubectl(("exec %s -c backend -- sha256sum /tmp/heap.hprof"):format(pod)):match("^%x+"), sum)

    local replicas = #pods()
    r = cli.run { "run", RUNBOOK, "-p", "deployment=todo-chatbot-backend", "-p", "dir=" .. dir, "-p", "restart=true", "--yes" }
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    pod = r.stdout:match("delete pod (%S+)")
    assert.is_true(sb.wait_until(30, function()
      local out = kubectl("get pod " .. pod .. " --ignore-not-found -o name")
      return out == "" and #pods() == replicas
    end), pod .. " was not replaced")
  end)

  it("dumps a pod that OOMs, then raises its memory limit as asked: the pods roll with it", function()
    finally(kh.reset_world)
    clear_dumps()
    sb.ctl("k8s oom backend")
    assert.truthy(sb.wait_until(25, function() return kh.oom_killed("backend") end), "backend was never OOM-killed")
    local dir = cli.tmpdir()
    local r = cli.run { "run", RUNBOOK, "-p", "deployment=todo-chatbot-backend", "-p", "dir=" .. dir,
      "-p", "memory_limit=512Mi", "-p", "memory_request=256Mi", "--yes" }
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("copied to %S+, sha256 matches", r.stdout)
    assert.matches("backend: memory limit 256Mi %-> 512Mi, request 128Mi %-> 256Mi", r.stdout)
    -- kubectl: the new limit and request, and every pod of the rolled-out template carries them
    local res = resources()
    assert.are.same({ "512Mi", "256Mi" }, { res.limits.memory, res.requests.memory })
    assert.truthy(kh.wait_rolled_out("backend"))
    for _, p in ipairs(kh.pods("backend")) do
      assert.are.equal("512Mi", p.spec.containers[1].resources.limits.memory, p.metadata.name)
    end
  end)

  it("refuses a memory limit that is not a quantity, before anything", function()
    local r = cli.run { "run", RUNBOOK, "-p", "deployment=todo-chatbot-backend", "-p", "dir=" .. cli.tmpdir(),
      "-p", "memory_limit=lots", "--yes" }
    assert.are.equal(1, r.code, r.stdout .. r.stderr)
    assert.matches('param memory_limit: "lots" is not a quantity', r.stdout .. r.stderr)
    assert.falsy((r.stdout .. r.stderr):find("traceback", 1, true))
  end)
end)
