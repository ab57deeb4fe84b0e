-- runbooks/disk-cleanup.lua against the sandbox: a pod's log volume is filled
-- with old rotated logs through kubectl exec; the runbook deletes them and
-- only them; kubectl exec lists what is left.
local cli = require "spec.support.cli"
local sb = require "spec.sandbox.sandbox_helper"

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

-- The fault: 20 MB of rotated logs from 30 days ago in each pod, next to the
-- live log and recent rotations.
local function fill()
  for _, pod in ipairs(pods()) do
    kubectl(("exec %s -c recurring-task -- sh -c 'head -c 20000000 /dev/zero >/var/log/recurring-task.log.30 && "
      .. "touch -d \"30 days ago\" /var/log/recurring-task.log.30'"):format(pod))
  end
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
    assert.matches("recurring%-task%.log%.30", r.stdout)   -- the largest entry
    for pod, l in pairs(before) do assert.are.equal(l, listing(pod)) end
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
      assert.not_matches("recurring%-task%.log%.30", l)
    end
  end)
end)
