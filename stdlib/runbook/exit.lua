--- The exit statuses of `runbook`, defined here only (the README's "Exit
-- status" table lists them).
local M = {
  ok = 0,        -- the run succeeded (or the command did)
  failed = 1,    -- a step failed
  usage = 2,     -- usage, parameter or setup error: nothing ran
  load = 3,      -- the runbook cannot be loaded
  aborted = 4,   -- the operator quit at a prompt
  journal = 74,  -- the journal cannot be written, a full disk (EX_IOERR): the run stopped before its next effect
  locked = 75,   -- another run holds the lock (EX_TEMPFAIL)
  unknown = 76,  -- resume found effects of unknown outcome and --on-unknown=fail
  drift = 77,    -- apply: the runbook, its params or an effect differ from the plan; nothing more was performed
  unapproved = 78, -- apply: the plan lacks the approvals its policy asks for (or they expired)
  watchdog = 124, -- runbook code did not stop at its deadline (as timeout(1) exits)
}

local SIGNALS = { [1] = "SIGHUP", [2] = "SIGINT", [15] = "SIGTERM" }

--- 128 + the signal: 130 for SIGINT, 143 for SIGTERM (and SIGHUP, handled as SIGTERM).
function M.interrupted(signal) return 128 + (signal or 2) end

--- "SIGINT", "SIGTERM" for a signal number.
function M.signal_name(signal) return SIGNALS[signal] or ("signal " .. tostring(signal)) end

return M
