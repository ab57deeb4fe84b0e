--- The event bus: the engine emits run_start, step_start, effect, log,
-- step_end and run_end; every sink (terminal, JSON lines, journal) sees each.
-- Sinks redact their own final text, so no secret leaves through any of them.
-- The bus serves one run at a time; a log or effect event belongs to that
-- run's current step (run.step).
local host = require("runbook.host")

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

-- ---- the public JSON lines (--output json, history --output json) ---------------
-- Every line begins with "event" and "time" (RFC 3339, UTC, milliseconds); the
-- keys of each event type come in the order below, any others after them in
-- alphabetical order, and nested objects' keys alphabetically; an empty table
-- is [] except where an object is meant (params, request, outputs, result,
-- error); "/" is not escaped; `duration` is in integer milliseconds. One
-- JSON Schema per event type in docs/events/ says the same.
local ORDER = {
  run_start = { "run_id", "runbook", "version", "file", "path", "sha256", "mode", "params", "params_text", "steps",
    "user", "host", "pid", "lock", "from", "request", "sources", "resumed", "resume_at" },
  step_start = { "step", "index", "total", "description" },
  log = { "step", "level", "message" },
  intent = { "step", "module", "op", "target", "summary", "seq", "n", "key" },
  effect = { "step", "module", "op", "target", "summary", "decision", "ok", "result", "seq", "unknown" },
  source = { "path", "sha256" },
  step_end = { "step", "index", "status", "duration", "attempts", "reason", "needs", "fallback", "outputs", "error" },
  answer = { "step", "answer", "asked" },
  kubernetes_context = { "context", "namespace", "cluster", "server", "user" },
  preview_start = { "step" },
  preview_end = { "step", "status", "error" },
  undo_start = { "step" },
  undo_end = { "step", "status", "duration", "error" },
  run_end = { "run_id", "status", "exit_code", "duration", "ok", "failed", "skipped", "mode", "signal" },
  run = { "run_id", "runbook", "started", "duration", "mode", "status", "user", "host", "resumed" },
}
local OBJECTS = { params = true, params_text = true, request = true, outputs = true, result = true, error = true }

local function is_array(t)
  local n = 0
  for k in pairs(t) do
    if math.type(k) ~= "integer" or k < 1 then return false end
    n = n + 1
  end
  return n == #t
end

local function value(v, object)
  local t = type(v)
  if t == "string" then return (codec.encode(v):gsub("\\/", "/")) end
  if t == "number" or t == "boolean" or t == "nil" or v == codec.null then return codec.encode(v) end
  if t ~= "table" then return value(tostring(v)) end
  if next(v) == nil then return object and "{}" or "[]" end
  local parts = {}
  if is_array(v) then
    for i = 1, #v do parts[i] = value(v[i]) end
    return "[" .. table.concat(parts, ",") .. "]"
  end
  local keys = {}
  for k in pairs(v) do keys[#keys + 1] = tostring(k) end
  table.sort(keys)
  for i, k in ipairs(keys) do
    local item = v[k]
    if item == nil then item = v[tonumber(k)] end
    parts[i] = value(k) .. ":" .. value(item)
  end
  return "{" .. table.concat(parts, ",") .. "}"
end

--- `ev` as one public JSON line (see above), redacted on its raw values.
function M.json_line(ev)
  ev = host.redact_value(ev)
  local parts, done = { value("event") .. ":" .. value(ev.event), value("time") .. ":" .. value(ev.time) },
    { event = true, time = true }
  local function add(k)
    local v = ev[k]
    done[k] = true
    if v == nil then return end
    if k == "duration" and type(v) == "number" then v = math.floor(v * 1000 + 0.5) end
    parts[#parts + 1] = value(k) .. ":" .. value(v, OBJECTS[k])
  end
  for _, k in ipairs(ORDER[ev.event] or {}) do add(k) end
  local rest = {}
  for k in pairs(ev) do if not done[k] then rest[#rest + 1] = k end end
  table.sort(rest)
  for _, k in ipairs(rest) do add(k) end
  return "{" .. table.concat(parts, ",") .. "}"
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
