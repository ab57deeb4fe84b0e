--- `runbook resume RUN_ID`: read a run's journal and work out how to continue
-- it: which steps finished (their outputs restored), where to start, with
-- which params, and whether the runbook changed since.
local host = require("runbook.host")
local journal = require("runbook.journal")

local M = {}

local EXIT = require("runbook.exit")

local function fail(code, fmt, ...)
  io.stderr:write(host.redact("runbook: resume: " .. fmt:format(...) .. "\n"))
  return nil, code
end

local function describe(e) return e.summary ~= nil and e.summary ~= "" and e.summary or (e.module .. " " .. e.op .. " " .. (e.target or "")) end

--- The effects a cut-off step is known to have done: performed, not failed,
-- and not of unknown outcome. A failed effect is never presented as done.
local function done_effects(state)
  local out = {}
  for _, e in ipairs(state.effects) do
    if e.decision == "performed" and e.ok ~= false and not e.unknown then out[#out + 1] = e end
  end
  return out
end

--- The steps whose undo ran and which did not finish ok again after it, by name.
local function undone_steps(events)
  local undone = {}
  for _, e in ipairs(events) do
    if e.event == "undo_start" then undone[e.step] = true
    elseif e.event == "step_end" and e.status == "ok" then undone[e.step] = nil end
  end
  return undone
end

--- Where a resume starts when steps were undone: at the first undone step,
-- unless a step after it finished, was not undone and would run again.
-- Returns the index, or nil and why.
local function undone_start(rb, s, undone, from)
  local first
  for i = from, #rb.steps do
    local step = rb.steps[i]
    if undone[step.name] then
      first = first or i
    elseif first and s.steps[step.name] and s.steps[step.name].status == "ok" and not step.idempotent then
      local names = {}
      for j = first, i do if undone[rb.steps[j].name] then names[#names + 1] = "'" .. rb.steps[j].name .. "'" end end
      return nil, ("the run's undo reverted %s; running again from '%s' would repeat '%s', which finished and "
        .. "was not undone (it is not declared idempotent). Start a new run instead"):format(
        table.concat(names, ", "), rb.steps[first].name, step.name)
    end
  end
  return first
end

--- Decide about a step cut off after performing effects. Returns "rerun",
-- "skip" or "quit" (nil and a message when there is no one to ask).
local function decide_interrupted(step, effects, o)
  if o["--rerun-interrupted"] then return "rerun" end
  if host.isatty(0) then return require("runbook.prompt").interrupted_step(step, effects) end
  local lines = {}
  for _, e in ipairs(effects) do lines[#lines + 1] = "  - " .. describe(e) end
  return nil, ("step '%s' was interrupted after it had already:\n%s\nIt is not declared idempotent, and standard "
    .. "input is not a terminal to ask. Check those effects, then resume with --rerun-interrupted to run it again.")
    :format(step.name, table.concat(lines, "\n"))
end

--- Run the step's declared `check(ctx, unknown)` in a dry run (it reads; a
-- write it tried would not be performed) under the step's deadline. Returns
-- "done" and the outputs (a truthy answer), "redo" (false), or nil and why
-- the check could not tell (nil, or an error).
local function run_check(step, unknown, ctx)
  local was = host.mode()
  host.set_mode("dry-run")
  host.set_deadline(host.now() + (step.timeout or 60))
  local ok, res = pcall(step.check, ctx, unknown)
  host.set_deadline(0)
  host.set_mode(was)
  if not ok then return nil, "it failed: " .. host.redact(tostring(type(res) == "table" and res.message or res)) end
  if res == nil then return nil, "it could not tell" end
  if res then return "done", type(res) == "table" and res or {} end
  return "redo"
end

local function effect_list(effects)
  local lines = {}
  for _, e in ipairs(effects) do
    lines[#lines + 1] = "  - " .. describe(e) .. (e.key and (" (key " .. e.key .. ")") or "")
  end
  return table.concat(lines, "\n")
end

--- Effects of unknown outcome, and no check to answer: the operator, else
-- --on-unknown. Returns "redo" or "skip", or nil, exit status and message.
local function ask_unknown(step, unknown, o)
  local choice = o["--on-unknown"]
  if not choice and host.isatty(0) then
    choice = require("runbook.prompt").unknown_step(step, unknown)
    if choice == "quit" then return nil, EXIT.aborted, "stopped by the operator" end
  end
  if choice == "redo" or choice == "skip" then return choice end
  return nil, EXIT.unknown, ("step '%s' was cut off while these effects were in flight; whether they happened is "
    .. "unknown:\n%s\nCheck them, then resume with --on-unknown=redo (run the step again) or --on-unknown=skip "
    .. "(they happened; go on with the next step).%s"):format(step.name, effect_list(unknown),
      step.check and "" or " A step can declare check = function(ctx, unknown) to answer this itself.")
end

--- A step that did not finish after it performed effects, or with effects
-- of unknown outcome. Its check answers first; else unknown effects go to
-- the operator or --on-unknown, and known ones to the operator or
-- --rerun-interrupted. Returns "done" (and outputs), "redo" or "skip", or
-- nil, exit status and message.
local function resolve(step, state, o, ctx)
  local done = state.status == "interrupted" and done_effects(state) or {}
  if step.check then
    local answer, out = run_check(step, state.unknown, ctx)
    local listed = effect_list(#state.unknown > 0 and state.unknown or done)
    if answer then
      io.stderr:write(("runbook: resume: step '%s' was cut off with:\n%s\nits check says: %s\n")
        :format(step.name, listed, answer == "done" and "done" or "not done, so it runs again"))
      return answer, out
    end
    io.stderr:write(("runbook: resume: the check of step '%s' did not answer: %s\n"):format(step.name, out))
  end
  if #state.unknown > 0 then return ask_unknown(step, state.unknown, o) end
  local choice, why = decide_interrupted(step, done, o)
  if not choice then return nil, EXIT.usage, why end
  if choice == "quit" then return nil, EXIT.aborted, "stopped by the operator" end
  return choice == "rerun" and "redo" or "skip"
end

--- The request that started the run (its run_start event), with the
-- resume's own options: --step, --yes, --undo-on-failure, --wait-lock and
-- --output add to or replace what was journaled; -p gives secret params again.
-- Returns it, or nil and the exit status.
local function request(rb, first, o)
  for _, kv in ipairs(o["-p"] or {}) do
    local p = rb.params_by_name[kv:match("^([^=]*)")]
    if not (p and p.secret) then
      return fail(EXIT.usage, "-p %s: a resumed run keeps its params; only secret params, which the journal "
        .. "does not hold, are given again", kv)
    end
  end
  local was = type(first.request) == "table" and first.request or {}
  return {
    given = o["-p"] or {}, mode = "run", from = first.from, outputs_from = was.outputs_from, lock = first.lock,
    step = o["--step"] or was.step, yes = (o["--yes"] or o["-y"]) or was.yes,
    undo_on_failure = o["--undo-on-failure"] or was.undo_on_failure,
    wait = o["--wait-lock"] or was.wait or 0, output = o["--output"] or was.output or "text",
  }
end

--- The files a run loaded besides the runbook (required Lua files, its
-- params file), as journaled in each run_start and source event, whose text
-- is not the same now: one line each, naming the file and both sha256s.
local function changed_sources(events)
  local recorded, order = {}, {}
  local function note(rec)
    if type(rec) ~= "table" or type(rec.path) ~= "string" or type(rec.sha256) ~= "string" then return end
    if not recorded[rec.path] then order[#order + 1] = rec.path end
    recorded[rec.path] = rec
  end
  for _, e in ipairs(events) do
    if e.event == "source" then note(e) end
    if e.event == "run_start" and type(e.sources) == "table" then
      for _, rec in ipairs(e.sources) do note(rec) end
    end
  end
  local out = {}
  for _, path in ipairs(order) do
    local rec, now = recorded[path], host.sha256_file(path)
    if now ~= rec.sha256 then
      out[#out + 1] = ("  - %s (%s): sha256 was %s, is now %s"):format(path,
        rec.params and "the params file" or "required by the runbook", rec.sha256, now or "missing")
    end
  end
  return out
end

--- Returns {rb, request, resumed} for runbook.run.start, or nil and an exit status
-- (having said why). `load_runbook(path)` is the CLI's loader.
function M.plan(run_id, o, load_runbook)
  local events, rerr = journal.read(run_id)
  if not events then return fail(EXIT.usage, "%s", rerr) end
  local s = journal.summarize(events)
  local first = s.start
  if first.mode == "dry-run" then
    return fail(EXIT.usage, "run %s was a dry run, which changed nothing: run it again instead", run_id)
  end
  if s.status == "ok" then return fail(EXIT.usage, "run %s finished ok; there is nothing to resume", run_id) end
  local applied = type(first.request) == "table" and first.request.plan
  if type(applied) == "table" then
    return fail(EXIT.usage, "run %s applied plan %s, and a resume would run without it: make a new plan "
      .. "(runbook plan) and apply that", run_id, tostring(applied.id))
  end

  local rb, code = load_runbook(first.path or first.file)
  if not rb then return nil, code end
  local sha = host.sha256(rb.source)
  if first.sha256 and sha ~= first.sha256 then
    if not o["--force"] then
      return fail(EXIT.usage, "%s changed since run %s (sha256 was %s, is now %s); check the change, "
        .. "then resume with --force to run the new text", first.path or first.file, run_id, first.sha256, sha)
    end
    io.stderr:write(("runbook: resume: %s changed since run %s (sha256 %s -> %s); continuing as --force asks\n")
      :format(first.path or first.file, run_id, first.sha256, sha))
  end
  local changed = changed_sources(events)
  if #changed > 0 then
    if not o["--force"] then
      return fail(EXIT.usage, "files run %s loaded changed since:\n%s\ncheck the change, then resume with --force to "
        .. "run the new text", run_id, table.concat(changed, "\n"))
    end
    io.stderr:write(("runbook: resume: files run %s loaded changed since:\n%s\ncontinuing as --force asks\n")
      :format(run_id, table.concat(changed, "\n")))
  end
  if journal.running(run_id) then
    local holder = first.lock and not first.lock:match("^k8s:") and require("runbook.lock").holder(first.lock) or {}
    return fail(EXIT.locked, "run %s is still running (pid %s on %s)", run_id, holder.pid or "?", holder.host or "?")
  end

  local from = first.from and rb.steps_by_name[first.from] and rb.steps_by_name[first.from].index or 1
  local undone = undone_steps(events)
  local rerun, uerr = undone_start(rb, s, undone, from)
  if uerr then return fail(EXIT.usage, "run %s: %s", run_id, uerr) end
  if rerun then
    io.stderr:write(("runbook: resume: '%s' was undone when run %s failed: it runs again, and the steps after it\n")
      :format(rb.steps[rerun].name, run_id))
  end
  local outputs, completed, skipped, resolved, start = {}, {}, {}, {}, nil
  for i = from, rerun and rerun - 1 or #rb.steps do
    local step = rb.steps[i]
    local state = s.steps[step.name]
    if state and state.status == "ok" then
      outputs[step.name] = state.outputs or {}
      completed[#completed + 1] = step.name
    elseif state and state.status == "skipped" then
      skipped[step.name] = state.reason
    elseif state and not step.idempotent
      and (#state.unknown > 0 or state.status == "interrupted" and #done_effects(state) > 0) then
      local ctx = { params = first.params or {}, outputs = outputs, run_id = run_id, step = step.name,
        key = run_id .. "/" .. step.name, dry_run = false, log = require("log") }
      local answer, out, why = resolve(step, state, o, ctx)
      if not answer then return fail(out, "%s", why) end
      if answer == "redo" then start = i; break end
      -- Journaled when the resumed run starts, so the answer holds for a later resume.
      resolved[#resolved + 1] = { event = "step_end", step = step.name, index = i, duration = 0,
        status = answer == "done" and "ok" or "skipped", outputs = answer == "done" and out or nil,
        reason = answer == "skip" and "operator" or nil }
      if answer == "done" then
        outputs[step.name] = out
        completed[#completed + 1] = step.name
      else
        skipped[step.name] = "operator"
      end
    else
      start = i
      break
    end
  end
  local req, perr = request(rb, first, o)
  if not req then return nil, perr end
  return {
    rb = rb, request = req,
    resumed = { id = run_id, params = first.params or {}, start = start or rerun or #rb.steps + 1, resolved = resolved,
      restored = { outputs = outputs, completed = completed, skipped = skipped } },
  }
end

return M
