-- The CronJob and the crontab line in examples/team run outage-recovery under
-- the cluster-wide Lease lock. Run from the repository root against the
-- sandbox (runbook test examples/team/spec): the command they run is taken
-- from the files themselves, so the spec checks what is shipped.
local k8s = require("k8s")
local lyaml = require("lyaml")

local run = require("examples.team.spec.run")
local sb = require("spec.sandbox.sandbox_helper")

local NS, LEASE = "todo-chatbot", "outage-recovery"

local function read(path)
  local f = assert(io.open(path))
  local s = f:read("a")
  f:close()
  return s
end

local function cronjob()
  for _, doc in ipairs(lyaml.load(read("examples/team/cronjob.yaml"), { all = true })) do
    if doc.kind == "CronJob" then return doc end
  end
end

local function micro_time(t) return os.date("!%Y-%m-%dT%H:%M:%S.000000Z", t) end

describe("the team's scheduled outage-recovery", function()
  local job = cronjob()
  local pod = job.spec.jobTemplate.spec.template.spec
  local args = pod.containers[1].args

  after_each(function() k8s.delete("leases/" .. LEASE, { namespace = NS, missing_ok = true }) end)

  it("is a CronJob that cannot overlap itself, runs as its own service account, and takes the Lease", function()
    assert.are.equal("Forbid", job.spec.concurrencyPolicy)
    assert.are.equal("runbook", pod.serviceAccountName)
    assert.are.same({ "run", "outage-recovery", "--yes", "--output", "json", "--lock=k8s:todo-chatbot/outage-recovery" },
      { table.unpack(args, 1, 6) })
    -- the crontab line takes the same Lease, so host and cluster never recover at once
    assert.matches("runbook run outage%-recovery .*%-%-lock=k8s:todo%-chatbot/outage%-recovery", read("examples/team/crontab"))
  end)

  it("ends at once with exit 75, naming the holder, while another pod holds the Lease", function()
    k8s.create { apiVersion = "coordination.k8s.io/v1", kind = "Lease", metadata = { name = LEASE, namespace = NS },
      spec = { holderIdentity = "outage-recovery-29384750-x7k2p", leaseDurationSeconds = 120,
        acquireTime = micro_time(os.time()), renewTime = micro_time(os.time()) } }
    local code, _, out = run(args)
    assert.are.equal(75, code, out)
    assert.matches("outage%-recovery%-29384750%-x7k2p", out)
    assert.is_nil(out:find('"step_start"', 1, true), "a step ran without the lock")
  end)

  it("runs the recovery holding the Lease, and hands it back", function()
    sb.settle_error_rate()
    -- the error rate held 2 s instead of the shipped minute: the Lease is the point here
    local argv = { table.unpack(args) }
    table.move({ "-p", "error_rate_hold=2s" }, 1, 2, #argv + 1, argv)
    local code, events, out = run(argv)
    assert.are.equal(0, code, out)
    local lease_effects, last = 0, nil
    for _, e in ipairs(events) do
      if e.event == "effect" and e.op == "lease" then lease_effects = lease_effects + 1 end
      last = e
    end
    assert.is_true(lease_effects >= 2, out)               -- taken and handed back, both journaled
    assert.are.same({ "run_end", "ok" }, { last.event, last.status })
    local lease = k8s.get("leases/" .. LEASE, { namespace = NS })
    assert.is_true(lease.spec.holderIdentity == nil or lease.spec.holderIdentity == "", tostring(lease.spec.holderIdentity))
  end)
end)
