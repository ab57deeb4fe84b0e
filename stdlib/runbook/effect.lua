--- The one implementation of effects written in Lua, behind a runbook's
-- gate.effect and the libraries' own (fs, pg, kafka, backupset). It asks
-- the host, runs `perform` or `simulate` as the mode decides, and records the
-- outcome for the journal and output.
--
-- A library's effect is whole: the C module writes its own perform makes
-- (pg.dump's BEGIN, its pg_dump) are part of it, and apply holds the one
-- effect to the plan. A runbook's is not: its perform is the runbook's code,
-- so apply holds each C module write inside it to the plan on its own
-- (host/plan.c), or a planned description could wrap any write. Runbooks
-- cannot require this file.
local host = require("runbook.host")

local M = {}

local function effect(e, whole)
  assert(type(e.perform) == "function", "gate.effect: perform must be a function")
  local decision = host.gate(e.module, e.op, e.target, e.summary, e.simulate ~= nil, whole)
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

--- gate.effect{module, op, target, summary, perform, simulate}.
function M.runbook(e) return effect(e, false) end

--- The same for the runbook libraries' own effects.
function M.library(e) return effect(e, true) end

return M
