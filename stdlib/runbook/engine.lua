--- The step engine: runs the steps of a run (made by runbook.run) in order
-- with their `when`, confirmation, timeout, retry and undo, emitting events
-- for every sink.
local events = require("runbook.events")
local EXIT = require("runbook.exit")
local host = require("runbook.host")
local deadline = require("runbook.deadline")

local M = {}

--- The runbook's own file:line nearest the top of the stack, for error messages.
local function runbook_position(file)
  for level = 3, 60 do
    local info = debug.getinfo(level, "Sl")
    if not info then break end
    if info.source == "@" .. file and info.currentline > 0 then
      return ("%s:%d"):format(file, info.currentline)
    end
  end
end

--- Call fn(...) protected; on error return false and an error record
-- {message, where, code, module, retryable, interrupted}.
local function protected(rb, fn, ...)
  local where
  local ok, res = xpcall(fn, function(err)
    where = runbook_position(rb.file)
    return err
  end, ...)
  if ok then return true, res end
  local sig = host.interrupted()
  if sig then return false, { message = "interrupted by " .. EXIT.signal_name(sig), interrupted = true, signal = sig } end
  local rec = { where = where }
  if type(res) == "table" then
    rec.message, rec.code, rec.module = tostring(res.message or res), res.code, res.module
    rec.op, rec.retryable = res.op, res.retryable
    if getmetatable(res) and getmetatable(res).__tostring then rec.message = tostring(res) end
  else
    rec.message = tostring(res)
  end
  -- Lua's own position ("file:12: msg") duplicates `where` when they agree.
  if where and rec.message:sub(1, #where + 2) == where .. ": " then rec.message = rec.message:sub(#where + 3) end
  rec.message = host.redact(rec.message)
  return false, rec
end

local function jitter_delay(retry, attempt)
  local d = retry.base
  if retry.backoff == "exponential" then d = retry.base * 2 ^ (attempt - 1) end
  d = math.min(d, retry.max)
  if retry.jitter then d = d / 2 + math.random() * d / 2 end
  return d
end

local SKIPPED_BY = { operator = "the operator skipped it", when = "its when predicate was false",
  needs = "a step it needs was skipped", from = "it is before --from" }

local function known_step(rb, name, what)
  if not rb.steps_by_name[name] then
    error(("%s[%q]: there is no step of that name"):format(what, tostring(name)), 3)
  end
end

--- The outputs earlier steps returned, by step name. Reading a step that did
-- not run (skipped, or before --from) is an error that says so.
local function outputs_table(rb, store, skipped)
  return setmetatable({}, {
    __index = function(_, name)
      local v = store[name]
      if v ~= nil then return v end
      known_step(rb, name, "ctx.outputs")
      if skipped[name] then
        error(("ctx.outputs[%q]: that step was skipped (%s), so it has no outputs; a step that can go on without"
          .. " them declares uses = {%q} and asks ctx.skipped(%q) first"):format(name, SKIPPED_BY[skipped[name]], name,
          name), 2)
      end
      error(("ctx.outputs[%q]: that step has not run in this run (not reached, or before --from), so it has no outputs")
        :format(name), 2)
    end,
    __newindex = function() error("ctx.outputs is read-only: return a table from the step instead", 2) end,
    __pairs = function() return next, store, nil end,
  })
end

local function check_outputs(step, out)
  if out == nil then return {} end
  if type(out) ~= "table" then
    error(("step '%s' returned a %s: a step returns a table of outputs (or nothing)"):format(step.name, type(out)), 0)
  end
  local ok, err = pcall(require("cjson").encode, out)
  if not ok then
    error(("step '%s' returned outputs that cannot be recorded as JSON: %s"):format(step.name, err), 0)
  end
  return out
end

--- Call a step's `what` function fn(...) protected, under the step's timeout
-- (else the default for `what`) and the watchdog.
local function step_call(rb, step, ctx, what, fn, ...)
  if step.timeout == false and what == "run" then return protected(rb, fn, ...) end
  local limit = step.timeout or deadline.LIMIT[what]
  return deadline.call(limit, deadline.step_watch(ctx, step, what, limit), protected, rb, fn, ...)
end

--- The arguments of `fn` after ctx: for the step's run, the outputs of the
-- steps it needs, in their order (a fallback runs because one is missing).
local function needed(step, fn, ctx)
  local out = {}
  if fn == step.run then
    for i, name in ipairs(step.needs or {}) do out[i] = ctx.outputs[name] end
  end
  return table.unpack(out, 1, #out)
end

--- One attempt of one step's function `fn` (its run or fallback) under its deadline.
-- Under `apply`, the gate holds each effect to the plan's effects of this
-- step, counted from the attempt's start; a difference it found fails the
-- attempt whatever the step did with the error.
local function attempt(rb, step, fn, ctx)
  host.plan_step(step.name)
  local ok, res = step_call(rb, step, ctx, "run",
    function() return check_outputs(step, fn(ctx, needed(step, fn, ctx))) end)
  host.plan_step(nil)
  local drift = host.plan_drift()
  if drift then return false, { message = drift, code = "drift", module = "runbook", op = "apply" } end
  if not ok and step.timeout and res.code == "timeout" then
    -- A backend's own words name it, the operation and the target: keep them
    -- (module "runbook" is the step's own deadline, which has nothing to add).
    res.message = ("timed out after %s%s"):format(require("duration").format(step.timeout),
      res.module and res.module ~= "runbook" and (" in " .. res.message) or "")
  end
  return ok, res
end

--- Run a step with its retries. Returns ok, outputs-or-error, attempts.
local function run_with_retries(rb, step, fn, ctx)
  local attempts = step.retry and step.retry.attempts or 1
  local ok, res
  for n = 1, attempts do
    ctx.attempt = n
    ok, res = attempt(rb, step, fn, ctx)
    if ok or res.interrupted or res.code == "drift" or n == attempts then return ok, res, n end
    local delay = jitter_delay(step.retry, n)
    require("log").warn("attempt %d/%d failed: %s; retrying in %s", n, attempts, res.message,
      require("duration").format(delay))
    local slept, err = pcall(host.sleep, delay)
    if not slept then
      local sig = host.interrupted()
      if not sig then error(err, 0) end
      return false, { message = "interrupted by " .. EXIT.signal_name(sig), interrupted = true, signal = sig }, n
    end
  end
  return ok, res, attempts
end

--- Seconds since t0, to the millisecond (what output and the journal show).
local function since(t0) return math.floor((host.now() - t0) * 1000 + 0.5) / 1000 end

--- A step's ctx. ctx.key is the step's idempotency key in this run, the same
-- on resume: a step can mark its effect with it (a row, a header, a line) and
-- its `check` find the mark.
local function new_ctx(run, step)
  return setmetatable({ step = step.name, key = run.id .. "/" .. step.name }, { __index = run.ctx })
end

--- Run a step in dry-run mode to show what it would do, then restore the mode.
local function preview(run, step)
  local was = host.mode()
  host.set_mode("dry-run")
  events.emit { event = "preview_start", step = step.name }
  local ok, res = attempt(run.rb, step, step.run, new_ctx(run, step))
  host.set_mode(was)
  events.emit { event = "preview_end", step = step.name, status = ok and "ok" or "failed",
    error = not ok and res or nil }
end

-- The journal's word for each answer at a step's prompt.
local ANSWER = { run = "yes", skip = "no", preview = "preview", all = "all", quit = "quit" }

--- Ask the operator about `step` until they decide; every answer is journaled
-- with when it was asked. Returns "run", "skip", "all" or "quit".
local function ask(run, step, total)
  while true do
    local asked = events.iso8601(host.wallclock())
    local choice = require("runbook.prompt").step(step, total, run.request.step)
    events.emit { event = "answer", step = step.name, answer = ANSWER[choice], asked = asked }
    if choice ~= "preview" then return choice end
    preview(run, step)
  end
end

local function undo_completed(run)
  for i = #run.completed, 1, -1 do
    local step = run.completed[i]
    if step.undo then
      run.step = step.name
      events.emit { event = "undo_start", step = step.name }
      local t0 = host.now()
      local ctx = new_ctx(run, step)
      local ok, res = step_call(run.rb, step, ctx, "undo", step.undo, ctx, run.outputs[step.name])
      events.emit { event = "undo_end", step = step.name, status = ok and "ok" or "failed",
        duration = since(t0), error = not ok and res or nil }
    end
  end
end

--- The first of the step's `needs` that was skipped in this run, or nil.
local function missing_need(run, step)
  for _, need in ipairs(step.needs) do
    if run.skipped[need] then return need end
  end
end

--- Decide whether a step runs: its needs, its `when`, then --step / confirm
-- prompts. Returns "run", "skip", "all", "quit" or "error", and a reason:
-- for a skip "operator", "when" or "needs"; for an error the error.
local function decide(run, step, total)
  if not run.missing then
    if step.when then
      local ctx = new_ctx(run, step)
      local ok, res = step_call(run.rb, step, ctx, "when", step.when, ctx)
      if not ok then return "error", res end
      if not res then return "skip", "when" end
    end
  elseif not step.fallback then
    return "skip", "needs"
  end
  -- "all" at a prompt means the rest runs without asking, confirm steps included.
  local asking = not run.request.yes and not run.said_all and (run.ask_all or (step.confirm and host.mode() == "run"))
  if not asking then return "run" end
  local choice = ask(run, step, total)
  if choice == "skip" then return "skip", "operator" end
  return choice
end

--- The context every step function gets (a per-step table reads through to it).
-- `ctx.dry_run` reads the host's mode, so a preview is a dry run everywhere.
local function run_ctx(run)
  local rb = run.rb
  local function param(_, name)
    if not rb.params_by_name[name] then
      local known = {}
      for _, p in ipairs(rb.params) do known[#known + 1] = p.name end
      error(("ctx.params.%s: %s declares no param '%s'%s"):format(tostring(name), rb.name, tostring(name),
        type(name) == "string" and require("runbook.suggest").hint(name, known) or ""), 2)
    end
    local v = run.params[name]
    -- a list is the step's own copy: what one step does to it, the next does not see
    return type(v) == "table" and table.move(v, 1, #v, 1, {}) or v
  end
  local ctx = { params = setmetatable({}, { __index = param,
      __newindex = function() error("ctx.params is read-only", 2) end }),
    outputs = outputs_table(rb, run.outputs, run.skipped), run_id = run.id, runbook = rb.name }
  --- Why the step `name` was skipped in this run ("operator" or "when"), or nil.
  function ctx.skipped(name)
    known_step(rb, name, "ctx.skipped")
    return run.skipped[name]
  end
  function ctx.remaining()
    local d = host.deadline()
    return d and math.max(0, d - host.now()) or math.huge
  end
  return setmetatable(ctx, { __index = function(t, k)
    if k == "dry_run" then return host.mode() == "dry-run" end
    if k == "log" then t.log = require("runbook.env").readonly(require("log"), "ctx.log"); return t.log end
  end })
end

--- One step that runs (its decision made): emit its start and end, keep its
-- outputs. Returns true, or false and the status and exit status the run ends with.
local function run_step(run, step, i, counts, failure)
  local total = #run.rb.steps
  events.emit { event = "step_start", step = step.name, index = i, total = total, description = step.description }
  local s0 = host.now()
  local ok, res, attempts = false, failure, 0
  local fn = run.missing and step.fallback or step.run
  if not failure then ok, res, attempts = run_with_retries(run.rb, step, fn, new_ctx(run, step)) end
  local ev = { event = "step_end", step = step.name, index = i, duration = since(s0), attempts = attempts,
    fallback = run.missing and true or nil, needs = run.missing }
  if ok then
    run.outputs[step.name] = res
    run.completed[#run.completed + 1] = step
    counts.ok = counts.ok + 1
    ev.status, ev.outputs = "ok", res
    events.emit(ev)
    return true
  end
  ev.status, ev.error = res.interrupted and "interrupted" or "failed", res
  events.emit(ev)
  if res.interrupted then
    run.signal = res.signal
    return false, "interrupted", EXIT.interrupted(res.signal)
  end
  counts.failed = counts.failed + 1
  run.failed = { step = step.name, error = res.message }
  -- An undo is not in the plan either: after a drift nothing more is performed.
  if res.code == "drift" then return false, "failed", EXIT.drift end
  if run.rb.on_failure == "undo" or run.request.undo_on_failure then undo_completed(run) end
  return false, "failed", EXIT.failed
end

--- Run the steps of `run` (see runbook.run): from run.start (a resume) or
-- the request's --from, restoring run.restored = {outputs, completed, skipped}.
-- Counts ok, failed and skipped steps in `counts`. Returns the run's status
-- and exit status.
function M.run(run, counts)
  local rb, restored = run.rb, run.restored or { outputs = {}, completed = {} }
  run.outputs, run.skipped, run.completed = restored.outputs, restored.skipped or {}, {}
  for _, name in ipairs(restored.completed) do run.completed[#run.completed + 1] = rb.steps_by_name[name] end
  run.ask_all = run.request.step
  run.ctx = run_ctx(run)
  local from = run.start or run.request.from and rb.steps_by_name[run.request.from].index or 1
  local status, code = "ok", EXIT.ok
  for i = from, #rb.steps do
    local step = rb.steps[i]
    run.step = step.name
    run.missing = missing_need(run, step)
    local alive, choice, reason = protected(rb, require("runbook.heartbeat").beat)
    if alive then choice, reason = decide(run, step, #rb.steps) else choice, reason = "error", choice end
    if choice == "quit" then
      events.emit { event = "step_end", step = step.name, index = i, status = "aborted", duration = 0 }
      status, code = "aborted", EXIT.aborted
      break
    elseif choice == "skip" then
      run.skipped[step.name] = reason
      counts.skipped = counts.skipped + 1
      events.emit { event = "step_end", step = step.name, index = i, status = "skipped", reason = reason, duration = 0,
        needs = reason == "needs" and run.missing or nil }
    else
      if choice == "all" then run.said_all = true end
      local ok, st, c = run_step(run, step, i, counts, choice == "error" and reason or nil)
      if not ok then status, code = st, c; break end
    end
  end
  run.step = nil
  return status, code
end

return M
