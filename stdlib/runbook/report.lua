--- `runbook history` and `runbook report`: past runs read back from their
-- journals. A report is a run's timeline for a postmortem, in Markdown that
-- reads well pasted into an incident document, as a self-contained HTML page,
-- or in JSON.
local duration = require("duration")
local host = require("runbook.host")
local journal = require("runbook.journal")

local M = {}

local function dur(s) return s and duration.format(s) or "-" end

--- The summary's status, with "running" for a run whose process still holds its lock.
local function live_status(s)
  if s.status ~= "killed" then return s.status end
  return journal.running(s.start.run_id) and "running" or "killed"
end

--- One run's line of history: from its `events` when given, else from
-- journal.row, which reads no more of the journal than it must; nil and a
-- message naming the file when the journal is unreadable.
function M.run_row(id, events)
  local r, err
  if events then r = journal.row_of(events) else r, err = journal.row(id) end
  if not r then return nil, err end
  local st = r.start
  return { run_id = id, runbook = st.runbook, started = st.time, duration = r.duration, mode = st.mode,
    status = live_status(r), user = st.user, host = st.host, resumed = r.resumed,
    unattended = type(st.request) == "table" and st.request.terminal == false or nil }
end

--- Past runs, newest first: the newest `limit` (of `runbook` only, when
-- given). Reads only the runs it shows, and of each no more than it must
-- (journal.row); the filter looks at each journal's first line alone.
function M.history(runbook, limit, as_json)
  local events_mod = require("runbook.events")
  local shown = 0
  if not as_json then
    print(("%-26s %-24s %-20s %9s %-7s %-11s %s"):format("RUN ID", "RUNBOOK", "STARTED", "DURATION", "MODE",
      "STATUS", "WHO"))
  end
  for _, id in ipairs(journal.list()) do
    if shown >= limit then break end
    if not runbook or journal.ran(id, runbook) then
      local row, err = M.run_row(id)
      if not row then
        -- Listed and marked, never a reason to stop listing the others.
        io.stderr:write(host.redact("runbook: history: " .. err .. "\n"))
        if as_json then
          print(events_mod.json_line { event = "run", time = events_mod.iso8601(host.wallclock()), run_id = id,
            status = "unreadable", error = err })
        else
          print(("%-26s %-24s %-20s %9s %-7s %-11s %s"):format(id, "?", "", "-", "", "unreadable", ""))
        end
      elseif as_json then
        row.event, row.time = "run", row.started
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

--- What an effect changed or would change, as the gate reported it: the
-- backend's own words (a string), or a Kubernetes write's diff
-- ("replicas 1 -> 12", its result's summary); nil when it said nothing.
local function change_text(result)
  if type(result) == "string" and result ~= "" then return (result:gsub("\n", " ")) end
  if type(result) == "table" and type(result.summary) == "string" then return result.summary end
end

local function effect_record(e)
  return { time = e.time, module = e.module, op = e.op, target = e.target, summary = e.summary,
    decision = e.decision, ok = e.ok, result = e.result, change = change_text(e.result) }
end

local function log_records(logs)
  local out = {}
  for _, l in ipairs(logs) do out[#out + 1] = { time = l.time, level = l.level, message = l.message } end
  return out
end

--- The Kubernetes contexts the run connected to, each once (a resume connects again).
local function kubernetes(contexts)
  local out, seen = {}, {}
  for _, c in ipairs(contexts) do
    local key = ("%s\0%s\0%s"):format(c.context, c.namespace, c.server)
    if not seen[key] then
      seen[key] = true
      out[#out + 1] = { time = c.time, context = c.context, namespace = c.namespace, cluster = c.cluster,
        server = c.server, user = c.user }
    end
  end
  return out
end

--- A step of the timeline as the report shows it, with what the operator
-- answered at its prompt and each preview they asked for.
local function step_record(t)
  local step = { kind = t.undo and "undo" or "step", name = t.name, index = t.index, status = t.status,
    started = t.started, duration = t.duration, attempts = t.attempts, reason = t.reason, outputs = t.outputs,
    error = t.error, segment = t.segment, effects = {}, logs = log_records(t.logs), unknown = {}, answers = {},
    previews = {} }
  for _, e in ipairs(t.unknown) do
    step.unknown[#step.unknown + 1] = { time = e.time, module = e.module, op = e.op, target = e.target,
      summary = e.summary, key = e.key }
  end
  for _, e in ipairs(t.effects) do step.effects[#step.effects + 1] = effect_record(e) end
  for _, a in ipairs(t.answers or {}) do
    step.answers[#step.answers + 1] = { time = a.time, asked = a.asked, answer = a.answer }
  end
  for _, p in ipairs(t.previews or {}) do
    local pv = { started = p.started, ended = p.ended, status = p.status, error = p.error, effects = {},
      logs = log_records(p.logs) }
    for _, e in ipairs(p.effects) do pv.effects[#pv.effects + 1] = effect_record(e) end
    step.previews[#step.previews + 1] = pv
  end
  return step
end

--- The run as a plain table (the JSON report, and what Markdown and HTML are made from).
local function document(run_id)
  local events, err = journal.read(run_id)
  if not events then return nil, err end
  local s = journal.summarize(events)
  local st = s.start
  local last = s.segments[#s.segments].finish
  local doc = { run_id = run_id, runbook = st.runbook, version = st.version, file = st.file, path = st.path,
    sha256 = st.sha256, mode = st.mode, status = live_status(s), exit_code = s.exit_code, started = st.time,
    ended = last and last.time, duration = s.duration, user = st.user, host = st.host, pid = st.pid,
    params = st.params_text or st.params or {}, values = st.params or {}, kubernetes = kubernetes(s.contexts),
    segments = {}, steps = {}, plan = st.mode == "dry-run" and {} or nil }
  for _, seg in ipairs(s.segments) do
    doc.segments[#doc.segments + 1] = { started = seg.start.time, resume_at = seg.start.resume_at,
      pid = seg.start.pid, status = seg.finish and seg.finish.status or "killed",
      exit_code = seg.finish and seg.finish.exit_code }
  end
  for _, t in ipairs(s.timeline) do
    local step = step_record(t)
    doc.steps[#doc.steps + 1] = step
    if doc.plan then table.move(step.effects, 1, #step.effects, #doc.plan + 1, doc.plan) end
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

-- ---- what Markdown and HTML say alike ------------------------------------------

local function step_label(st)
  return (st.kind == "undo" and "undo " or (st.index and (st.index .. ". ") or "")) .. tostring(st.name)
end

--- "done", "failed", "would" or "would (not simulated)".
local function verb(e)
  if e.decision == "performed" then return e.ok == false and "failed" or "done" end
  return e.decision == "simulated" and "would" or "would (not simulated)"
end

--- A step of many effects (a loop of small writes) shows its first and last
-- EFFECTS_SHOWN / 2 and, between them, how many more and what they did; the
-- journal and the JSON report keep every one. Calls show(e, i) for each
-- shown, and elided(count, what) once where the others were.
M.EFFECTS_SHOWN = 20
local function each_shown(effects, show, elided)
  local n, half = #effects, M.EFFECTS_SHOWN // 2
  if n <= M.EFFECTS_SHOWN then
    for i, e in ipairs(effects) do show(e, i) end
    return
  end
  for i = 1, half do show(effects[i], i) end
  local counts, what = {}, {}
  for i = half + 1, n - half do
    local e = effects[i]
    local key = ("%s %s %s"):format(verb(e), e.module, e.op)
    if not counts[key] then counts[key], what[#what + 1] = 0, key end
    counts[key] = counts[key] + 1
  end
  for k, key in ipairs(what) do what[k] = ("%d %s"):format(counts[key], key) end
  elided(n - 2 * half, table.concat(what, ", "))
  for i = n - half + 1, n do show(effects[i], i) end
end

local function step_facts(st)
  local facts = { "started " .. stamp(st.started), dur(st.duration) }
  if st.attempts and st.attempts > 1 then facts[#facts + 1] = st.attempts .. " attempts" end
  if st.reason then facts[#facts + 1] = "reason: " .. st.reason end
  if st.segment and st.segment > 1 then facts[#facts + 1] = "after resume " .. (st.segment - 1) end
  return table.concat(facts, " · ")
end

local function context_text(c)
  return ("context %s (%s%s), default namespace %s"):format(c.context, c.server, c.user and (", user " .. c.user) or "",
    c.namespace)
end

--- The namespaces the run's Kubernetes effects were in ("NAMESPACE/KIND/NAME" targets), sorted.
local function effect_namespaces(doc)
  local seen, out = {}, {}
  for _, st in ipairs(doc.steps) do
    for _, e in ipairs(st.effects) do
      local ns = e.module == "k8s" and tostring(e.target):match("^([^/]+)/[^/]+/[^/]+$")
      if ns and not seen[ns] then seen[ns] = true; out[#out + 1] = ns end
    end
  end
  table.sort(out)
  return out
end

--- The operator's answers at a step's prompt, each with the preview it asked
-- for: calls answer(a, preview-or-nil) in order.
local function each_answer(st, answer)
  local next_preview = 1
  for _, a in ipairs(st.answers) do
    local pv
    if a.answer == "preview" then
      pv, next_preview = st.previews[next_preview], next_preview + 1
    end
    answer(a, pv)
  end
end

local function param_names(doc)
  local names = {}
  for k in pairs(doc.params) do names[#names + 1] = k end
  table.sort(names)
  return names
end

local function param_text(v)
  if type(v) == "table" then return journal.encode(v) end
  return tostring(v)
end

-- ---- Markdown -------------------------------------------------------------------

-- Mermaid's gantt grammar ends a task's name at ':', '#' or ';', and a line
-- at a newline; a backtick could close the Markdown fence.
local function mermaid_text(s)
  return (tostring(s):gsub("[%c:#;`]", " "))
end

-- A Mermaid Gantt chart of the steps (it renders on GitHub and GitLab), in UTC.
local function gantt(doc, add)
  add("```mermaid")
  add("gantt")
  add("  title %s  %s (UTC)", mermaid_text(doc.run_id), mermaid_text(doc.runbook or ""))
  add("  dateFormat YYYY-MM-DDTHH:mm:ss.SSS")
  add("  axisFormat %H:%M:%S")
  add("  section Steps")
  for i, st in ipairs(doc.steps) do
    local start = tostring(st.started or doc.started or ""):gsub("Z$", "")
    local tag = st.status == "ok" and "done, " or (st.status == "failed" or st.status == "interrupted") and "crit, " or ""
    local name = mermaid_text(("%s (%s)"):format(step_label(st), st.status))
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

local function md_change(e) return e.change and (" → " .. code_span(e.change)) or "" end

local function effect_line(e, indent)
  return ("%s- %s **%s** %s (%s %s %s)%s"):format(indent or "", stamp(e.time), verb(e), cell(e.summary), e.module,
    e.op, code_span(e.target or ""), md_change(e))
end

local function md_effects(add, effects, indent)
  each_shown(effects, function(e) add("%s", effect_line(e, indent)) end,
    function(n, what) add("%s- … %d more: %s", indent, n, what) end)
end

local function md_log(add, logs, indent)
  add("%s```", indent)
  for _, l in ipairs(logs) do
    for line in (tostring(l.message) .. "\n"):gmatch("([^\n]*)\n") do
      add("%s%s %-5s %s", indent, stamp(l.time), (l.level or "info"):upper(), (line:gsub("```", "'''")))
    end
  end
  add("%s```", indent)
end

-- A line with a blank line before and after it: a heading, or a list's label.
local function md_head(add, ...)
  add("")
  add(...)
  add("")
end

local function md_operator(add, st)
  if #st.answers == 0 then return end
  md_head(add, "Operator:")
  each_answer(st, function(a, pv)
    add("- asked %s, answered **%s** at %s", stamp(a.asked), a.answer, stamp(a.time))
    if pv then
      add("  - preview %s, %s to %s:%s", pv.status, stamp(pv.started), stamp(pv.ended),
        #pv.effects == 0 and " it would change nothing" or "")
      md_effects(add, pv.effects, "    ")
      if pv.error then add("    - error: %s", cell(pv.error.message)) end
      if #pv.logs > 0 then add(""); md_log(add, pv.logs, "    ") end
    end
  end)
end

local function md_step(add, st)
  md_head(add, "### %s: %s", step_label(st):gsub("^undo", "Undo"), st.status)
  add("%s", step_facts(st))
  md_operator(add, st)
  if #st.effects > 0 then
    md_head(add, "Effects:")
    md_effects(add, st.effects, "")
  end
  if #st.unknown > 0 then
    md_head(add, "In flight when the run stopped (outcome unknown; see `resume --on-unknown`):")
    for _, e in ipairs(st.unknown) do
      add("- %s **unknown** %s (%s %s %s)", stamp(e.time), cell(e.summary), e.module, e.op, code_span(e.target or ""))
    end
  end
  if #st.logs > 0 then
    md_head(add, "Log:")
    md_log(add, st.logs, "")
  end
  if st.error then
    add("")
    add("Error: %s%s", cell(st.error.message or "?"),
      st.error.where and (" (at " .. code_span(st.error.where) .. ")") or "")
  end
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
  if doc.ended then add("| Ended | %s |", stamp(doc.ended)) end
  add("| Duration | %s |", dur(doc.duration))
  add("| By | %s@%s (pid %s) |", cell(doc.user), cell(doc.host), doc.pid)
  for _, c in ipairs(doc.kubernetes) do add("| Kubernetes | %s |", cell(context_text(c))) end
  local namespaces = effect_namespaces(doc)
  if #namespaces > 0 then
    add("| Namespaces | %s (of its Kubernetes effects) |", cell(table.concat(namespaces, ", ")))
  end
  for i = 2, #doc.segments do
    local seg = doc.segments[i]
    add("| Resumed | %s at step %s (pid %s): %s |", stamp(seg.started), cell(seg.resume_at or "(none left)"), seg.pid, seg.status)
  end
  md_head(add, "## Parameters")
  local names = param_names(doc)
  if #names == 0 then add("(none)") else
    add("| Name | Value |")
    add("|---|---|")
    for _, k in ipairs(names) do add("| %s | %s |", cell(k), code_span(param_text(doc.params[k]))) end
  end
  md_head(add, "## Timeline")
  add("| Time | Step | Status | Duration | Effects |")
  add("|---|---|---|---|---|")
  for _, st in ipairs(doc.steps) do
    add("| %s | %s | %s | %s | %d |", stamp(st.started), cell(step_label(st)), st.status, dur(st.duration), #st.effects)
  end
  if #doc.steps > 0 then
    add("")
    gantt(doc, add)
  end
  for _, st in ipairs(doc.steps) do md_step(add, st) end
  if doc.plan then
    md_head(add, "## Dry-run plan")
    if #doc.plan == 0 then add("The run would change nothing.") end
    each_shown(doc.plan, function(e, i) add("%d. %s %s%s", i, verb(e), cell(e.summary), md_change(e)) end,
      function(n, what) add("\n… %d more: %s\n", n, what) end)   -- the list goes on at its own number
  end
  add("")
  add("Journal: %s", code_span(journal.path(doc.run_id)))
  return table.concat(out, "\n") .. "\n"
end

-- ---- HTML -----------------------------------------------------------------------
-- One self-contained page: inline CSS, an inline SVG timeline, no script and
-- nothing fetched. Every text passes esc().

local ESC = { ["&"] = "&amp;", ["<"] = "&lt;", [">"] = "&gt;", ['"'] = "&quot;", ["'"] = "&#39;" }
local function esc(v) return (tostring(v == nil and "" or v):gsub("[&<>\"']", ESC)) end

local COLOURS = { ok = "#2da44e", failed = "#cf222e", interrupted = "#bf8700", aborted = "#8250df",
  skipped = "#8c959f", running = "#0969da" }
local function colour(status) return COLOURS[status] or "#57606a" end
-- A status's colour is a class (s-ok...), not a style attribute, so the page
-- holds under a Content-Security-Policy without 'unsafe-inline' (serve's console).
local function status_class(status) return COLOURS[status] and ("s-" .. status) or "s-other" end

local CSS = [[
body{font:14px/1.45 system-ui,sans-serif;color:#1f2328;max-width:1000px;margin:2em auto;padding:0 1em}
h1{font-size:1.5em}h2{border-bottom:1px solid #d0d7de;padding-bottom:.2em;margin-top:1.6em}
h3{margin-bottom:.3em}h4{margin:.8em 0 .2em}
table{border-collapse:collapse}th,td{border:1px solid #d0d7de;padding:.25em .6em;text-align:left;vertical-align:top}
code,pre{font-family:ui-monospace,monospace;font-size:.92em}
pre{background:#f6f8fa;padding:.6em;overflow-x:auto;white-space:pre-wrap}
.status{display:inline-block;padding:0 .5em;border-radius:1em;color:#fff;font-weight:600}
.step{border-left:4px solid #d0d7de;padding-left:.8em;margin:1.2em 0}
.facts,.none{color:#57606a}.error{color:#cf222e}
svg.timeline text{font-size:12px;fill:#1f2328}svg.timeline .axis{fill:#57606a}
]]
do
  local rules = { ".status.s-other{background:#57606a}" }
  for status, c in pairs(COLOURS) do
    rules[#rules + 1] = ('.status.s-%s{background:%s}.step[data-status="%s"]{border-color:%s}'):format(status, c,
      status, c)
  end
  table.sort(rules)
  CSS = CSS .. table.concat(rules, "\n") .. "\n"
end
M.CSS = CSS

local function status_badge(status)
  return ('<span class="status %s">%s</span>'):format(status_class(status), esc(status))
end

--- The SVG timeline: one bar per step, placed by its start and length within
-- the run, coloured by its status.
local function svg_timeline(doc, add)
  local t0 = journal.parse_time(doc.started) or 0
  local spans, t1 = {}, t0
  for i, st in ipairs(doc.steps) do
    local a = journal.parse_time(st.started) or t0
    spans[i] = { a, a + (tonumber(st.duration) or 0) }
    t1 = math.max(t1, spans[i][2])
  end
  t1 = math.max(t1, journal.parse_time(doc.ended) or t1)
  local span = math.max(t1 - t0, 0.001)
  local LABEL, WIDTH, ROW = 300, 640, 24
  local width, height = LABEL + WIDTH + 20, ROW * #doc.steps + 28
  add('<svg class="timeline" width="%d" height="%d" viewBox="0 0 %d %d" '
    .. 'role="img" aria-label="Timeline of the steps">', width, height, width, height)
  for i, st in ipairs(doc.steps) do
    local y = (i - 1) * ROW
    local x = LABEL + (spans[i][1] - t0) / span * WIDTH
    local w = math.max(2, (spans[i][2] - spans[i][1]) / span * WIDTH)
    local label = step_label(st)
    add('<g class="bar" data-step="%s" data-status="%s"><title>%s: %s, %s, %s</title>', esc(st.name), esc(st.status),
      esc(label), esc(st.status), esc(stamp(st.started)), esc(dur(st.duration)))
    add('<text x="0" y="%d">%s</text>', y + 16, esc(#label > 40 and (label:sub(1, 39) .. "…") or label))
    add('<rect x="%.1f" y="%d" width="%.1f" height="%d" rx="3" fill="%s"/></g>', x, y + 4, w, ROW - 8,
      colour(st.status))
  end
  local axis = ROW * #doc.steps + 18
  add('<text class="axis" x="%d" y="%d">%s</text>', LABEL, axis, esc(stamp(doc.started)))
  add('<text class="axis" x="%d" y="%d" text-anchor="end">+%s</text>', LABEL + WIDTH, axis, esc(dur(span)))
  add("</svg>")
end

local function html_change(e) return e.change and (" → <code>" .. esc(e.change) .. "</code>") or "" end

local function html_effect(e)
  return ("<li>%s <b>%s</b> %s (%s %s <code>%s</code>)%s</li>"):format(esc(stamp(e.time)), esc(verb(e)),
    esc(e.summary), esc(e.module), esc(e.op), esc(e.target), html_change(e))
end

local function html_log(add, logs)
  if #logs == 0 then add('<p class="none">No log lines.</p>'); return end
  local lines = {}
  for _, l in ipairs(logs) do
    for line in (tostring(l.message) .. "\n"):gmatch("([^\n]*)\n") do
      lines[#lines + 1] = esc(("%s %-5s %s"):format(stamp(l.time), (l.level or "info"):upper(), line))
    end
  end
  add('<pre class="log">%s</pre>', table.concat(lines, "\n"))
end

local function html_effects(add, effects)
  if #effects == 0 then add('<p class="none">No effects.</p>'); return end
  add('<ul class="effects">')
  each_shown(effects, function(e) add("%s", html_effect(e)) end,
    function(n, what) add('<li class="more">… %d more: %s</li>', n, esc(what)) end)
  add("</ul>")
end

local function html_step(add, st, i)
  add('<section class="step" id="step-%d" data-step="%s" data-status="%s">', i, esc(st.name), esc(st.status))
  add("<h3>%s %s</h3>", esc(step_label(st):gsub("^undo", "Undo")), status_badge(st.status))
  add('<p class="facts">%s</p>', esc(step_facts(st)))
  if #st.answers > 0 then
    add("<h4>Operator</h4><ul>")
    each_answer(st, function(a, pv)
      add("<li>asked %s, answered <b>%s</b> at %s", esc(stamp(a.asked)), esc(a.answer), esc(stamp(a.time)))
      if pv then
        add('<div class="preview">Preview %s, %s to %s:', status_badge(pv.status), esc(stamp(pv.started)),
          esc(stamp(pv.ended)))
        html_effects(add, pv.effects)
        if pv.error then add('<p class="error">Error: %s</p>', esc(pv.error.message)) end
        if #pv.logs > 0 then html_log(add, pv.logs) end
        add("</div>")
      end
      add("</li>")
    end)
    add("</ul>")
  end
  add("<h4>Effects</h4>")
  html_effects(add, st.effects)
  if #st.unknown > 0 then
    add("<h4>In flight when the run stopped (outcome unknown)</h4><ul>")
    for _, e in ipairs(st.unknown) do
      add("<li>%s <b>unknown</b> %s (%s %s <code>%s</code>)</li>", esc(stamp(e.time)), esc(e.summary), esc(e.module),
        esc(e.op), esc(e.target))
    end
    add("</ul>")
  end
  add("<h4>Log</h4>")
  html_log(add, st.logs)
  if st.error then
    add('<p class="error">Error: %s%s</p>', esc(st.error.message or "?"),
      st.error.where and (" (at <code>" .. esc(st.error.where) .. "</code>)") or "")
  end
  add("</section>")
end

local function html(doc)
  local out = {}
  local function add(fmt, ...) out[#out + 1] = select("#", ...) > 0 and fmt:format(...) or fmt end
  local function row(name, value) add("<tr><th>%s</th><td>%s</td></tr>", name, value) end
  add('<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">')
  add("<title>Run %s: %s</title>", esc(doc.run_id), esc(doc.runbook))
  add("<style>\n%s</style>\n</head>\n<body>", CSS)
  add("<h1>Run <code>%s</code>: %s</h1>", esc(doc.run_id), esc(doc.runbook))
  add('<table class="summary">')
  row("Status", status_badge(doc.status) .. (doc.exit_code and (" exit " .. esc(doc.exit_code)) or ""))
  row("Runbook", esc(doc.runbook) .. (doc.version and (" version " .. esc(doc.version)) or ""))
  row("File", ("<code>%s</code> (sha256 <code>%s</code>)"):format(esc(doc.path or doc.file), esc(doc.sha256 or "?")))
  row("Mode", doc.mode == "dry-run" and "dry run (nothing was changed)" or esc(doc.mode))
  row("Started", esc(stamp(doc.started)))
  if doc.ended then row("Ended", esc(stamp(doc.ended))) end
  row("Duration", esc(dur(doc.duration)))
  row("By", ("%s@%s (pid %s)"):format(esc(doc.user), esc(doc.host), esc(doc.pid)))
  for _, c in ipairs(doc.kubernetes) do row("Kubernetes", esc(context_text(c))) end
  local namespaces = effect_namespaces(doc)
  if #namespaces > 0 then row("Namespaces", esc(table.concat(namespaces, ", ")) .. " (of its Kubernetes effects)") end
  for i = 2, #doc.segments do
    local seg = doc.segments[i]
    row("Resumed", esc(("%s at step %s (pid %s): %s"):format(stamp(seg.started), seg.resume_at or "(none left)",
      seg.pid, seg.status)))
  end
  add("</table>")
  add("<h2>Parameters</h2>")
  local names = param_names(doc)
  if #names == 0 then add('<p class="none">(none)</p>') else
    add('<table class="params"><tr><th>Name</th><th>Value</th></tr>')
    for _, k in ipairs(names) do
      add("<tr><td>%s</td><td><code>%s</code></td></tr>", esc(k), esc(param_text(doc.params[k])))
    end
    add("</table>")
  end
  add("<h2>Timeline</h2>")
  svg_timeline(doc, add)
  add("<h2>Steps</h2>")
  for i, st in ipairs(doc.steps) do html_step(add, st, i) end
  if doc.plan then
    add("<h2>Dry-run plan</h2>")
    if #doc.plan == 0 then add('<p class="none">The run would change nothing.</p>') end
    add('<ol class="plan">')
    each_shown(doc.plan, function(e, i)
      add('<li value="%d">%s %s%s</li>', i, esc(verb(e)), esc(e.summary), html_change(e))
    end, function(n, what) add('<li class="more">… %d more: %s</li>', n, esc(what)) end)
    add("</ol>")
  end
  add("<footer><p>Journal: <code>%s</code></p></footer>\n</body>\n</html>", esc(journal.path(doc.run_id)))
  return table.concat(out, "\n") .. "\n"
end

--- What serve's console (stdlib/runbook/console.lua) draws a run with, so
-- its page and the HTML report are one picture: the document of a run, and
-- the pieces of the report's HTML (each `add(fmt, ...)`-driven, escaped).
M.document = document
M.html = { esc = esc, stamp = stamp, dur = dur, badge = status_badge, timeline = svg_timeline, step = html_step,
  effects = html_effects, verb = verb }

--- The report of `run_id` as text in `fmt` ("markdown", "json" or "html"), or nil and a message.
function M.report(run_id, fmt)
  local doc, err = document(run_id)
  if not doc then return nil, err end
  if fmt == "json" then return journal.encode(doc) .. "\n" end
  if fmt == "html" then return html(doc) end
  return markdown(doc)
end

return M
