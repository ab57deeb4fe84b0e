--- The run lock: one run of a runbook (or of every runbook sharing a `lock`
-- key) at a time on this machine, held with flock on
-- $RUNBOOK_STATE_DIR/locks/<key>.lock for the life of the process, so a
-- crashed holder's lock is released by the kernel. The file records who holds
-- it, for the message the next contender prints.
--
-- A key "k8s:NAMESPACE/NAME" (or "k8s:NAME", in the kubeconfig context's
-- namespace) is a cluster-wide lock instead: a coordination.k8s.io Lease, so
-- runs on several machines or overlapping CronJob pods exclude each other.
local host = require("runbook.host")
local journal = require("runbook.journal")

local M = {}

function M.path(key)
  return journal.state_dir() .. "/locks/" .. key:gsub("[^%w%.%-_]", "_") .. ".lock"
end

local function parse_holder(text)
  local ok, h = pcall(require("cjson").decode, text or "")
  return ok and type(h) == "table" and h or nil
end

--- True when `h` names a process on this host that no longer runs: the
-- record of an earlier holder, not yet overwritten by the one holding now.
local function stale(h)
  return h.host == host.identity().host and math.tointeger(h.pid)
    and require("lfs").attributes("/proc/" .. math.tointeger(h.pid), "mode") == nil
end

--- "run 2026...-ab12 (pid 123, user ops@db1, since 2026-11-22T10:00:00Z)"
function M.describe_holder(text)
  local h = parse_holder(text)
  if not h then return "another run (holder details unavailable)" end
  return ("run %s (pid %s, user %s@%s, since %s)"):format(h.run_id, math.tointeger(h.pid) or h.pid, h.user, h.host,
    h.since)
end

--- Take the lock for `key`, waiting up to `wait` seconds (0: do not wait).
-- `holder` is {run_id, pid, user, host, since}. Returns the lock, or nil and
-- a message naming the holder.
function M.acquire(key, holder, wait)
  journal.mkdirs(journal.state_dir() .. "/locks")
  local path = M.path(key)
  local info = require("cjson").encode(holder)
  local deadline = host.now() + (wait or 0)
  -- The holder records itself just after it takes the lock: a loser that
  -- reads no record, or a dead process's, looks again for a moment.
  local settle = host.now() + 0.5
  local delay = 0.05
  while true do
    local lock, current = host.lock_try(path, info)
    if lock then return lock end
    if lock == nil then return nil, current end
    local h = parse_holder(current)
    if (not h or stale(h)) and host.now() < settle then
      host.sleep(0.01)
    elseif host.now() >= deadline then
      return nil, ("%s is locked by %s"):format(key, M.describe_holder(current))
    else
      host.sleep(math.min(delay, math.max(0.001, deadline - host.now())))
      delay = math.min(delay * 2, 1)
    end
  end
end

--- The Lease a "k8s:" key names, {namespace (nil: the context's), name}, or
-- nil and what is wrong with the key.
function M.lease_name(key)
  local spec = key:match("^k8s:(.*)$") or ""
  local ns, name = spec:match("^([^/]+)/([^/]+)$")
  name = name or spec
  local function dns(s) return #s <= 253 and s:match("^[a-z0-9][-a-z0-9.]*$") and not s:match("[-.]$") end
  if not dns(name) or (ns and not dns(ns)) then
    return nil, ("lock %s: expected k8s:NAMESPACE/NAME or k8s:NAME with lower-case DNS names"):format(key)
  end
  return { namespace = ns, name = name }
end

-- Long enough for steps that block without waiting through the heartbeat for
-- a while; a crashed holder's lease is free again after this.
M.LEASE_DURATION = "2m"

--- Take the Lease a "k8s:" key names, waiting up to `wait` seconds. Returns
-- the lock (renewed by the heartbeat), or nil and a message naming the holder.
-- In a dry run the Lease is only checked.
function M.lease(key, holder, wait)
  local lease = assert(M.lease_name(key))
  local k8s = require("k8s")
  local namespace = lease.namespace or k8s.client().namespace
  host.plan_own("k8s", "lease", namespace .. "/lease/" .. lease.name)   -- the run's lock, not a planned effect
  return k8s.lease_lock {
    namespace = namespace, name = lease.name, duration = M.LEASE_DURATION, wait = wait, try = true,
    identity = ("%s@%s pid %d run %s"):format(holder.user, holder.host, holder.pid, holder.run_id),
  }
end

--- The holder record when `key` is locked now, else nil.
function M.holder(key)
  local path = M.path(key)
  if not host.lock_held(path) then return nil end
  local f = io.open(path, "rb")
  if not f then return nil end
  local ok, h = pcall(require("cjson").decode, f:read("a"))
  f:close()
  return ok and h or {}
end

return M
