--- `runbook describe`: a runbook shown as a runbook page, nothing run.
local duration = require("duration")

local M = {}

local function param_line(p)
  local ty = p.type == "enum" and ("one of " .. table.concat(p.values, "|")) or p.type
  local bits = { ty }
  if p.required then bits[#bits + 1] = "required" end
  if p.default ~= nil then
    bits[#bits + 1] = "default " .. (p.secret and "***" or require("runbook.params").text(p.default))
  end
  if p.secret then bits[#bits + 1] = "secret" end
  return ("  %-20s %s%s"):format(p.name, table.concat(bits, ", "), p.help and ("\n  %-20s %s"):format("", p.help) or "")
end

local function step_line(i, s)
  local marks = {}
  if s.confirm then marks[#marks + 1] = "asks for confirmation" end
  if s.when then marks[#marks + 1] = "conditional" end
  if s.timeout then marks[#marks + 1] = "timeout " .. duration.format(s.timeout) end
  if s.retry then marks[#marks + 1] = ("retries %d times"):format(s.retry.attempts - 1) end
  if s.undo then marks[#marks + 1] = "can be undone" end
  if s.idempotent then marks[#marks + 1] = "idempotent" end
  local line = ("  %2d. %s"):format(i, s.name)
  if #marks > 0 then line = line .. "  [" .. table.concat(marks, "; ") .. "]" end
  if s.description ~= "" then line = line .. "\n      " .. s.description end
  return line
end

function M.text(rb)
  local out = { ("%s%s"):format(rb.name, rb.version and (" " .. rb.version) or ""), "", rb.description, "" }
  out[#out + 1] = ("File: %s"):format(rb.file)
  if rb.replaces and #rb.replaces > 0 then
    out[#out + 1] = ("Replaces seed procedures: %s"):format(table.concat(rb.replaces, ", "))
  end
  if rb.on_failure == "undo" then out[#out + 1] = "On failure: undo completed steps in reverse order" end
  out[#out + 1] = ""
  out[#out + 1] = "Params:"
  if #rb.params == 0 then out[#out + 1] = "  (none)" end
  for _, p in ipairs(rb.params) do out[#out + 1] = param_line(p) end
  out[#out + 1] = ""
  out[#out + 1] = "Steps:"
  for i, s in ipairs(rb.steps) do out[#out + 1] = step_line(i, s) end
  return table.concat(out, "\n")
end

return M
