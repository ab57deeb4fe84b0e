--- `runbook resume RUN_ID`: read a run's journal and work out how to continue
-- it: which steps finished (their outputs restored), where to start, with
-- which params, and whether the runbook changed since.
local host = require "runbook.host"
local journal = require "runbook.journal"

local M = {}

local EXIT = require "runbook.exit"

local function fail(code, fmt, ...)
  io.stderr:write(host.redact("runbook: resume: " .. fmt:format(...) .. "\n"))
  return nil, code
end

local function performed(state)
  local out = {}
  for _, e in ipairs(state.effects) do
    if e.decision == "performed" then out[#out + 1] = e end
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
  for _, e in ipairs(effects) do lines[#lines + 1] = "  - " .. (e.summary or (e.module .. " " .. e.op)) end
  return nil, ("step '%s' was interrupted after it had already:\n%s\nIt is not declared idempotent, and standard "
    .. "input is not a terminal to ask. Check those effects, then resume with --rerun-interrupted to run it again.")
    :format(step.name, table.concat(lines, "\n"))
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
  local wait = o["--wait-lock"] and require("duration").parse(o["--wait-lock"])
  return {
    given = o["-p"] or {}, mode = "run", from = first.from, outputs_from = was.outputs_from, lock = first.lock,
    step = o["--step"] or was.step, yes = (o["--yes"] or o["-y"]) or was.yes,
    undo_on_failure = o["--undo-on-failure"] or was.undo_on_failure,
    wait = wait or was.wait or 0, output = o["--output"] or was.output or "text",
  }
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
  local holder = first.lock and not first.lock:match("^k8s:") and require("runbook.lock").holder(first.lock)
  if holder and holder.run_id == run_id then
    return fail(EXIT.locked, "run %s is still running (pid %s on %s)", run_id, holder.pid, holder.host)
  end

  local from = first.from and rb.steps_by_name[first.from] and rb.steps_by_name[first.from].index or 1
  local undone = undone_steps(events)
  local rerun, uerr = undone_start(rb, s, undone, from)
  if uerr then return fail(EXIT.usage, "run %s: %s", run_id, uerr) end
  if rerun then
    io.stderr:write(("runbook: resume: '%s' was undone when run %s failed: it runs again, and the steps after it\n")
      :format(rb.steps[rerun].name, run_id))
  end
  local outputs, completed, skipped, start = {}, {}, {}, nil
  for i = from, rerun and rerun - 1 or #rb.steps do
    local step = rb.steps[i]
    local state = s.steps[step.name]
    if state and state.status == "ok" then
      outputs[step.name] = state.outputs or {}
      completed[#completed + 1] = step.name
    elseif state and state.status == "skipped" then
      skipped[step.name] = state.reason
    else
      local effects = state and state.status == "interrupted" and performed(state) or {}
      if #effects > 0 and not step.idempotent then
        local choice, why = decide_interrupted(step, effects, o)
        if not choice then return fail(EXIT.usage, "%s", why) end
        if choice == "quit" then return fail(EXIT.aborted, "stopped by the operator") end
        if choice == "rerun" then start = i; break end
        -- "skip": the operator says it is done; continue with the next step.
      else
        start = i
        break
      end
    end
  end
  local req, perr = request(rb, first, o)
  if not req then return nil, perr end
  return {
    rb = rb, request = req,
    resumed = { id = run_id, params = first.params or {}, start = start or rerun or #rb.steps + 1,
      restored = { outputs = outputs, completed = completed, skipped = skipped } },
  }
end

return M
