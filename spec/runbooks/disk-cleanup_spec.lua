-- runbooks/disk-cleanup.lua against the sandbox: the disk-full fault fills the
-- pods' log volume with an old rotated log; the runbook deletes them and
-- only them; kubectl exec lists what is left.
local cli = require("spec.support.cli")
local sb = require("spec.sandbox.sandbox_helper")

local RUNBOOK = "runbooks/disk-cleanup.lua"
local KUBECTL = "/usr/lib/google-cloud-sdk/bin/kubectl.1.32"
local cache

local function kubectl(args)
  local out, ok = sb.sh(("%s --cache-dir=%s -n todo-chatbot %s"):format(KUBECTL, cache, args))
  assert(ok, args .. ": " .. out)
  return out
end

local function pods()
  local names = {}
  for line in kubectl("get pods -l app.kubernetes.io/component=recurring-task -o name"):gmatch("pod/(%S+)") do
    names[#names + 1] = line
  end
  return names
end

local function listing(pod)
  return kubectl(("exec %s -c recurring-task -- ls /var/log"):format(pod))
end

local function use(pod)
  return tonumber(kubectl(("exec %s -c recurring-task -- df -Pk /var/log"):format(pod)):match("(%d+)%% /var/log"))
end

-- The fault: an old rotated log (recurring-task.log.14, 14 days old) fills
-- each pod's /var/log to 95%, next to the live log and recent rotations.
local function fill()
  local out, ok = sb.ctl("k8s disk-full recurring-task")
  assert(ok, out)
  for _, pod in ipairs(pods()) do assert.is_true(use(pod) >= 95) end
end

describe("disk-cleanup", function()
  setup(function() cache = cli.tmpdir() end)
  teardown(cli.cleanup)

  it("lists what it would delete in a dry run and deletes nothing", function()
    fill()
    local before = {}
    for _, pod in ipairs(pods()) do before[pod] = listing(pod) end
    local r = cli.run { "run", RUNBOOK, "-p", "deployment=todo-chatbot-recurring-task", "-p", "older_than=3d", "--dry-run" }
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("would run \"find /var/log %-type f %-name %*%.log%.%[0%-9%]%* %-mtime %+2 %-print %-delete\" in pod", r.stdout)
    assert.matches("recurring%-task%.log%.14", r.stdout)   -- the largest entry
    for pod, l in pairs(before) do
      assert.are.equal(l, listing(pod))
      assert.is_true(use(pod) >= 95)
    end
  end)

  it("deletes the rotated logs older than older_than, and only those, and measures the space freed", function()
    fill()
    local r = cli.run { "run", RUNBOOK, "-p", "deployment=todo-chatbot-recurring-task", "-p", "older_than=3d", "--yes" }
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("%d%d%d%d%d+ KB freed", r.stdout)
    for _, pod in ipairs(pods()) do
      local l = listing(pod)
      assert.matches("recurring%-task%.log\n", l)
      assert.matches("recurring%-task%.log%.1\n", l)
      assert.matches("recurring%-task%.log%.2\n", l)
      assert.not_matches("recurring%-task%.log%.[345]\n", l)
      assert.not_matches("recurring%-task%.log%.14", l)
      assert.is_true(use(pod) < 10)
    end
  end)
end)
