--- The effect gate for effects written in Lua (the C modules call the same
-- gate in C). gate.effect{...} asks the host, runs `perform` or `simulate`
-- as the mode decides, and records the outcome for the journal and output.
--
--   gate.effect {
--     module = "fs", op = "write", target = path,
--     summary = "write 120 bytes to /tmp/x",       -- reads well after "would "
--     perform = function() ... return result end,
--     simulate = function() ... return would_be end, -- optional: a native dry run
--   }
-- returns the result, or {skipped = true} when the write was not simulated.
local host = require "runbook.host"

local M = {}

function M.effect(e)
  assert(type(e.perform) == "function", "gate.effect: perform must be a function")
  local decision = host.gate(e.module, e.op, e.target, e.summary, e.simulate ~= nil)
  local fn = decision == "perform" and e.perform or decision == "simulate" and e.simulate
  if not fn then
    host.gate_done(e.module, e.op, e.target, e.summary, "skip", true, nil)
    return { skipped = true }
  end
  local ok, result = pcall(fn)
  host.gate_done(e.module, e.op, e.target, e.summary, decision, ok,
    ok and result or tostring(result))
  if not ok then error(result, 0) end
  return result
end

--- True when writes are being simulated (a dry run or a step preview).
function M.dry_run() return host.mode() == "dry-run" end

return M
