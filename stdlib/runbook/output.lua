--- Output sinks for the event bus: a live view on a terminal, plain lines
-- otherwise, and JSON Lines for --output json (schema in the README). Each
-- redacts its final text.
local duration = require("duration")
local host = require("runbook.host")

local M = {}

-- Set by the command line: -v (1) shows log.debug, -q (-1) shows only warnings,
-- errors, failures and the summary; --no-color turns colour and the spinner off.
M.verbosity = 0
M.no_color = nil

--- Colour and a spinner on a terminal, unless --no-color, NO_COLOR (set to
-- anything, https://no-color.org) or TERM=dumb says otherwise.
function M.fancy(fd)
  local no_color = os.getenv("NO_COLOR")
  return host.isatty(fd) and not M.no_color and not (no_color and no_color ~= "") and os.getenv("TERM") ~= "dumb"
end

local function writer(stream)
  return function(s)
    stream:write(host.redact(s))
    stream:flush()
  end
end

--- A stand-in for io.stdout or io.stderr whose write redacts: the runbook
-- environment's io.write, io.stdout and io.stderr. A secret is caught within
-- one write call (a runbook that splits one across calls on purpose is not).
function M.redacting(file)
  local proxy = {}
  function proxy.write(self, ...)
    local parts = table.pack(...)
    for i = 1, parts.n do
      local v = parts[i]
      if type(v) ~= "string" and type(v) ~= "number" then
        error(("bad argument #%d to 'write' (string expected, got %s)"):format(i, type(v)), 2)
      end
      parts[i] = tostring(v)
    end
    file:write(host.redact(table.concat(parts, "", 1, parts.n)))
    return self
  end
  function proxy.flush(self) file:flush(); return self end
  function proxy.setvbuf(_, ...) return file:setvbuf(...) end
  return setmetatable(proxy, { __name = "FILE*", __tostring = function() return tostring(file) end })
end

local function error_text(err)
  if not err then return "" end
  local s = err.message or "error"
  if err.where then s = s .. "  (at " .. err.where .. ")" end
  return s
end

local function result_text(r)
  if type(r) == "string" then return r end
  if type(r) == "table" and r.summary then return tostring(r.summary) end
end

--- The running step waits for `what` ("rollout of backend: 2 of 3 updated
-- replicas are available") for at most `seconds_left` more: the spinner says so,
-- with the time left. No-op without a terminal's live view.
function M.waiting(what, seconds_left)
  if M.live then host.ticker_wait(what, seconds_left or 0) end
end

--- The human view. `fancy` adds colour, symbols and the spinner (a terminal
-- that takes them: M.fancy).
function M.human(stream, fancy)
  fancy = fancy and M.fancy(1)
  local quiet, verbose = M.verbosity < 0, M.verbosity > 0
  local out = fancy and host.term_write or writer(stream)
  local C = fancy and { ok = "\27[32m✓\27[0m", fail = "\27[31m✗\27[0m", skip = "\27[33m-\27[0m",
    dim = "\27[2m", bold = "\27[1m", reset = "\27[0m", bar = "│",
    debug = "\27[2mDEBUG\27[0m ", warn = "\27[33mWARN\27[0m ", error = "\27[1;31mERROR\27[0m " }
    or { ok = "ok", fail = "FAILED", skip = "-", dim = "", bold = "", reset = "", bar = "|",
      debug = "DEBUG ", warn = "WARN ", error = "ERROR " }
  local handlers = {}
  function handlers.run_start(e)
    out(("%s%s%s%s  %s%s run %s%s\n"):format(C.bold, e.runbook, e.version and (" " .. e.version) or "", C.reset,
      e.mode == "dry-run" and "DRY RUN (nothing will change)  " or "", C.dim, e.run_id, C.reset))
  end
  function handlers.step_start(e)
    if quiet then return end
    out(("[%d/%d] %s%s%s%s\n"):format(e.index, e.total, C.bold, e.step, C.reset,
      e.description ~= "" and (": " .. e.description) or ""))
    if fancy then host.ticker_start(("[%d/%d] %s"):format(e.index, e.total, e.step)); M.live = true end
  end
  -- Every line of a message under the step's bar, long ones wrapped to the
  -- terminal's width with the same indent.
  local width = fancy and host.term_width() or nil
  local function wrap(line, room)
    if not room or utf8.len(line) == nil or utf8.len(line) <= room then return { line } end
    local lines, cur = {}, ""
    for word, space in line:gmatch("(%S+)(%s*)") do
      if cur ~= "" and utf8.len(cur .. word) > room then
        lines[#lines + 1] = cur:gsub("%s+$", "")
        cur = ""
      end
      cur = cur .. word .. space
    end
    lines[#lines + 1] = cur:gsub("%s+$", "")
    return lines
  end
  function handlers.log(e)
    if e.level == "debug" and not verbose or e.level == "info" and quiet then return end
    local tag = C[e.level] or ""
    local plain_tag = tag:gsub("\27%[[%d;]*m", "")
    local room = width and math.max(20, width - 6 - #plain_tag)
    local text = {}
    for line in (tostring(e.message) .. "\n"):gmatch("(.-)\n") do
      for _, piece in ipairs(wrap(line, room)) do
        text[#text + 1] = ("    %s %s%s\n"):format(C.bar, tag, piece)
      end
    end
    out(table.concat(text))
  end
  function handlers.effect(e)
    if quiet and (e.ok ~= false) then return end
    local res = result_text(e.result)
    if e.decision == "performed" then
      out(("    %s %s%s\n"):format(e.ok and "→" or "✗", e.summary, e.ok and "" or (": " .. tostring(e.result))))
    elseif e.decision == "simulated" then
      out(("    would %s%s\n"):format(e.summary, res and (" → " .. res) or ""))
    else
      out(("    would %s (not simulated, skipped)\n"):format(e.summary))
    end
  end
  function handlers.step_end(e)
    if fancy then host.ticker_stop(); M.live = nil end
    local d = duration.format(e.duration or 0)
    if quiet and (e.status == "ok" or e.status == "skipped") then return end
    if e.status == "ok" then
      out(("  %s %s %s(%s%s%s)%s\n"):format(C.ok, e.step, C.dim, d,
        (e.attempts or 1) > 1 and (", " .. e.attempts .. " attempts") or "",
        e.fallback and (", its fallback: '%s' was skipped"):format(e.needs) or "", C.reset))
    elseif e.status == "skipped" then
      out(("  %s %s skipped%s\n"):format(C.skip, e.step,
        e.reason == "when" and " (its when condition is false)" or e.reason == "operator" and " (by the operator)"
        or e.reason == "needs" and (" (it needs '%s', which was skipped)"):format(e.needs) or ""))
    elseif e.status == "aborted" then
      out(("  %s %s: aborted by the operator\n"):format(C.fail, e.step))
    elseif e.status == "interrupted" then
      out(("  %s %s interrupted after %s\n"):format(C.fail, e.step, d))
    else
      out(("  %s %s %s after %s: %s\n"):format(C.fail, e.step, e.status, d, error_text(e.error)))
    end
  end
  function handlers.preview_start(e) out(("    preview of %s (dry run):\n"):format(e.step)) end
  function handlers.preview_end(e)
    if e.status ~= "ok" then out(("    preview failed: %s\n"):format(error_text(e.error))) end
  end
  function handlers.undo_start(e) out(("  undo %s\n"):format(e.step)) end
  function handlers.undo_end(e)
    out(("  %s undo %s%s\n"):format(e.status == "ok" and C.ok or C.fail, e.step,
      e.status == "ok" and "" or (": " .. error_text(e.error))))
  end
  function handlers.run_end(e)
    local status = e.signal and ("interrupted by " .. e.signal) or e.status
    out(("\n%s%s%s: %d ok, %d failed, %d skipped in %s%s\n"):format(C.bold,
      e.mode == "dry-run" and "dry run " .. status or status, C.reset, e.ok, e.failed, e.skipped,
      duration.format(e.duration), e.mode == "dry-run" and " (nothing was changed)" or ""))
    if e.exit_code == require("runbook.exit").drift then
      out("The run left the plan, and stopped before that effect: make a new plan (runbook plan).\n")
    elseif e.status ~= "ok" and e.status ~= "locked" and e.mode ~= "dry-run" then
      out(("To continue where it stopped: runbook resume %s\n"):format(e.run_id))
    end
  end
  return function(e)
    local h = handlers[e.event]
    if h then h(e) end
  end
end

--- JSON Lines: one object per event on `stream`.
function M.json(stream)
  local out = writer(stream)
  local json_line = require("runbook.events").json_line
  return function(e) out(json_line(e) .. "\n") end
end

return M
