--- Runbook logging: log.info("scaled %s to %d", name, n). Messages go to the
-- terminal, JSON lines and the journal as `log` events of the current step.
local events = require("runbook.events")
local host = require("runbook.host")

local M = {}

local function format(fmt, ...)
  if select("#", ...) == 0 then return tostring(fmt) end
  local ok, s = pcall(string.format, fmt, ...)
  return ok and s or table.concat({ tostring(fmt), ... }, " ")
end

local function logger(level)
  return function(fmt, ...)
    local message = format(fmt, ...)
    if #events.sinks == 0 then
      io.stderr:write(host.redact(("[%s] %s\n"):format(level, message)))
    else
      events.emit { event = "log", level = level, message = message }
    end
  end
end

M.debug, M.info, M.warn, M.error = logger "debug", logger "info", logger "warn", logger "error"

return M
