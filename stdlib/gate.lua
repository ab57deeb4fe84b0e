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
local host = require("runbook.host")

local M = {}

M.effect = require("runbook.effect").runbook

--- True when writes are being simulated (a dry run or a step preview).
function M.dry_run() return host.mode() == "dry-run" end

return M
