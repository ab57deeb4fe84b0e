--- `runbook history` and `runbook report`: past runs read back from their
-- journals. A report is a run's timeline for a postmortem, in Markdown that
-- reads well pasted into an incident document, or in JSON.
local duration = require "duration"
local host = require "runbook.host"
local journal = require "runbook.journal"

local M = {}

local function dur(s) return s and duration.format(s) or "-" end

--- The summary's status, with "running" for a run whose process still holds its lock.
local function live_status(s)
  if s.status ~= "killed" then return s.status end
  return journal.running(s.start.run_id) and "running" or "killed"
end

function M.history(runbook, limit, as_json)
  local events_mod = require "runbook.events"
  local shown = 0
  if not as_json then
    print(("%-26s %-24s %-20s %9s %-7s %-11s %s"):format("RUN ID", "RUNBOOK", "STARTED", "DURATION", "MODE",
      "STATUS", "WHO"))
  end
  for _, id in ipairs(journal.list()) do
    if shown >= limit then break end
    local events, err = journal.read(id)
    if not events and not runbook then
      -- Listed and marked, never a reason to stop listing the others.
      io.stderr:write(host.redact("runbook: history: " .. err .. "\n"))
      if as_json then
        print(events_mod.json_line { event = "run", time = events_mod.iso8601(host.wallclock()), run_id = id,
          status = "unreadable", error = err })
      else
        print(("%-26s %-24s %-20s %9s %-7s %-11s %s"):format(id, "?", "", "-", "", "unreadable", ""))
      end
      shown = shown + 1
    elseif events and (not runbook or events[1].runbook == runbook) then
      local s = journal.summarize(events)
      local st = s.start
      local row = { run_id = id, runbook = st.runbook, started = st.time, duration = s.duration, mode = st.mode,
        status = live_status(s), user = st.user, host = st.host, resumed = #s.segments - 1 }
      if as_json then
        row.event, row.time = "run", st.time
        print(events_mod.json_line(row))
      else
        print(("%-26s %-24s %-20s %9s %-7s %-11s %s@%s"):format(id, row.runbook, (row.started or ""):sub(1, 19),
          dur(row.duration), row.mode, row.status .. (row.resumed > 0 and "*" or ""), row.user, row.host))
      end
      shown = shown + 1
    end
  end
  if shown == 0 and not as_json then
    print(("(no runs%s in %s)"):format(runbook and (" of " .. runbook) or "", journal.runs_dir()))
  end
  return 0
end

--- The run as a plain table (the JSON report, and what Markdown is made from).
local function document(run_id)
  local events, err = journal.read(run_id)
  if not events then return nil, err end
  local s = journal.summarize(events)
  local st = s.start
  local doc = { run_id = run_id, runbook = st.runbook, version = st.version, file = st.file, path = st.path,
    sha256 = st.sha256, mode = st.mode, status = live_status(s), exit_code = s.exit_code, started = st.time,
    duration = s.duration, user = st.user, host = st.host, pid = st.pid, params = st.params or {},
    segments = {}, steps = {}, plan = st.mode == "dry-run" and {} or nil }
  for _, seg in ipairs(s.segments) do
    doc.segments[#doc.segments + 1] = { started = seg.start.time, resume_at = seg.start.resume_at,
      pid = seg.start.pid, status = seg.finish and seg.finish.status or "killed",
      exit_code = seg.finish and seg.finish.exit_code }
  end
  for _, t in ipairs(s.timeline) do
    local step = { kind = t.undo and "undo" or "step", name = t.name, index = t.index, status = t.status,
      started = t.started, duration = t.duration, attempts = t.attempts, reason = t.reason, outputs = t.outputs,
      error = t.error, segment = t.segment, effects = {}, logs = {}, unknown = {} }
    for _, e in ipairs(t.unknown) do
      step.unknown[#step.unknown + 1] = { time = e.time, module = e.module, op = e.op, target = e.target,
        summary = e.summary, key = e.key }
    end
    for _, e in ipairs(t.effects) do
      step.effects[#step.effects + 1] = { time = e.time, module = e.module, op = e.op, target = e.target,
        summary = e.summary, decision = e.decision, ok = e.ok, result = e.result }
      if doc.plan then doc.plan[#doc.plan + 1] = step.effects[#step.effects] end
    end
    for _, l in ipairs(t.logs) do step.logs[#step.logs + 1] = { time = l.time, level = l.level, message = l.message } end
    doc.steps[#doc.steps + 1] = step
  end
  return doc
end

--- An event's time (RFC 3339, UTC) as this machine's local time with its date
-- and UTC offset: "2026-12-06 11:12:17.610 +01:00".
local function stamp(iso)
  if type(iso) ~= "string" then return iso == nil and "" or tostring(iso) end
  local y, mo, d, h, mi, sec, ms = iso:match("^(%d+)-(%d+)-(%d+)T(%d+):(%d+):(%d+)%.?(%d*)Z$")
  if not y then return iso end
  local t = os.time { year = y, month = mo, day = d, hour = h, min = mi, sec = sec }
  t = t + os.difftime(t, os.time(os.date("!*t", t)))   -- os.time read the fields as local time
  local z = os.date("%z", t)
  return os.date("%Y-%m-%d %H:%M:%S", t) .. (ms ~= "" and ("." .. ms) or "") .. " " .. z:sub(1, 3) .. ":" .. z:sub(4)
end

-- A Mermaid Gantt chart of the steps (it renders on GitHub and GitLab), in UTC.
local function gantt(doc, add)
  add("```mermaid")
  add("gantt")
  add("  title %s: %s (UTC)", doc.run_id, (doc.runbook or ""):gsub("[:#;]", " "))
  add("  dateFormat YYYY-MM-DDTHH:mm:ss.SSS")
  add("  axisFormat %H:%M:%S")
  add("  section Steps")
  for i, st in ipairs(doc.steps) do
    local start = tostring(st.started or doc.started or ""):gsub("Z$", "")
    local tag = st.status == "ok" and "done, " or (st.status == "failed" or st.status == "interrupted") and "crit, " or ""
    local name = ("%s%s (%s)"):format(st.kind == "undo" and "undo " or (st.index and (st.index .. ". ") or ""),
      tostring(st.name), tostring(st.status)):gsub("[:#;]", " ")
    local ms = math.max(1, math.floor((tonumber(st.duration) or 0) * 1000 + 0.5))
    add("  %s :%ss%d, %s, %dms", name, tag, i, start, ms)
  end
  add("```")
end

-- Markdown table cells: no pipes or newlines inside.
local function cell(v)
  return (tostring(v == nil and "" or v):gsub("|", "\\|"):gsub("\n", " "))
end

local function code_span(v)
  local s = cell(v)
  return s:find("`", 1, true) and ("`` " .. s .. " ``") or ("`" .. s .. "`")
end

local function effect_line(e)
  local verb = e.decision == "performed" and (e.ok == false and "failed" or "done")
    or e.decision == "simulated" and "would" or "would (not simulated)"
  local res = type(e.result) == "string" and e.result ~= "" and (" → " .. e.result:gsub("\n", " ")) or ""
  return ("- %s **%s** %s (%s %s %s)%s"):format(stamp(e.time), verb, e.summary or "", e.module, e.op,
    code_span(e.target or ""), res)
end

local function markdown(doc)
  local out = {}
  local function add(fmt, ...) out[#out + 1] = select("#", ...) > 0 and fmt:format(...) or fmt end
  add("# Run %s: %s", doc.run_id, doc.runbook)
  add("")
  add("| | |")
  add("|---|---|")
  add("| Status | **%s**%s |", doc.status, doc.exit_code and (" (exit " .. doc.exit_code .. ")") or "")
  add("| Runbook | %s%s |", cell(doc.runbook), doc.version and (" version " .. cell(doc.version)) or "")
  add("| File | %s (sha256 %s) |", code_span(doc.path or doc.file), code_span(doc.sha256 or "?"))
  add("| Mode | %s |", doc.mode == "dry-run" and "dry run (nothing was changed)" or doc.mode)
  add("| Started | %s |", stamp(doc.started))
  add("| Duration | %s |", dur(doc.duration))
  add("| By | %s@%s (pid %s) |", cell(doc.user), cell(doc.host), doc.pid)
  for i = 2, #doc.segments do
    local seg = doc.segments[i]
    add("| Resumed | %s at step %s (pid %s): %s |", stamp(seg.started), cell(seg.resume_at or "(none left)"), seg.pid, seg.status)
  end
  add("")
  add("## Parameters")
  add("")
  local names = {}
  for k in pairs(doc.params) do names[#names + 1] = k end
  table.sort(names)
  if #names == 0 then add("(none)") else
    add("| Name | Value |")
    add("|---|---|")
    for _, k in ipairs(names) do add("| %s | %s |", cell(k), code_span(doc.params[k])) end
  end
  add("")
  add("## Timeline")
  add("")
  add("| Time | Step | Status | Duration | Effects |")
  add("|---|---|---|---|---|")
  for _, st in ipairs(doc.steps) do
    add("| %s | %s%s | %s | %s | %d |", stamp(st.started), st.kind == "undo" and "undo " or (st.index and (st.index .. ". ") or ""),
      cell(st.name), st.status, dur(st.duration), #st.effects)
  end
  if #doc.steps > 0 then
    add("")
    gantt(doc, add)
  end
  for _, st in ipairs(doc.steps) do
    add("")
    add("### %s%s: %s", st.kind == "undo" and "Undo " or (st.index and (st.index .. ". ") or ""), st.name, st.status)
    add("")
    local facts = { "started " .. stamp(st.started), dur(st.duration) }
    if st.attempts and st.attempts > 1 then facts[#facts + 1] = st.attempts .. " attempts" end
    if st.reason then facts[#facts + 1] = "reason: " .. st.reason end
    if st.segment and st.segment > 1 then facts[#facts + 1] = "after resume " .. (st.segment - 1) end
    add("%s", table.concat(facts, " · "))
    if #st.effects > 0 then
      add("")
      add("Effects:")
      add("")
      for _, e in ipairs(st.effects) do add("%s", effect_line(e)) end
    end
    if #st.unknown > 0 then
      add("")
      add("In flight when the run stopped (outcome unknown; see `resume --on-unknown`):")
      add("")
      for _, e in ipairs(st.unknown) do
        add("- %s **unknown** %s (%s %s %s)", stamp(e.time), e.summary or "", e.module, e.op, code_span(e.target or ""))
      end
    end
    if #st.logs > 0 then
      add("")
      add("Log:")
      add("")
      add("```")
      for _, l in ipairs(st.logs) do add("%s %-5s %s", stamp(l.time), (l.level or "info"):upper(), l.message) end
      add("```")
    end
    if st.error then
      add("")
      add("Error: %s%s", st.error.message or "?", st.error.where and (" (at " .. code_span(st.error.where) .. ")") or "")
    end
  end
  if doc.plan then
    add("")
    add("## Dry-run plan")
    add("")
    if #doc.plan == 0 then add("The run would change nothing.") end
    for i, e in ipairs(doc.plan) do
      add("%d. %s %s%s", i, e.decision == "simulated" and "would" or "would (not simulated)", e.summary or "",
        type(e.result) == "string" and e.result ~= "" and (" → " .. e.result:gsub("\n", " ")) or "")
    end
  end
  add("")
  add("Journal: %s", code_span(journal.path(doc.run_id)))
  return table.concat(out, "\n") .. "\n"
end

--- The report of `run_id` as text in `fmt` ("markdown" or "json"), or nil and a message.
function M.report(run_id, fmt)
  local doc, err = document(run_id)
  if not doc then return nil, err end
  if fmt == "json" then return journal.encode(doc) .. "\n" end
  return markdown(doc)
end

return M
