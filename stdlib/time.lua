--- Time for runbooks: sleeping that respects the step deadline and Ctrl-C,
-- polling with a deadline, and durations.
local duration = require("duration")
local host = require("runbook.host")
local heartbeat = require("runbook.heartbeat")

local raise = host.raiser "time"

local M = { parse = duration.parse, format = duration.format }

--- Monotonic seconds (for measuring), and wall-clock seconds since the epoch.
M.monotonic = host.now
M.now = host.wallclock

--- Sleep for a duration ("2s", 0.5); ends early with an error on Ctrl-C or when the step times out.
function M.sleep(d)
  heartbeat.sleep(host, duration.check(d, "time.sleep"))
end

--- Call fn() every `every` until it returns a truthy value (returned), or
-- raise after `timeout`:  time.wait_until({timeout = "2m", every = "5s", what = "lag below 100"}, fn).
-- In a dry run the condition would follow simulated writes: fn() is asked
-- once; when it does not hold, it says what it would wait for and returns nil.
function M.wait_until(opts, fn)
  local timeout = duration.check(opts.timeout or "1m", "time.wait_until timeout")
  local every = duration.check(opts.every or "1s", "time.wait_until every")
  local deadline = host.now() + timeout
  local output = require("runbook.output")
  while true do
    local v = fn()
    if v then output.waiting(""); return v end
    if host.mode() == "dry-run" then
      require("log").info("would wait up to %s for %s", duration.format(timeout), opts.what or "the condition")
      return nil
    end
    output.waiting(opts.what or "the condition", deadline - host.now())
    if host.now() + every > deadline then
      raise { op = "wait_until", code = "timeout", retryable = true,
        message = ("gave up waiting for %s after %s"):format(opts.what or "the condition", duration.format(timeout)) }
    end
    heartbeat.sleep(host, every)
  end
end

return M
