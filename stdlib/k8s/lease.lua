--- A cluster-wide lock: a coordination.k8s.io/v1 Lease held with client-go's
-- leader-election semantics, so the same runbook started on several machines
-- (or by overlapping CronJobs) never runs twice at once.
--
--   local lock = k8s.lease_lock{namespace = "ops", name = "db-maintenance",
--                               duration = "60s", wait = "5m", identity = nil}
--   ... lock:renew() ... lock:release()
--
-- Acquire: GET the Lease; missing -> create it (a 409 AlreadyExists is a lost
-- race); held by someone else whose renewTime + leaseDurationSeconds is still
-- in the future -> back off and retry until `wait` passes; otherwise (expired,
-- released, or ours) -> PUT with the resourceVersion read (a 409 Conflict is a
-- lost race, after which it reads the Lease again to name the winner). A new holder sets acquireTime and increments leaseTransitions;
-- renewing keeps both. Release hands the Lease back as client-go does:
-- holderIdentity cleared, leaseDurationSeconds 1.
--
-- While held, it renews when a third of its duration has passed, from the run's
-- heartbeat (between steps, in time.sleep and time.wait_until, and in the k8s
-- module's own waits); a step that blocks elsewhere for longer than the
-- duration should call lock:renew() (or k8s.lease_renew_due()).
-- In a dry run every write is sent with dryRun=All, so the lock is checked but
-- not taken (lock.simulated is true).
local host = require("runbook.host")
local client = require("k8s.client")
local duration = require("duration")

local M = {}
local Lock = {}
Lock.__index = Lock

local held = setmetatable({}, { __mode = "k" })   -- locks to renew during waits

local function micro_time(t)
  return os.date("!%Y-%m-%dT%H:%M:%S", math.floor(t)) .. (".%06dZ"):format(math.floor((t % 1) * 1e6))
end

local function parse_micro(s)
  if type(s) ~= "string" then return nil end
  local t = require("k8s.config").parse_time(s)
  local frac = s:match("%.(%d+)")
  return t and (t + (frac and tonumber("0." .. frac) or 0))
end
M.parse_micro = parse_micro

local function default_identity()
  local id = host.identity()
  return ("%s_%d_%06x"):format(id.host, id.pid, math.random(0, 0xffffff))
end

-- One try: true when we hold it now; else false and the current holder and
-- when its lease expires (nil after a lost race).
function Lock:try()
  local c, r = self.client, self.r
  local path = client.path(r, self.namespace, self.name)
  local now = host.wallclock()
  local cur, status = c:call { path = path, op = "lease", allow = { [404] = true } }
  local spec = {
    holderIdentity = self.identity, leaseDurationSeconds = self.duration,
    acquireTime = micro_time(now), renewTime = micro_time(now), leaseTransitions = 0,
  }
  local target = client.target(r, self.namespace, self.name)
  local send
  if status == 404 then
    send = function()
      return c:call { method = "POST", path = client.path(r, self.namespace), op = "lease", allow = { [409] = true },
        body = { apiVersion = "coordination.k8s.io/v1", kind = "Lease",
          metadata = { name = self.name, namespace = self.namespace }, spec = spec },
        query = { fieldManager = "runbook" } }
    end
  else
    local old = cur.spec or {}
    local holder = old.holderIdentity
    if holder and holder ~= "" and holder ~= self.identity then
      local renewed = parse_micro(old.renewTime) or parse_micro(old.acquireTime) or 0
      local expires = renewed + (old.leaseDurationSeconds or 0)
      if expires > now then return false, holder, expires end
    end
    if holder == self.identity then
      spec.acquireTime, spec.leaseTransitions = old.acquireTime or spec.acquireTime, old.leaseTransitions or 0
    else
      spec.leaseTransitions = (old.leaseTransitions or 0) + (status == 404 and 0 or 1)
    end
    local body = { apiVersion = "coordination.k8s.io/v1", kind = "Lease", metadata = cur.metadata, spec = spec }
    send = function()
      return c:call { method = "PUT", path = path, op = "lease", body = body, allow = { [409] = true },
        query = { fieldManager = "runbook" } }
    end
  end
  local renewing = self.held and cur and cur.spec and cur.spec.holderIdentity == self.identity
  local lost = false
  local obj = client.write {
    op = "lease", target = target,
    summary = ("%s lease %s/%s as %s"):format(renewing and "renew" or "take", self.namespace, self.name, self.identity),
    send = function(dry)
      local o = send()
      if type(o) == "table" and o.kind == "Status" then lost = true end
      self.simulated = dry
      return o
    end,
  }
  if lost then return false end
  self.lease, self.held, self.renewed_at = obj, true, host.now()
  return true
end

function M.new(c, opts)
  if type(opts) ~= "table" or type(opts.name) ~= "string" then
    error("k8s.lease_lock: expected {namespace = ..., name = ..., duration = \"60s\"}", 3)
  end
  local lock = setmetatable({
    client = c, r = c:resource("leases.coordination.k8s.io"), namespace = opts.namespace or c.namespace,
    name = opts.name, identity = opts.identity or default_identity(),
    duration = math.max(1, math.ceil(duration.check(opts.duration or "60s", "k8s.lease_lock duration"))),
  }, Lock)
  local wait = duration.check(opts.wait or 0, "k8s.lease_lock wait")
  local retry = duration.check(opts.retry or "2s", "k8s.lease_lock retry")
  local deadline = host.now() + wait
  while true do
    local ok, holder, expires = lock:try()
    -- A lost race (409): another client wrote the Lease between our read and our write; read it
    -- again, so the winner is named (or, if it has already let go, the Lease taken).
    if not ok and not holder then ok, holder, expires = lock:try() end
    if ok then
      held[lock] = true
      return lock
    end
    if host.now() + retry > deadline then
      local msg = holder and ("lease %s/%s is held by %s until %s"):format(lock.namespace, lock.name, holder,
        micro_time(expires)) or ("lease %s/%s: another client took it first"):format(lock.namespace, lock.name)
      if opts.try then return nil, msg, holder end
      client.raise { op = "lease_lock", code = "locked", retryable = true, holder = holder, message = msg }
    end
    host.sleep(retry)
  end
end

--- Renew now; raises code "lost" when another holder took the lease over.
function Lock:renew()
  if not self.held then
    client.raise { op = "lease_renew", code = "released",
      message = ("lease %s/%s is not held"):format(self.namespace, self.name) }
  end
  local ok, holder = self:try()
  if not ok then
    self.held = false
    held[self] = nil
    client.raise { op = "lease_renew", code = "lost", holder = holder,
      message = ("lease %s/%s was lost%s"):format(self.namespace, self.name, holder and (" to " .. holder) or "") }
  end
  return self
end

--- Renew when a third of the lease duration has passed since the last renewal.
function Lock:renew_if_due()
  if self.held and host.now() - self.renewed_at >= self.duration / 3 then self:renew() end
end

--- Seconds until the lease expires unless renewed.
function Lock:expires_in()
  return self.held and (self.renewed_at + self.duration - host.now()) or 0
end

--- Hand the lease back (holderIdentity cleared), if it is still ours. Idempotent.
function Lock:release()
  if not self.held then return end
  self.held = false
  held[self] = nil
  local c, r = self.client, self.r
  local path = client.path(r, self.namespace, self.name)
  local cur, status = c:call { path = path, op = "lease", allow = { [404] = true } }
  if status == 404 or (cur.spec or {}).holderIdentity ~= self.identity then return end
  local now = micro_time(host.wallclock())
  local body = { apiVersion = "coordination.k8s.io/v1", kind = "Lease", metadata = cur.metadata,
    spec = { leaseDurationSeconds = 1, acquireTime = now, renewTime = now,
      leaseTransitions = cur.spec.leaseTransitions or 0 } }
  client.write {
    op = "lease", target = client.target(r, self.namespace, self.name),
    summary = ("release lease %s/%s"):format(self.namespace, self.name),
    send = function()
      return c:call { method = "PUT", path = path, op = "lease", body = body, allow = { [409] = true },
        query = { fieldManager = "runbook" } }
    end,
  }
end
Lock.__close = Lock.release

--- Renew every held lease that is due (the k8s module's waits call this).
function M.renew_due()
  for lock in pairs(held) do lock:renew_if_due() end
end
require("runbook.heartbeat").add(M.renew_due)

return M
