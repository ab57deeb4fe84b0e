--- The run journal: every event of a run as JSON Lines in
-- $RUNBOOK_STATE_DIR/runs/<run-id>.jsonl, fsync'd before each performed effect
-- and at the ends that follow one, so a run killed at any moment leaves a
-- journal that is valid up to its last complete line and loses no effect.
-- Also reads journals back into the run summaries that resume, history and
-- report use.
local host = require("runbook.host")

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
-- performed: that is its point (a batch's intents, a pipeline's or a
-- transaction's, by one fsync before the batch takes place: rb_gate_deferred).
-- An outcome rides along with the next intent's sync or its step's end: lost
-- in a crash in between, its effect reads as unknown, which resume checks or
-- asks about, never as not done; that halves the fsyncs of a step of many
-- small writes. The end of a step, an undo or the run is synced when it
-- performed an effect (a crash right after must not lose it). Every other line rides along with
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
      if e.event == "intent" then
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

--- The first line of a run's journal, decoded (its run_start when the journal
-- is sound), or nil.
local function first_event(id)
  local f = io.open(M.path(id), "rb")
  if not f then return nil end
  local line = f:read("l")
  f:close()
  local ok, e = pcall(codec.decode, line or "")
  return ok and type(e) == "table" and e or nil
end

--- Run ids in the state directory, newest first.
function M.list()
  local lfs = require("lfs")
  local ids = {}
  if lfs.attributes(M.runs_dir(), "mode") ~= "directory" then return ids end
  for f in lfs.dir(M.runs_dir()) do
    local id = f:match("^(.+)%.jsonl$")
    if id then ids[#ids + 1] = id end
  end
  -- An id starts with its second: sorted as strings, without a Lua comparator
  -- (10,000 runs sort in milliseconds). Two runs in one second are then
  -- ordered by the millisecond start time on their journal's first line.
  table.sort(ids)
  local n = #ids
  for i = 1, n // 2 do ids[i], ids[n + 1 - i] = ids[n + 1 - i], ids[i] end
  local function start_time(id)
    local e = first_event(id)
    return e and type(e.time) == "string" and e.time or ""
  end
  local i = 1
  while i <= n do
    local second, j = ids[i]:match("^[^-]+"), i
    while j < n and ids[j + 1]:match("^[^-]+") == second do j = j + 1 end
    if j > i then
      local group, started = table.move(ids, i, j, 1, {}), {}
      for _, id in ipairs(group) do started[id] = start_time(id) end
      table.sort(group, function(a, b)
        if started[a] ~= started[b] then return started[a] > started[b] end
        return a > b
      end)
      table.move(group, 1, #group, i, ids)
    end
    i = j + 1
  end
  return ids
end

--- True when run `id` ran runbook `name`, told from its journal's first line
-- alone; a line without the name's JSON text is not even decoded.
function M.ran(id, name)
  local f = io.open(M.path(id), "rb")
  local line = f and f:read("l")
  if f then f:close() end
  if not line or not line:find(codec.encode(name), 1, true) then return false end
  local ok, e = pcall(codec.decode, line)
  return ok and type(e) == "table" and e.event == "run_start" and e.runbook == name
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

-- A journal up to this size is read whole for its history row, and checked
-- line by line; a larger one (a step of 100,000 effects) by its first line,
-- its last lines and the lines that start a resume.
M.WHOLE = 1024 * 1024
local TAIL, CHUNK = 64 * 1024, 1024 * 1024

local function checked(line, path, where)
  local ok, e = pcall(codec.decode, line)
  local bad = not ok and "not JSON: " .. tostring(e):gsub("^.-: ", "") or require("runbook.schema").check(e)
  if bad then return nil, ("%s:%s: not a valid journal line (%s)"):format(path, where, bad) end
  return integers(e)
end

--- How many times the run started (1 + its resumes): the lines of the
-- journal that are run_start events, found without decoding the others.
local function count_starts(f)
  local n, carry = 0, ""
  f:seek("set", 0)
  while true do
    local chunk = f:read(CHUNK)
    if not chunk then break end
    local text = carry .. chunk
    local whole = text:match("^.*\n") or ""
    carry = text:sub(#whole + 1)
    local at = whole:find('"run_start"', 1, true)
    while at do
      local from = at
      while from > 1 and whole:byte(from - 1) ~= 10 do from = from - 1 end
      local to = whole:find("\n", at, true)
      local ok, e = pcall(codec.decode, whole:sub(from, to - 1))
      if ok and type(e) == "table" and e.event == "run_start" then n = n + 1 end
      at = whole:find('"run_start"', to, true)
    end
  end
  return n
end

--- A run as history lists it, from its events (all of them read already):
-- {start (its run_start), status, duration, resumed (how many times)}.
function M.row_of(events)
  local s = M.summarize(events)
  return { start = s.start, status = s.status, duration = s.duration, resumed = #s.segments - 1 }
end

--- The same from the journal of `run_id`, reading no more of it than it
-- must (see M.WHOLE); nil and a message naming the file (and line).
function M.row(run_id)
  local path = M.path(run_id)
  local size = require("lfs").attributes(path, "size")
  if not size or size <= M.WHOLE then
    local events, err = M.read(run_id)
    if not events then return nil, err end
    return M.row_of(events)
  end
  local f, oerr = io.open(path, "rb")
  if not f then return nil, ("%s: cannot read the journal: %s"):format(path, oerr) end
  local start, err = checked(f:read("l") or "", path, 1)
  if start and start.event ~= "run_start" then
    start, err = nil, ("%s:1: the journal does not start with a run_start event"):format(path)
  end
  local last
  if start then
    f:seek("set", size - TAIL)
    local tail = f:read("a"):match("\n(.*\n)") or ""   -- whole lines only: a torn last line is dropped
    local line = tail:match("([^\n]+)\n$")
    last, err = checked(line or "", path, "last line")
  end
  local segments = last and count_starts(f)
  f:close()
  if not last then return nil, err end
  local t0, t1 = parse_time(start.time), parse_time(last.time)
  return { start = start, status = last.event == "run_end" and last.status or "killed", resumed = segments - 1,
    duration = t0 and t1 and math.max(0, t1 - t0) or nil }
end

return M
