--- One run of a runbook: what the operator asked for (the request, built
-- once by `run` and by `resume`), and everything around the step loop: the
-- params, the lock or Lease, the journal, the output sinks, the signal
-- handlers, run_start and run_end, the notifications. The engine
-- (runbook.engine) runs the steps of the run object made here.
local events = require("runbook.events")
local EXIT = require("runbook.exit")
local deadline = require("runbook.deadline")
local host = require("runbook.host")

local M = {}

local function say(fmt, ...)
  io.stderr:write(host.redact("runbook: " .. fmt:format(...) .. "\n"))
end

--- The request from the CLI's parsed options `o`: {given = {"k=v"...},
-- params_file, mode = "run"|"dry-run", step, yes, from, outputs_from,
-- lock = KEY|true|nil, wait (seconds), undo_on_failure, output = "text"|"json"}.
-- `resume` builds the same table from the journal; `apply` adds plan (its id,
-- digest and approvals, journaled), `plan` a sink that sees every event.
function M.request(o)
  local given = {}
  for _, kv in ipairs(o["-p"] or {}) do given[#given + 1] = kv end
  for _, kv in ipairs(o["--param"] or {}) do given[#given + 1] = kv end
  return {
    given = given, params_file = o["--params-file"], mode = o["--dry-run"] and "dry-run" or "run",
    step = o["--step"] or nil, yes = (o["--yes"] or o["-y"]) or nil, from = o["--from"],
    outputs_from = o["--outputs-from"], lock = o["--lock"], push_metrics = o["--push-metrics"],
    wait = o["--wait-lock"] or 0,
    undo_on_failure = o["--undo-on-failure"] or nil, output = o["--output"] or "text", run_id = o["--run-id"],
  }
end

--- What a resume restores of the request that started the run (journaled in run_start).
function M.journaled(req)
  return { step = req.step, yes = req.yes, wait = req.wait, undo_on_failure = req.undo_on_failure,
    output = req.output, outputs_from = req.outputs_from, plan = req.plan, terminal = host.isatty(0) }
end

--- Refuse before anything runs when we would have to ask and cannot.
local function check_can_ask(rb, req)
  if req.yes or host.isatty(0) then return true end
  if req.step then
    return false, "--step asks before each step, but standard input is not a terminal; use --yes to run unattended"
  end
  if req.mode == "dry-run" then return true end
  for _, s in ipairs(rb.steps) do
    if s.confirm then
      return false, ("step '%s' asks for confirmation (confirm = true), but standard input is not a terminal; "
        .. "pass --yes to run it unattended"):format(s.name)
    end
  end
  return true
end

--- The lock key of the run, or nil for a dry run without --lock.
local function lock_key(rb, req)
  if req.mode == "dry-run" and not req.lock then return nil end
  return type(req.lock) == "string" and req.lock or rb.lock or rb.name
end

--- Check a lock key before anything runs: a Lease needs a valid name and a
-- Kubernetes configuration. Returns true or nil and why.
local function check_lock(key)
  if not (key and key:match("^k8s:")) then return true end
  local ok, why = require("runbook.lock").lease_name(key)
  if not ok then return nil, why end
  local cok, err = pcall(require("k8s.config").resolve)
  if not cok then return nil, ("lock %s: %s"):format(key, type(err) == "table" and err.message or tostring(err)) end
  return true
end

--- Take the file lock `key`. Returns the lock, or nil and the exit status.
local function take_file_lock(run, key)
  local who = host.identity()
  local holder = { run_id = run.id, pid = who.pid, user = who.user, host = who.host,
    since = events.iso8601(host.wallclock()), runbook = run.rb.name }
  local ok, lock, why = pcall(require("runbook.lock").acquire, key, holder, run.request.wait)
  if not ok then
    local sig = host.interrupted()
    if sig then say("interrupted by %s while waiting for the lock %s", EXIT.signal_name(sig), key)
      return nil, EXIT.interrupted(sig) end
    say("lock %s: %s", key, type(lock) == "table" and lock.message or tostring(lock))
    return nil, EXIT.usage
  end
  if not lock then
    say("%s", why)
    if run.request.wait == 0 then io.stderr:write("Use --wait-lock DURATION to wait for it.\n") end
    return nil, EXIT.locked
  end
  return lock
end

--- Take the run's Lease (a journaled effect, so after run_start). Returns the
-- lock, or nil, the status and exit status the run ends with.
local function take_lease(run, key)
  local who = host.identity()
  local ok, lock, why = pcall(require("runbook.lock").lease, key,
    { user = who.user, host = who.host, pid = who.pid, run_id = run.id }, run.request.wait)
  if ok and lock then return lock end
  local locked = ok or type(lock) == "table" and lock.code == "locked"
  require("log").error("%s", ok and why or tostring(type(lock) == "table" and lock.message or lock))
  if locked then return nil, "locked", EXIT.locked end
  local sig = host.interrupted()
  if sig then return nil, "interrupted", EXIT.interrupted(sig) end
  return nil, "failed", EXIT.failed
end

-- Seconds a Lease's release may take after the run was interrupted.
M.LEASE_RELEASE_DEADLINE = 5

--- Hand the Lease back, whatever ended the run. After SIGINT, SIGTERM or
-- SIGHUP the release would be cut short by the signal too: the run's
-- status already holds it, so it is cleared, and the release gets a short
-- deadline of its own instead.
local function release_lease(lease)
  if host.interrupted() then host.clear_interrupt() end
  host.set_deadline(host.now() + M.LEASE_RELEASE_DEADLINE)
  local ok, e = pcall(lease.release, lease)
  host.set_deadline(0)
  if not ok then
    require("log").warn("the lease stays held until it expires: %s", tostring(type(e) == "table" and e.message or e))
  end
end

local function install_sinks(run, journal_sink)
  local output = require("runbook.output")
  events.reset(run)
  if run.request.output == "json" then
    events.add_sink(output.json(io.stdout))
  else
    events.add_sink(output.human(io.stdout, host.isatty(1)))
  end
  events.add_sink(journal_sink)
  if run.request.sink then events.add_sink(run.request.sink) end   -- runbook plan's collector
  local function sink(kind)
    return function(e)
      e.event = kind
      events.emit(e)
    end
  end
  host.set_effect_sink(sink("effect"), sink("intent"))
end

local function new_run_id()
  local f = io.open("/dev/urandom", "rb")
  local bytes = f and f:read(4) or tostring(host.now())
  if f then f:close() end
  return os.date("!%Y%m%dT%H%M%SZ") .. "-" .. (bytes:gsub(".", function(c) return ("%02x"):format(c:byte()) end))
end

--- A run id given with --run-id (runbook serve names its children's runs, to
-- answer with the id): new, and shaped like the ones made here.
local function check_run_id(id)
  if id == nil then return true end
  if not id:match("^%d%d%d%d%d%d%d%dT%d%d%d%d%d%dZ%-%x+$") then
    return false, ("--run-id %s: expected an id like 20260101T000000Z-0a1b2c3d"):format(id)
  end
  if require("lfs").attributes(require("runbook.journal").path(id)) then return false, ("--run-id %s: that run exists"):format(id) end
  return true
end

--- `path` against the working directory.
M.absolute = host.absolute

--- For --from: the steps before it, {outputs (from run req.outputs_from),
-- skipped = {name = "from"} for the others}, or nil; nil and why when a step
-- from there on needs one whose outputs are missing.
local function earlier_steps(rb, req)
  if not req.from then return nil end
  local from, outputs, skipped = rb.steps_by_name[req.from].index, {}, {}
  if req.outputs_from then
    local journal = require("runbook.journal")
    local events, err = journal.read(req.outputs_from)
    if not events then return nil, "--outputs-from: " .. err end
    local s = journal.summarize(events)
    if s.start.runbook ~= rb.name then
      return nil, ("--outputs-from: run %s is of runbook %s, not %s"):format(req.outputs_from, s.start.runbook, rb.name)
    end
    for i = 1, from - 1 do
      local st = s.steps[rb.steps[i].name]
      if st and st.status == "ok" then outputs[rb.steps[i].name] = st.outputs or {} end
    end
  end
  for i = 1, from - 1 do skipped[rb.steps[i].name] = not outputs[rb.steps[i].name] and "from" or nil end
  local missing = {}
  for i = from, #rb.steps do
    for _, need in ipairs(rb.steps[i].needs) do
      if skipped[need] then
        missing[#missing + 1] = ("'%s' (needed by '%s')"):format(need, rb.steps[i].name)
        skipped[need] = false
      end
    end
  end
  if #missing > 0 then
    return nil, ("--from '%s': no outputs of %s%s"):format(req.from, table.concat(missing, ", "), req.outputs_from
      and (" in run " .. req.outputs_from) or "; take them from an earlier run with --outputs-from RUN_ID")
  end
  return { outputs = outputs, completed = {}, skipped = skipped }
end

--- What the run loaded besides the runbook, for resume's content guard: the
-- Lua files it required so far and the params file, {path, sha256[, params]}.
local function sources(req)
  local out = {}
  for i, rec in ipairs(require("runbook.env").sources) do out[i] = { path = rec.path, sha256 = rec.sha256 } end
  if req.params_file and require("runbook.params").rereadable(req.params_file) then
    local sha = host.sha256_file(req.params_file)
    out[#out + 1] = { path = M.absolute(req.params_file), sha256 = sha, params = true }
  end
  return #out > 0 and out or nil
end

--- Resolve the params of `req` over `base` (a resumed run's). Returns values,
-- their redacted copy and the redacted text as written, or nil and the exit status.
local function resolve_params(rb, req, base)
  local params = require("runbook.params")
  local ok, values, written = pcall(params.resolve, rb, req.given, req.params_file, base)
  if not ok then
    if getmetatable(values) == params.ParamError then say("%s", values.message); return nil, EXIT.usage end
    error(values, 0)
  end
  return values, params.redacted(rb, values), params.redacted(rb, written)
end

--- The run `req` asks for, checked before anything runs: params, prompts
-- that need a terminal, the lock key, --from's needs. Returns the run, or nil
-- and the exit status (having said why).
local function new_run(rb, req, resumed)
  local values, redacted, written = resolve_params(rb, req, resumed.params)
  if not values then return nil, redacted end
  local key = lock_key(rb, req)
  local ok, why = check_can_ask(rb, req)
  if ok then ok, why = check_run_id(req.run_id) end
  if ok then ok, why = check_lock(key) end
  local earlier
  if ok then earlier, why = earlier_steps(rb, req); ok = not why end
  if not ok then say("%s", why); return nil, EXIT.usage end
  local restored = resumed.restored or earlier
  if resumed.restored and earlier then -- a resumed --from run: the outputs it took from the earlier run
    for name, out in pairs(earlier.outputs) do restored.outputs[name] = restored.outputs[name] or out end
  end
  return { rb = rb, request = req, id = resumed.id or req.run_id or new_run_id(), params = values, redacted = redacted,
    written = written, lock_key = key, dry_run = req.mode == "dry-run", start = resumed.start, restored = restored,
    resumed = resumed.id ~= nil, resolved = resumed.resolved }
end

--- Take the file lock, open the journal, install the sinks and signal
-- handlers, set the mode. Returns the file lock (true when none), or nil and the exit status.
local function open(run)
  local key, lock = run.lock_key, true
  if key and not key:match("^k8s:") then
    local code
    lock, code = take_file_lock(run, key)
    if not lock then return nil, code end
  end
  local ok, sink = pcall(require("runbook.journal").sink, run.id)
  if not ok then
    if lock ~= true then lock:release() end
    say("%s", type(sink) == "table" and sink.message or tostring(sink))
    return nil, type(sink) == "table" and sink.code == "locked" and EXIT.locked or EXIT.usage
  end
  install_sinks(run, sink)
  host.install_signal_handlers()
  math.randomseed(math.floor(host.wallclock() * 1e6), host.identity().pid)   -- two runs in one ms differ too
  host.set_mode(run.dry_run and "dry-run" or "run")
  return lock
end

local function run_start(run)
  local rb, req, who = run.rb, run.request, host.identity()
  events.emit { event = "run_start", run_id = run.id, runbook = rb.name, version = rb.version, file = rb.file,
    path = M.absolute(rb.file), sha256 = host.sha256(rb.source), mode = req.mode, params = run.redacted,
    params_text = run.written, steps = #rb.steps, user = who.user, host = who.host, pid = who.pid,
    lock = run.lock_key, request = M.journaled(req), resumed = run.resumed or nil, from = req.from,
    sources = sources(req),
    resume_at = run.start and rb.steps[run.start] and rb.steps[run.start].name or nil }
  -- Lua files the runbook requires from here on are journaled as they load.
  require("runbook.env").on_source = function(rec)
    events.emit { event = "source", path = rec.path, sha256 = rec.sha256 }
  end
  -- A resume's answers about steps cut off with effects (their check's, or the operator's).
  for _, e in ipairs(run.resolved or {}) do events.emit(e) end
end

--- Release the Lease, notify, emit run_end.
local function finish(run, lease, status, code, counts, t0)
  if lease then release_lease(lease) end
  if run.rb.notify then
    deadline.call(deadline.LIMIT.notify, deadline.notify_watch(run.id, status), pcall, require("notify").run_hooks,
      run.rb.notify, { runbook = run.rb.name, run_id = run.id, status = status,
      step = run.failed and run.failed.step, error = run.failed and run.failed.error, duration = host.now() - t0,
      ok = counts.ok, dry_run = run.dry_run })
  end
  events.emit { event = "run_end", run_id = run.id, status = status, exit_code = code,
    duration = math.floor((host.now() - t0) * 1000 + 0.5) / 1000, ok = counts.ok, failed = counts.failed,
    skipped = counts.skipped, mode = run.request.mode, signal = run.signal and EXIT.signal_name(run.signal) or nil }
end

--- A run that ended pushes its metrics (runbook.metrics) when asked to; a dry run does not.
local function push_metrics(run, code, took)
  local url = run.request.push_metrics or os.getenv("RUNBOOK_PUSHGATEWAY")
  if run.dry_run or not url or url == "" then return end
  local ok, why = require("runbook.metrics").push(url, run.rb.name, code, took)
  if not ok then say("the run's metrics were not pushed to %s: %s", url, why) end
end

--- Run `rb` as `req` asks. `resumed` continues a journaled run: {id, params
-- (the journal's), start (the step index to continue at), restored =
-- {outputs, completed, skipped}}. Returns the exit status.
function M.start(rb, req, resumed)
  local run, code = new_run(rb, req, resumed or {})
  if not run then return code end
  local lock
  lock, code = open(run)
  if not lock then return code end
  local t0, counts = host.now(), { ok = 0, failed = 0, skipped = 0 }
  run_start(run)
  local lease, status
  if run.lock_key and run.lock_key:match("^k8s:") then lease, status, code = take_lease(run, run.lock_key) end
  if status == nil then status, code = require("runbook.engine").run(run, counts) end
  finish(run, lease, status, code, counts, t0)
  if lock ~= true then lock:release() end
  local jfail = require("runbook.journal").failure
  if jfail then
    say("the run stopped: %s (journal %s, cut back to its last whole line); free space, then: runbook resume %s",
      type(jfail) == "table" and jfail.message or tostring(jfail), require("runbook.journal").path(run.id), run.id)
    code = EXIT.journal
  end
  push_metrics(run, code, host.now() - t0)
  return code
end

return M
