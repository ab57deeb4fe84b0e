--- The journal's event schema, and the one validator every journal reader
-- (resume, history, report) runs each event through, so a malformed journal
-- gives a clear message naming the field instead of a Lua error later.
--
-- Each event has `event` (a string) and `time` (RFC 3339, UTC, milliseconds,
-- as the writer stamps it). The fields below are the ones the readers use:
-- required ones must be present, and every listed field that is present must
-- have its type and, where listed, one of its values (what history and report
-- pass on in the public JSON lines). Fields not listed, and event kinds not
-- listed (a newer writer's), are kept as they are.
local M = {}

local S, N, B, T = "string", "number", "boolean", "table"

local MODES = { run = true, ["dry-run"] = true }

-- field = {type, required, values}
M.EVENTS = {
  run_start = { run_id = { S, true }, runbook = { S, true }, file = { S, true }, mode = { S, true, MODES },
    version = { S }, path = { S }, sha256 = { S }, params = { T }, params_text = { T }, steps = { N }, user = { S }, host = { S },
    pid = { N }, lock = { S }, resumed = { B }, from = { S }, resume_at = { S }, request = { T }, sources = { T } },
  step_start = { step = { S, true }, index = { N }, total = { N }, description = { S } },
  step_end = { step = { S, true }, index = { N }, duration = { N }, outputs = { T },
    status = { S, true, { ok = true, failed = true, skipped = true, aborted = true, interrupted = true, timed_out = true } },
    error = { T }, attempts = { N }, reason = { S } },
  intent = { module = { S, true }, op = { S, true }, seq = { N, true }, target = { S }, summary = { S },
    key = { S }, step = { S } },
  effect = { module = { S, true }, op = { S, true }, decision = { S, true }, target = { S }, summary = { S },
    ok = { B }, unknown = { B }, seq = { N }, step = { S } },
  log = { level = { S }, message = { S }, step = { S } },
  undo_start = { step = { S, true } },
  undo_end = { step = { S, true }, status = { S, true }, duration = { N }, error = { T } },
  run_end = { run_id = { S }, exit_code = { N }, duration = { N }, ok = { N },
    status = { S, true, { ok = true, failed = true, aborted = true, interrupted = true, locked = true, timed_out = true } },
    failed = { N }, skipped = { N }, mode = { S, false, MODES }, signal = { S } },
  journal_repaired = { dropped = { N, true } },
  answer = { step = { S, true }, answer = { S, true }, asked = { S } },
  preview_start = { step = { S, true } },
  preview_end = { step = { S, true }, status = { S }, error = { T } },
  kubernetes_context = { context = { S }, namespace = { S }, cluster = { S }, server = { S }, user = { S } },
  source = { path = { S, true }, sha256 = { S, true } },
}

-- Tables whose own fields the readers use.
local NESTED = {
  error = { message = { S }, where = { S } },
  request = { step = { B }, yes = { B }, wait = { N }, undo_on_failure = { B }, output = { S } },
}

local function check_fields(e, fields, prefix)
  for name, spec in pairs(fields) do
    local v = e[name]
    if v == nil then
      if spec[2] then return ("missing field %s%s"):format(prefix, name) end
    elseif type(v) ~= spec[1] then
      local got = type(v) == "userdata" and "null" or type(v)
      return ("field %s%s: expected a %s, got %s"):format(prefix, name, spec[1], got)
    elseif spec[3] and not spec[3][v] then
      return ("field %s%s: unknown value %q"):format(prefix, name, v)
    elseif NESTED[name] and prefix == "" then
      local err = check_fields(v, NESTED[name], name .. ".")
      if err then return err end
    end
  end
end

--- nil when `e` is a valid event, else what is wrong with it (one line).
function M.check(e)
  if type(e) ~= "table" then return "not a JSON object" end
  if type(e.event) ~= "string" then return "missing field event" end
  if type(e.time) ~= "string" then return "missing field time" end
  if not e.time:match("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d%d%dZ$") then
    return ("field time: expected an RFC 3339 UTC time such as 2026-12-06T12:41:43.690Z, got %q"):format(e.time)
  end
  local fields = M.EVENTS[e.event]
  if not fields then return nil end
  local err = check_fields(e, fields, "")
  return err and ("%s event: %s"):format(e.event, err)
end

return M
