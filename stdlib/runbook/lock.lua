--- The run lock: one run of a runbook (or of every runbook sharing a `lock`
-- key) at a time on this machine, held with flock on
-- $RUNBOOK_STATE_DIR/locks/<key>.lock for the life of the process, so a
-- crashed holder's lock is released by the kernel. The file records who holds
-- it, for the message the next contender prints.
local host = require "runbook.host"
local journal = require "runbook.journal"

local M = {}

function M.path(key)
  return journal.state_dir() .. "/locks/" .. key:gsub("[^%w%.%-_]", "_") .. ".lock"
end

--- "run 2026...-ab12 (pid 123, user ops@db1, since 2026-11-22T10:00:00Z)"
function M.describe_holder(text)
  local ok, h = pcall(require("cjson").decode, text or "")
  if not ok or type(h) ~= "table" then return "another run (holder details unavailable)" end
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
  local delay = 0.05
  while true do
    local lock, current = host.lock_try(path, info)
    if lock then return lock end
    if lock == nil then return nil, current end
    if host.now() >= deadline then
      return nil, ("%s is locked by %s"):format(key, M.describe_holder(current))
    end
    host.sleep(math.min(delay, math.max(0.001, deadline - host.now())))
    delay = math.min(delay * 2, 1)
  end
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
