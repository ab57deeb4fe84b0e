--- The event bus: the engine emits run_start, step_start, effect, log,
-- step_end and run_end; every sink (terminal, JSON lines, journal) sees each.
-- Sinks redact their own final text, so no secret leaves through any of them.
-- The bus serves one run at a time; a log or effect event belongs to that
-- run's current step (run.step).
local host = require "runbook.host"

local M = { sinks = {}, run = nil }

local function iso8601(t)
  local secs = math.floor(t)
  return os.date("!%Y-%m-%dT%H:%M:%S", secs) .. (".%03dZ"):format(math.floor((t - secs) * 1000))
end
M.iso8601 = iso8601

local codec = require("cjson").new()
codec.encode_invalid_numbers(true)

--- `ev` as one line of JSON, redacted on its raw values before encoding (a
-- secret written as "a\/b" is still caught). A result that cannot be encoded
-- (a function, a userdata) is recorded as its tostring, never dropping the event.
function M.encode(ev)
  ev = host.redact_value(ev)
  local ok, line = pcall(codec.encode, ev)
  if not ok then
    ev.result = ev.result ~= nil and tostring(ev.result) or nil
    ok, line = pcall(codec.encode, ev)
    if not ok then line = codec.encode { event = ev.event, time = ev.time, error = "unencodable event: " .. line } end
  end
  return line
end

function M.add_sink(fn) M.sinks[#M.sinks + 1] = fn end

--- Start over with no sinks, for `run` (nil: none).
function M.reset(run) M.sinks, M.run = {}, run end

--- Send `ev` (a table with an `event` field) to every sink, stamped with the
-- time and, for a log, an intent or an effect, the run's current step.
function M.emit(ev)
  ev.time = iso8601(host.wallclock())
  if (ev.event == "log" or ev.event == "effect" or ev.event == "intent") and M.run then ev.step = M.run.step end
  for _, sink in ipairs(M.sinks) do sink(ev) end
end

return M
