--- Deadlines for the code a runbook supplies (DESIGN principle 4): its
-- top-level code, its steps' run, when and undo, its notify hooks. M.call
-- runs one under a deadline. The host's count hook stops Lua code there, in
-- every coroutine; the watchdog thread ends the process a grace later if the
-- code still runs (stuck in C, or in an error handler that loops while hooks
-- are off), after appending `watch.events` to the run's journal.
local host = require("runbook.host")

local M = {}

--- Limits in seconds for code that has no timeout of its own.
M.LIMIT = { run = 3600, when = 60, undo = 3600, notify = 30, load = 10 }

--- The watchdog's instructions for the deadline `at`; `watch` is
-- {message, run_id, events}: what to say on stderr, and the events to
-- journal, stamped with the time the watchdog would fire.
local function instructions(at, watch)
  local journal, events = require("runbook.journal"), require("runbook.events")
  local time = events.iso8601(host.wallclock() + at - host.now() + host.watchdog_grace)
  local lines = {}
  for i, e in ipairs(watch.events or {}) do
    e.time = time
    lines[i] = host.redact(journal.encode(e)) .. "\n"
  end
  return { journal = watch.run_id and journal.path(watch.run_id), lines = table.concat(lines),
    message = host.redact("runbook: " .. watch.message) .. "\n", exit = require("runbook.exit").watchdog }
end

--- call(fn, ...) (a protected call: pcall, xpcall or the engine's) with a
-- deadline `limit` seconds from now, watched as `watch` says. Returns what
-- call returned. The deadline ends with the call even when the call itself
-- raises (a runbook's error object whose __tostring loops, caught by the hook
-- while the engine reads it).
function M.call(limit, watch, call, fn, ...)
  local at = host.now() + limit
  host.set_deadline(at, instructions(at, watch))
  local r = table.pack(pcall(call, fn, ...))
  host.set_deadline(0)
  if not r[1] then error(r[2], 0) end
  return table.unpack(r, 2, r.n)
end

--- The watch for a step's `what` ("run", "when" or "undo") stopped after `limit` seconds.
function M.step_watch(ctx, step, what, limit)
  local msg = ("step '%s': its %s function timed out after %s and still ran %gs later (stuck in C code, or in a loop"
    .. " Lua cannot interrupt), so the watchdog ended the run"):format(step.name, what,
    require("duration").format(limit), host.watchdog_grace)
  local exit = require("runbook.exit").watchdog
  local dry = host.mode() == "dry-run"
  return {
    run_id = ctx.run_id,
    message = msg .. (dry and "" or ("; continue it with: runbook resume " .. tostring(ctx.run_id))),
    events = {
      { event = what == "undo" and "undo_end" or "step_end", step = step.name, index = step.index,
        status = "interrupted", duration = limit + host.watchdog_grace, error = { message = msg, code = "timeout" } },
      { event = "run_end", run_id = ctx.run_id, status = "timed_out", exit_code = exit, mode = host.mode() },
    },
  }
end

--- The watch for the notify hooks of run `run_id`, which ended with `status`.
function M.notify_watch(run_id, status)
  return {
    run_id = run_id,
    message = ("the notify hook did not finish within %gs; the watchdog ended the run"):format(M.LIMIT.notify),
    events = { { event = "run_end", run_id = run_id, status = status, exit_code = require("runbook.exit").watchdog,
      mode = host.mode() } },
  }
end

return M
