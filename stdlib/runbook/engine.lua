--- The step engine: runs a loaded runbook's steps in order with their
-- `when`, confirmation, timeout, retry and undo, in the mode the operator
-- chose, emitting events for every sink. Returns the exit status.
local events = require "runbook.events"
local host = require "runbook.host"
local heartbeat = require "runbook.heartbeat"

local M = {}

M.EXIT = { ok = 0, failed = 1, usage = 2, load = 3, aborted = 4, journal = 74, locked = 75, unknown = 76 }

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
  local sig = host.interrupted()
  if sig then rec.interrupted, rec.signal = true, sig end
  if rec.message:match("step timed out$") then rec.code = rec.code or "timeout" end
  return false, rec
end

local function jitter_delay(retry, attempt)
  local d = retry.base
  if retry.backoff == "exponential" then d = retry.base * 2 ^ (attempt - 1) end
  d = math.min(d, retry.max)
  if retry.jitter then d = d / 2 + math.random() * d / 2 end
  return d
end

local SKIPPED_BY = { operator = "the operator skipped it", when = "its when predicate was false" }

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
          .. " them asks ctx.skipped(%q) first"):format(name, SKIPPED_BY[skipped[name]], name), 2)
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

--- One attempt of one step's function under its deadline.
local function attempt(rb, step, ctx)
  host.set_deadline(step.timeout and host.now() + step.timeout or 0)
  local ok, res = protected(rb, function() return check_outputs(step, step.run(ctx)) end)
  host.set_deadline(0)
  if not ok and step.timeout and res.code == "timeout" then
    res.message = ("timed out after %s"):format(require("duration").format(step.timeout))
  end
  return ok, res
end

--- Run a step with its retries. Returns ok, outputs-or-error, attempts.
local function run_with_retries(rb, step, ctx)
  local attempts = step.retry and step.retry.attempts or 1
  local ok, res
  for n = 1, attempts do
    ctx.attempt = n
    ok, res = attempt(rb, step, ctx)
    if ok or res.interrupted or n == attempts then return ok, res, n end
    local delay = jitter_delay(step.retry, n)
    require("log").warn("attempt %d/%d failed: %s; retrying in %s", n, attempts, res.message,
      require("duration").format(delay))
    local slept, err = pcall(host.sleep, delay)
    if not slept then
      res = { message = tostring(err), interrupted = true, signal = host.interrupted() }
      return false, res, n
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
  return setmetatable({ step = step.name, key = run.opts.run_id .. "/" .. step.name }, { __index = run.ctx })
end

--- Run a step in dry-run mode to show what it would do, then restore the mode.
local function preview(run, step)
  local was = host.mode()
  host.set_mode("dry-run")
  events.emit { event = "preview_start", step = step.name }
  local ok, res = attempt(run.rb, step, new_ctx(run, step))
  host.set_mode(was)
  events.emit { event = "preview_end", step = step.name, status = ok and "ok" or "failed",
    error = not ok and res or nil }
end

--- Ask the operator about `step` until they decide. Returns "run", "skip", "all" or "quit".
local function ask(run, step, total)
  while true do
    local choice = require("runbook.prompt").step(step, total, run.opts.step)
    if choice ~= "preview" then return choice end
    preview(run, step)
  end
end

local function undo_completed(run)
  for i = #run.completed, 1, -1 do
    local step = run.completed[i]
    if step.undo then
      events.step = step.name
      events.emit { event = "undo_start", step = step.name }
      local t0 = host.now()
      local ok, res = protected(run.rb, step.undo, new_ctx(run, step), run.outputs[step.name])
      events.emit { event = "undo_end", step = step.name, status = ok and "ok" or "failed",
        duration = since(t0), error = not ok and res or nil }
    end
  end
end

--- Decide whether a step runs: its `when`, then --step / confirm prompts.
-- Returns "run", "skip" (with a reason), "all" or "quit".
local function decide(run, step, total)
  if step.when then
    local ok, res = protected(run.rb, step.when, new_ctx(run, step))
    if not ok then return "error", res end
    if not res then return "skip", "when" end
  end
  -- "all" at a prompt means the rest runs without asking, confirm steps included.
  local asking = not run.opts.yes and not run.said_all and (run.ask_all or (step.confirm and host.mode() == "run"))
  if not asking then return "run" end
  local choice = ask(run, step, total)
  if choice == "skip" then return "skip", "operator" end
  return choice
end

--- Take the run's Kubernetes Lease (a "k8s:" lock key). Returns the status
-- and exit code the run goes on with, and the lock when it was taken.
local function take_lease(opts, who)
  local ok, lock, why = pcall(require("runbook.lock").lease, opts.lease,
    { user = who.user, host = who.host, pid = who.pid, run_id = opts.run_id }, opts.lease_wait or 0)
  if ok and lock then return "ok", M.EXIT.ok, lock end
  local locked = ok or type(lock) == "table" and lock.code == "locked"
  require("log").error("%s", ok and why or host.redact(tostring(type(lock) == "table" and lock.message or lock)))
  if locked then return "locked", M.EXIT.locked end
  return "failed", M.EXIT.failed
end

--- Run the runbook `rb`. opts: params (resolved), redacted_params, run_id,
-- dry_run, step, yes, from (step name), undo_on_failure, path (absolute) and
-- sha256 of the runbook file, lock_key, lease and lease_wait (a "k8s:" lock
-- key the engine takes as a Lease, waiting up to lease_wait seconds), and for a
-- resume: start (the step index to continue at) and restored = {outputs, completed,
-- skipped = {name = reason}} from the journal.
function M.run(rb, opts)
  local restored = opts.restored or { outputs = {}, completed = {} }
  local store = restored.outputs
  local run = { rb = rb, opts = opts, outputs = store, skipped = restored.skipped or {}, completed = {},
    ask_all = opts.step }
  for _, name in ipairs(restored.completed) do run.completed[#run.completed + 1] = rb.steps_by_name[name] end
  run.ctx = { params = setmetatable({}, { __index = opts.params,
      __newindex = function() error("ctx.params is read-only", 2) end }),
    outputs = outputs_table(rb, store, run.skipped), run_id = opts.run_id,
    dry_run = opts.dry_run or false, runbook = rb.name }
  --- Why the step `name` was skipped in this run ("operator" or "when"), or nil.
  function run.ctx.skipped(name)
    known_step(rb, name, "ctx.skipped")
    return run.skipped[name]
  end
  setmetatable(run.ctx, { __index = function(t, k)
    if k == "log" then t.log = require("log"); return t.log end
  end })
  function run.ctx.remaining()
    local d = host.deadline()
    return d and math.max(0, d - host.now()) or math.huge
  end
  host.set_mode(opts.dry_run and "dry-run" or "run")

  local total, t0 = #rb.steps, host.now()
  local counts = { ok = 0, failed = 0, skipped = 0 }
  local who = host.identity()
  events.emit { event = "run_start", run_id = opts.run_id, runbook = rb.name, version = rb.version,
    file = rb.file, path = opts.path, sha256 = opts.sha256, mode = opts.dry_run and "dry-run" or "run",
    params = opts.redacted_params, steps = total, user = who.user, host = who.host, pid = who.pid,
    lock = opts.lock_key, resumed = opts.restored ~= nil or nil,
    from = opts.from, resume_at = opts.start and rb.steps[opts.start] and rb.steps[opts.start].name or nil }

  -- A resume's answers about steps whose effects were of unknown outcome.
  for _, e in ipairs(opts.resolved or {}) do events.emit(e) end

  local status, code, failure = "ok", M.EXIT.ok, nil
  local lease
  if opts.lease then status, code, lease = take_lease(opts, who) end
  local from = opts.start or opts.from and rb.steps_by_name[opts.from].index or 1
  -- No steps run when the lease could not be taken.
  for i, step in ipairs(status == "ok" and rb.steps or {}) do
    events.step = step.name
    if i < from then goto continue end
    local alive, choice, reason = protected(rb, heartbeat.beat)
    if alive then choice, reason = decide(run, step, total) else choice, reason = "error", choice end
    if choice == "error" then
      failure = reason
    elseif choice == "quit" then
      events.emit { event = "step_end", step = step.name, index = i, status = "aborted", duration = 0 }
      status, code = "aborted", M.EXIT.aborted
      break
    elseif choice == "skip" then
      run.skipped[step.name] = reason
      counts.skipped = counts.skipped + 1
      events.emit { event = "step_end", step = step.name, index = i, status = "skipped", reason = reason, duration = 0 }
      goto continue
    elseif choice == "all" then
      run.said_all = true
    end
    do
      events.emit { event = "step_start", step = step.name, index = i, total = total, description = step.description }
      local s0 = host.now()
      local ok, res, attempts
      if failure then ok, res, attempts = false, failure, 0 else ok, res, attempts = run_with_retries(rb, step, new_ctx(run, step)) end
      local dur = since(s0)
      if ok then
        store[step.name] = res
        run.completed[#run.completed + 1] = step
        counts.ok = counts.ok + 1
        events.emit { event = "step_end", step = step.name, index = i, status = "ok", duration = dur,
          attempts = attempts, outputs = res }
      else
        local st = res.interrupted and "interrupted" or "failed"
        counts.failed = counts.failed + 1
        run.failed = { step = step.name, error = res.message }
        events.emit { event = "step_end", step = step.name, index = i, status = st, duration = dur,
          attempts = attempts, error = res }
        if res.interrupted then
          status, code = "interrupted", 128 + (res.signal or 2)
        else
          status, code = "failed", M.EXIT.failed
          if rb.on_failure == "undo" or opts.undo_on_failure then undo_completed(run) end
        end
        break
      end
    end
    ::continue::
  end
  events.step = nil
  if lease then
    local ok, e = pcall(lease.release, lease)
    if not ok then require("log").warn("the lease stays held until it expires: %s", host.redact(tostring(e))) end
  end
  if rb.notify then
    require("notify").run_hooks(rb.notify, { runbook = rb.name, run_id = opts.run_id, status = status,
      step = run.failed and run.failed.step, error = run.failed and run.failed.error, duration = since(t0),
      ok = counts.ok, dry_run = opts.dry_run })
  end
  events.emit { event = "run_end", run_id = opts.run_id, status = status, exit_code = code,
    duration = since(t0), ok = counts.ok, failed = counts.failed, skipped = counts.skipped,
    mode = opts.dry_run and "dry-run" or "run" }
  return code
end

return M
