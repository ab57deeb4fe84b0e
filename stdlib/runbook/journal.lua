--- The run journal: every event of a run as JSON Lines in
-- $RUNBOOK_STATE_DIR/runs/<run-id>.jsonl, fsync'd around each performed effect
-- and at the ends that follow one, so a run killed at any moment leaves a
-- journal that is valid up to its last complete line and loses no effect.
-- Also reads journals back into the run summaries that resume, history and
-- report use.
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
  if host.mkdir_private(dir) then return dir end -- the usual case: it is there, or only it was missing
  local path = dir:sub(1, 1) == "/" and "" or "."
  for part in dir:gmatch("[^/]+") do
    path = path .. "/" .. part
    local ok, err = host.mkdir_private(path)
    if not ok then error(("cannot create state directory %s: %s"):format(path, err), 0) end
  end
  return dir
end

function M.runs_dir() return M.state_dir() .. "/runs" end

function M.path(run_id) return M.runs_dir() .. "/" .. run_id .. ".jsonl" end

-- When the journal is fsync'd. An intent is synced before its effect is
-- performed (that is its point), and a performed effect's outcome after it.
-- The end of a step, an undo or the run is synced when it performed an effect
-- (a crash right after must not lose it). Every other line rides along with
-- the next sync: lost in a crash, it belonged to a step or run that changed
-- nothing, which then reads as not finished, and its resume changes nothing
-- either. So a run that performs nothing (a dry run, a check) pays no fsync.
local ENDS = { step_end = "step", undo_end = "step", run_end = "run" }

local codec = require("cjson").new()
codec.decode_max_depth(100)
local encode = require("runbook.events").encode

local function lfs_mode(path) return require("lfs").attributes(path, "mode") end
M.encode = encode

--- Open the journal of `run_id` for appending; returns an event sink and
-- the path. A torn last line left by a crash is cut off first (and the cut
-- journaled). Raises with the path when the state directory cannot be
-- written. When a write fails (a full disk), the journal is cut back to its
-- last whole line, every later event is dropped and `M.failure` holds the
-- error; the sink raises it on the next intent, so the run stops before its
-- next effect.
function M.sink(run_id)
  M.mkdirs(M.runs_dir())
  local path = M.path(run_id)
  local j, dropped, busy = host.journal_open(path)
  if not j then error(busy and { message = dropped, code = "locked" } or dropped, 0) end
  M.failure = nil
  local repaired = dropped > 0 and dropped or nil
  local closed = false
  local performed = {}   -- step = / run = true: an effect since that began
  return function(e)
    if closed then return end   -- after run_end (a library announcing itself late)
    if M.failure then
      if e.event == "intent" then error(M.failure, 0) end
      return
    end
    local ok, err = pcall(function()
      if repaired and e.event == "run_start" then
        j:write(encode { event = "journal_repaired", time = e.time, dropped = repaired } .. "\n")
        repaired = nil
      end
      if e.event == "intent" then e.key = ("%s/%s/%d"):format(run_id, e.step or "", e.n or 0) end
      j:write(host.redact(encode(e)) .. "\n")
      local ends = ENDS[e.event]
      if e.event == "intent" or (e.event == "effect" and e.decision == "performed") then
        performed.step, performed.run = true, true
        j:sync()
      elseif ends and performed[ends] then
        j:sync()
      end
      if ends then performed.step = nil end
    end)
    if not ok then
      M.failure = err
      pcall(j.close, j)
      if e.event == "intent" then error(err, 0) end
    end
    if e.event == "run_end" then j:close(); closed = true end
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

--- The events of a run, in order, each checked against runbook.schema. A
-- torn last line (the process died while writing it) is dropped; anything
-- else wrong gives nil and one message naming the file and the line.
function M.read(run_id)
  local path = M.path(run_id)
  local f, oerr = io.open(path, "rb")
  if not f then
    if lfs_mode(path) then return nil, ("%s: cannot read the journal: %s"):format(path, oerr) end
    return nil, ("no run %s (looked for %s)"):format(run_id, path)
  end
  local text, rerr = f:read("a")
  f:close()
  if not text then return nil, ("%s: cannot read the journal: %s"):format(path, tostring(rerr)) end
  local events, n = {}, 0
  for line, nl in text:gmatch("([^\n]*)(\n?)") do
    if line == "" and nl == "" then break end
    n = n + 1
    local ok, e = pcall(codec.decode, line)
    local bad = not ok and "not JSON: " .. tostring(e):gsub("^.-: ", "") or require("runbook.schema").check(e)
    if not bad then
      events[#events + 1] = integers(e)
    elseif nl == "" then
      break -- torn last line
    else
      return nil, ("%s:%d: not a valid journal line (%s)"):format(path, n, bad)
    end
  end
  if not events[1] then return nil, ("%s: the journal is empty"):format(path) end
  if events[1].event ~= "run_start" then
    return nil, ("%s:1: the journal does not start with a run_start event"):format(path)
  end
  return events
end

--- True while a process holds the journal of `run_id` (the run is running).
function M.running(run_id) return host.lock_held(M.path(run_id)) end

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
      local ok, e = pcall(codec.decode, f and f:read("l") or "")
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

--- The effects of a step state whose outcome is unknown: an intent journaled
-- with no outcome after it (the process died in between), or an outcome the
-- gate marked unknown (interrupted or timed out while in flight). In order.
function M.unknown_effects(st)
  local out = {}
  for _, i in pairs(st.intents) do out[#out + 1] = i end
  table.sort(out, function(a, b) return a.seq < b.seq end)
  for _, e in ipairs(st.effects) do
    if e.unknown then out[#out + 1] = e end
  end
  return out
end

--- Fold a run's events into a summary:
-- {start, last_end, status, segments, steps = {[name] = state}, order = {state...}}
-- where a segment is one process's part of the run (the first run, then each
-- resume) and a step state is {name, status, outputs, error, effects, unknown
-- (see unknown_effects), started, duration, answers (the operator's, at its
-- prompt), previews ({started, status, error, effects, logs} each)}. A step
-- started without an end was cut off: "interrupted". `contexts` lists the
-- Kubernetes contexts the run connected to (kubernetes_context events).
function M.summarize(events)
  local s = { start = events[1], steps = {}, segments = {}, timeline = {}, contexts = {} }
  local seg, current, undoing, previewing
  -- A step's prompt (its answers and previews) comes before its step_start.
  local asked = { answers = {}, previews = {} }
  local function new_step(e, status)
    local st = { name = e.step, index = e.index, status = status, started = e.time, effects = {}, logs = {},
      intents = {}, description = e.description, segment = #s.segments, answers = asked.answers,
      previews = asked.previews }
    asked = { answers = {}, previews = {} }
    s.steps[e.step] = st
    s.timeline[#s.timeline + 1] = st
    return st
  end
  for _, e in ipairs(events) do
    local ev = e.event
    if ev == "run_start" then
      seg = { start = e, steps = {} }
      s.segments[#s.segments + 1] = seg
      current = nil
    elseif ev == "step_start" then
      current = new_step(e, "interrupted")
    elseif ev == "step_end" then
      local st = s.steps[e.step]
      if not st or st ~= current then st = new_step(e) end
      st.status, st.duration, st.outputs, st.error = e.status, e.duration, e.outputs, e.error
      st.attempts, st.reason = e.attempts, e.reason
      current = nil
    elseif ev == "intent" then
      local target = previewing or current or undoing
      if target then target.intents[e.seq] = e end
    elseif ev == "effect" then
      local target = previewing or current or undoing
      if target then
        target.effects[#target.effects + 1] = e
        if e.seq then target.intents[e.seq] = nil end
      end
    elseif ev == "log" then
      local target = previewing or current
      if target then target.logs[#target.logs + 1] = e end
    elseif ev == "answer" then
      asked.answers[#asked.answers + 1] = e
    elseif ev == "preview_start" then
      previewing = { started = e.time, status = "interrupted", effects = {}, logs = {}, intents = {} }
      asked.previews[#asked.previews + 1] = previewing
    elseif ev == "preview_end" then
      if previewing then previewing.status, previewing.error, previewing.ended = e.status, e.error, e.time end
      previewing = nil
    elseif ev == "kubernetes_context" then
      s.contexts[#s.contexts + 1] = e
    elseif ev == "undo_start" then
      undoing = { name = e.step, undo = true, started = e.time, effects = {}, logs = {}, intents = {},
        status = "interrupted" }
      s.timeline[#s.timeline + 1] = undoing
    elseif ev == "undo_end" then
      if undoing then undoing.status, undoing.duration, undoing.error = e.status, e.duration, e.error end
      undoing = nil
    elseif ev == "run_end" then
      seg.finish = e
      s.last_end = e
    end
  end
  for _, st in ipairs(s.timeline) do st.unknown = M.unknown_effects(st) end
  local last_seg = s.segments[#s.segments]
  s.status = last_seg.finish and last_seg.finish.status or "killed"
  s.exit_code = last_seg.finish and last_seg.finish.exit_code
  local t0, t1 = parse_time(s.start.time), parse_time((last_seg.finish or events[#events]).time)
  -- The wall clock may have stepped back during the run: a duration is never below 0.
  s.duration = t0 and t1 and math.max(0, t1 - t0) or nil
  return s
end

return M
