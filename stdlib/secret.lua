--- Secrets for runbooks: values that must never appear in any output. Params
-- declared `secret = true` and the passwords and tokens modules read are
-- registered already; a runbook registers what else it obtains.
local host = require("runbook.host")

local M = {}

--- Register `value` (a string; values shorter than 4 bytes are ignored) and return it.
function M.register(value)
  if type(value) ~= "string" then
    error(("secret.register: expected a string, got %s"):format(type(value)), 2)
  end
  host.secret(value)
  return value
end

--- `text` with every registered secret replaced by ***.
function M.redact(text) return host.redact(tostring(text)) end

return M
