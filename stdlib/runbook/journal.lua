--- The run journal: every event of a run as JSON Lines in
-- $RUNBOOK_STATE_DIR/runs/<run-id>.jsonl, fsync'd at each step boundary and
-- after each performed effect, so a run killed at any moment leaves a journal
-- that is valid up to its last complete line. Also reads journals back into
-- the run summaries that resume, history and report use.
local host = require "runbook.host"

local M = {}

--- The state directory: RUNBOOK_STATE_DIR, else $XDG_STATE_HOME/runbook,
-- else ~/.local/state/runbook.
function M.state_dir()
  local d = os.getenv("RUNBOOK_STATE_DIR")
  if d and d ~= "" then return d end
  local xdg = os.getenv("XDG_STATE_HOME")
  if xdg and xdg ~= "" then return xdg .. "/runbook" end
  return (os.getenv("HOME") or ".") .. "/.local/state/runbook"
end

--- Make `dir` and its parents, each one this creates 0700 (no other user
-- reads a journal or a lock); raises naming the directory on failure.
function M.mkdirs(dir)
  local lfs = require "lfs"
  local path = dir:sub(1, 1) == "/" and "" or "."
  for part in dir:gmatch("[^/]+") do
    path = path .. "/" .. part
    if lfs.attributes(path, "mode") ~= "directory" then
      local ok, err = host.mkdir_private(path)
      if not ok and lfs.attributes(path, "mode") ~= "directory" then
        error(("cannot create state directory %s: %s"):format(path, err), 0)
      end
    end
  end
  return dir
end

function M.runs_dir() return M.state_dir() .. "/runs" end

function M.path(run_id) return M.runs_dir() .. "/" .. run_id .. ".jsonl" end

-- Events after which the journal is fsync'd: a crash right after one of them
-- must not lose it. The run's and a step's start need no sync of their own:
-- lost, the run or step reads as not started, and the fsync after the first
-- performed effect or step end carries them to disk anyway. Logs may be lost
-- with the step they belong to.
local SYNC = { step_end = true, undo_end = true, run_end = true }

local codec = require("cjson").new()
local encode = require("runbook.events").encode
M.encode = encode

--- Open the journal of `run_id` for appending; returns an event sink.
-- Raises with the path when the state directory cannot be written.
function M.sink(run_id)
  M.mkdirs(M.runs_dir())
  local path = M.path(run_id)
  local j, err = host.journal_open(path)
  if not j then error(err, 0) end
  return function(e)
    j:write(host.redact(encode(e)) .. "\n")
    if SYNC[e.event] or (e.event == "effect" and e.decision == "performed") then j:sync() end
    if e.event == "run_end" then j:close() end
  end, path
end

-- cjson decodes every number as a float; the run wrote integers as integers,
-- and a restored output must read back exactly as the step returned it.
local function integers(v)
  if type(v) == "table" then
    for k, x in pairs(v) do v[k] = integers(x) end
  elseif math.type(v) == "float" then
    return math.tointeger(v) or v
  end
  return v
end

--- The events of a run, in order. A torn last line (the process died while
-- writing it) is dropped; a bad line anywhere else is an error naming it.
function M.read(run_id)
  local path = M.path(run_id)
  local f = io.open(path, "rb")
  if not f then return nil, ("no run %s (looked for %s)"):format(run_id, path) end
  local text = f:read("a")
  f:close()
  local events, n = {}, 0
  for line, nl in text:gmatch("([^\n]*)(\n?)") do
    if line ~= "" then
      n = n + 1
      local ok, e = pcall(codec.decode, line)
      if ok and type(e) == "table" then
        events[#events + 1] = integers(e)
      elseif nl == "" then
        break -- torn last line
      else
        return nil, ("%s:%d: not a journal line: %s"):format(path, n, tostring(e))
      end
    end
  end
  if not events[1] or events[1].event ~= "run_start" then
    return nil, ("%s: the journal does not start with a run_start event"):format(path)
  end
  return events
end

--- Run ids in the state directory, newest first.
function M.list()
  local lfs = require "lfs"
  local ids = {}
  if lfs.attributes(M.runs_dir(), "mode") ~= "directory" then return ids end
  for f in lfs.dir(M.runs_dir()) do
    local id = f:match("^(.+)%.jsonl$")
    if id then ids[#ids + 1] = id end
  end
  -- An id starts with its second; two runs in one second are ordered by the
  -- millisecond start time on their journal's first line.
  local started = {}
  local function start_time(id)
    if not started[id] then
      local f = io.open(M.path(id))
      local ok, e = pcall(require("cjson").decode, f and f:read("l") or "")
      if f then f:close() end
      started[id] = ok and type(e) == "table" and type(e.time) == "string" and e.time or ""
    end
    return started[id]
  end
  table.sort(ids, function(a, b)
    local sa, sb = a:match("^[^-]+"), b:match("^[^-]+")
    if sa ~= sb then return sa > sb end
    return start_time(a) > start_time(b)
  end)
  return ids
end

local function parse_time(iso)
  local y, mo, d, h, mi, s, ms = tostring(iso):match("^(%d+)-(%d+)-(%d+)T(%d+):(%d+):(%d+)%.?(%d*)Z$")
  if not y then return nil end
  -- os.time reads a local time; the difference to UTC cancels in durations.
  return os.time { year = y, month = mo, day = d, hour = h, min = mi, sec = s } + (tonumber(ms) or 0) / 1000
end
M.parse_time = parse_time

--- Fold a run's events into a summary:
-- {start, last_end, status, segments, steps = {[name] = state}, order = {state...}}
-- where a segment is one process's part of the run (the first run, then each
-- resume) and a step state is {name, status, outputs, error, effects_performed,
-- started, duration}. A step started without an end was cut off: "interrupted".
function M.summarize(events)
  local s = { start = events[1], steps = {}, segments = {}, timeline = {} }
  local seg, current, undoing
  for _, e in ipairs(events) do
    local ev = e.event
    if ev == "run_start" then
      seg = { start = e, steps = {} }
      s.segments[#s.segments + 1] = seg
      current = nil
    elseif ev == "step_start" then
      current = { name = e.step, index = e.index, status = "interrupted", started = e.time,
        effects = {}, logs = {}, description = e.description, segment = #s.segments }
      s.steps[e.step] = current
      s.timeline[#s.timeline + 1] = current
    elseif ev == "step_end" then
      local st = s.steps[e.step]
      if not st or st ~= current then
        st = { name = e.step, index = e.index, started = e.time, effects = {}, logs = {}, segment = #s.segments }
        s.steps[e.step] = st
        s.timeline[#s.timeline + 1] = st
      end
      st.status, st.duration, st.outputs, st.error = e.status, e.duration, e.outputs, e.error
      st.attempts, st.reason = e.attempts, e.reason
      current = nil
    elseif ev == "effect" then
      local target = current or undoing
      if target then target.effects[#target.effects + 1] = e end
    elseif ev == "log" then
      if current then current.logs[#current.logs + 1] = e end
    elseif ev == "undo_start" then
      undoing = { name = e.step, undo = true, started = e.time, effects = {}, logs = {}, status = "interrupted" }
      s.timeline[#s.timeline + 1] = undoing
    elseif ev == "undo_end" then
      if undoing then undoing.status, undoing.duration, undoing.error = e.status, e.duration, e.error end
      undoing = nil
    elseif ev == "run_end" then
      seg.finish = e
      s.last_end = e
    end
  end
  local last_seg = s.segments[#s.segments]
  s.status = last_seg.finish and last_seg.finish.status or "killed"
  s.exit_code = last_seg.finish and last_seg.finish.exit_code
  local t0, t1 = parse_time(s.start.time), parse_time((last_seg.finish or events[#events]).time)
  s.duration = t0 and t1 and (t1 - t0) or nil
  return s
end

return M
