--- The command line: `runbook COMMAND ...`. Returns the exit status
-- (DESIGN.md: 0 ok, 1 step failed, 2 usage/params, 3 cannot load, 4 aborted).
local events = require "runbook.events"
local host = require "runbook.host"

local M = {}

M.VERSION = "0.1.0"

local USAGE = [==[
usage: runbook COMMAND [ARGS]

  run FILE|NAME [-p key=value]... [--params-file F] [--dry-run] [--step] [--yes]
                [--output json] [--from STEP] [--undo-on-failure]
                [--lock[=KEY]] [--lock k8s:NAMESPACE/NAME] [--wait-lock DURATION]
                        run a runbook
  resume RUN_ID [--force] [--rerun-interrupted] [--on-unknown=fail|redo|skip]
                [-p secret=value]... [--yes] [--step]
                        continue a failed, aborted, interrupted or killed run
  history [--runbook NAME] [--limit N] [--output json]
                        past runs, newest first
  report RUN_ID [--format markdown|json]
                        a run's timeline for a postmortem
  describe FILE|NAME    show its params and steps (nothing runs)
  lint FILE|NAME...     load and check runbooks (nothing runs)
  list                  runbooks on RUNBOOK_PATH with their descriptions
  test [PATH...]        run busted specs inside the host (default: spec/)
  version               print the version
  help                  this text

Exit status: 0 success, 1 a step failed, 2 usage or parameter error,
3 runbook cannot be loaded, 4 aborted by the operator, 74 the journal
cannot be written (a full disk), 75 lock held by another run, 76 an
effect's outcome is unknown (resume --on-unknown), 130/143 interrupted.
]==]

local EXIT = require("runbook.engine").EXIT

local function err(fmt, ...)
  io.stderr:write(host.redact("runbook: " .. fmt:format(...) .. "\n"))
end

local function usage_error(fmt, ...)
  err(fmt, ...)
  io.stderr:write("Try 'runbook help'.\n")
  return EXIT.usage
end

--- Directories searched for `run NAME` and `list`: RUNBOOK_PATH, else
-- ./runbooks and the shipped runbooks.
local function search_path()
  local dirs = {}
  local default = "runbooks:" .. host.stdlib_dir .. "/../runbooks"
  for d in (os.getenv("RUNBOOK_PATH") or default):gmatch("[^:]+") do dirs[#dirs + 1] = d end
  return dirs
end

local function resolve_runbook(ref)
  if ref:match("%.lua$") or ref:find("/", 1, true) then return ref end
  for _, d in ipairs(search_path()) do
    local p = d .. "/" .. ref .. ".lua"
    local f = io.open(p, "rb")
    if f then f:close(); return p end
  end
  return nil, ("no runbook named '%s' on RUNBOOK_PATH (%s)"):format(ref, table.concat(search_path(), ":"))
end

--- Load a runbook by file or name; on failure print why and return nil, exit status.
local function load_runbook(ref)
  local path, perr = resolve_runbook(ref)
  if not path then err("%s", perr); return nil, EXIT.load end
  local loader = require "runbook.loader"
  local ok, rb = pcall(loader.load, path)
  if ok then return rb end
  if getmetatable(rb) == loader.LoadError then
    err("cannot load runbook: %s", rb.message)
  else
    err("internal error loading %s: %s", path, tostring(rb))
  end
  return nil, EXIT.load
end

--- Parse argv into {command, positional = {...}, flags}. `spec` maps each
-- option to "flag", "value" or "list".
local function parse(args, spec)
  local o = { positional = {} }
  local i = 1
  while i <= #args do
    local a = args[i]
    local name, inline = a:match("^(%-%-?[%w%-]+)=(.*)$")
    name = name or a
    local kind = spec[name]
    if kind == "flag" then
      if inline then return nil, ("%s takes no value"):format(name) end
      o[name] = true
    elseif kind == "optional" then
      -- A separate value only when it cannot be the runbook: "--lock k8s:ops/nightly".
      if not inline and args[i + 1] and args[i + 1]:match("^k8s:") then i = i + 1; inline = args[i] end
      o[name] = inline or true
    elseif kind == "value" or kind == "list" then
      local v = inline
      if not v then i = i + 1; v = args[i] end
      if v == nil then return nil, ("%s needs a value"):format(name) end
      if kind == "list" then
        o[name] = o[name] or {}
        table.insert(o[name], v)
      else
        o[name] = v
      end
    elseif a:sub(1, 1) == "-" and a ~= "-" then
      return nil, ("unknown option %s"):format(a)
    else
      o.positional[#o.positional + 1] = a
    end
    i = i + 1
  end
  return o
end

local function new_run_id()
  local f = io.open("/dev/urandom", "rb")
  local bytes = f and f:read(4) or tostring(host.now())
  if f then f:close() end
  return os.date("!%Y%m%dT%H%M%SZ") .. "-" .. (bytes:gsub(".", function(c) return ("%02x"):format(c:byte()) end))
end

local RUN_OPTS = { ["-p"] = "list", ["--param"] = "list", ["--params-file"] = "value", ["--dry-run"] = "flag",
  ["--step"] = "flag", ["--yes"] = "flag", ["-y"] = "flag", ["--output"] = "value", ["--from"] = "value",
  ["--undo-on-failure"] = "flag", ["--lock"] = "optional", ["--wait-lock"] = "value" }

local RESUME_OPTS = { ["-p"] = "list", ["--step"] = "flag", ["--yes"] = "flag", ["-y"] = "flag",
  ["--output"] = "value", ["--force"] = "flag", ["--rerun-interrupted"] = "flag", ["--wait-lock"] = "value",
  ["--undo-on-failure"] = "flag", ["--on-unknown"] = "value" }

--- Refuse before anything runs when we would have to ask and cannot.
local function check_can_ask(rb, o)
  if o["--yes"] or o["-y"] or host.isatty(0) then return true end
  if o["--step"] then
    return false, "--step asks before each step, but standard input is not a terminal; use --yes to run unattended"
  end
  if o["--dry-run"] then return true end
  for _, s in ipairs(rb.steps) do
    if s.confirm then
      return false, ("step '%s' asks for confirmation (confirm = true), but standard input is not a terminal; "
        .. "pass --yes to run it unattended"):format(s.name)
    end
  end
  return true
end

local function install_sinks(o, journal_sink)
  local output = require "runbook.output"
  events.reset()
  if o["--output"] == "json" then
    events.add_sink(output.json(io.stdout))
  else
    events.add_sink(output.human(io.stdout, host.isatty(1)))
  end
  events.add_sink(journal_sink)
  local function sink(kind)
    return function(e)
      e.event, e.step = kind, events.step
      events.emit(e)
    end
  end
  host.set_effect_sink(sink("effect"), sink("intent"))
end

--- Parse a run-like command's options: one positional `what`, and valid
-- --output and --wait-lock values. Returns the options, or nil and the exit status.
local function parse_run_like(cmd, args, spec, what)
  local o, perr = parse(args, spec)
  if not o then return nil, usage_error("%s: %s", cmd, perr) end
  if #o.positional ~= 1 then return nil, usage_error("%s: expected one %s", cmd, what) end
  if o["--output"] and o["--output"] ~= "json" and o["--output"] ~= "text" then
    return nil, usage_error("%s: --output must be json or text", cmd)
  end
  local wait = o["--wait-lock"]
  if wait and not require("duration").parse(wait) then
    return nil, usage_error("%s: --wait-lock: %s", cmd, select(2, require("duration").parse(wait)))
  end
  return o
end

local function absolute(path)
  if path:sub(1, 1) == "/" then return path end
  return require("lfs").currentdir() .. "/" .. path:gsub("^%./", "")
end

--- Take the run's lock unless it is a dry run without --lock. Returns the
-- lock (or true when none is needed), or nil and the exit status.
local function lock_key(rb, o)
  return type(o["--lock"]) == "string" and o["--lock"] or rb.lock or rb.name
end

local function take_lock(rb, o, run_id)
  if o["--dry-run"] and not o["--lock"] then return true end
  local key = lock_key(rb, o)
  local locks = require "runbook.lock"
  if key:match("^k8s:") then
    -- The engine takes a Lease once the run is journaled: the write is an effect.
    local ok, why = locks.lease_name(key)
    if not ok then return nil, usage_error("%s", why) end
    return true, key
  end
  local who = host.identity()
  local holder = { run_id = run_id, pid = who.pid, user = who.user, host = who.host,
    since = events.iso8601(host.wallclock()), runbook = rb.name }
  local wait = o["--wait-lock"] and require("duration").parse(o["--wait-lock"]) or 0
  local ok, lock, why = pcall(locks.acquire, key, holder, wait)
  if not ok then err("waiting for the lock: %s", tostring(lock)); return nil, 128 + (host.interrupted() or 2) end
  if not lock then
    err("%s", why)
    if wait == 0 then io.stderr:write("Use --wait-lock DURATION to wait for it.\n") end
    return nil, EXIT.locked
  end
  return lock
end

--- Everything a run and a resume share once params are known: the lock, the
-- journal, the sinks, the engine. `run` holds the engine options.
local function start_run(rb, o, run)
  local can, why = check_can_ask(rb, o)
  if not can then return usage_error("%s", why) end
  local lock, lease = take_lock(rb, o, run.run_id)
  if not lock then return lease end
  local jok, sink = pcall(require("runbook.journal").sink, run.run_id)
  if not jok then
    if lock ~= true then lock:release() end
    if type(sink) == "table" then err("%s", sink.message); return EXIT.locked end
    err("%s", sink)
    return EXIT.usage
  end
  install_sinks(o, sink)
  host.install_signal_handlers()
  math.randomseed(math.floor(host.wallclock() * 1000))
  run.step, run.yes = o["--step"], o["--yes"] or o["-y"]
  run.undo_on_failure = o["--undo-on-failure"]
  run.lock_key = lock_key(rb, o)
  run.lease, run.lease_wait = lease, o["--wait-lock"] and require("duration").parse(o["--wait-lock"]) or 0
  local status = require("runbook.engine").run(rb, run)
  if lock ~= true then lock:release() end
  local jfail = require("runbook.journal").failure
  if jfail then
    err("the run stopped: %s (journal %s, cut back to its last whole line). Free space, then: runbook resume %s",
      tostring(type(jfail) == "table" and jfail.message or jfail), require("runbook.journal").path(run.run_id), run.run_id)
    return EXIT.journal
  end
  return status
end

local commands = {}

local function resolve_params(rb, o, base)
  local params_mod = require "runbook.params"
  local given = o["-p"] or {}
  for _, kv in ipairs(o["--param"] or {}) do given[#given + 1] = kv end
  local ok, values = pcall(params_mod.resolve, rb, given, o["--params-file"], base)
  if not ok then
    if getmetatable(values) == params_mod.ParamError then return nil, usage_error("%s", values.message) end
    error(values, 0)
  end
  return values, params_mod.redacted(rb, values)
end

function commands.run(args)
  local o, ocode = parse_run_like("run", args, RUN_OPTS, "runbook FILE or NAME")
  if not o then return ocode end
  local rb, code = load_runbook(o.positional[1])
  if not rb then return code end
  local values, redacted = resolve_params(rb, o)
  if not values then return redacted end
  if o["--from"] and not rb.steps_by_name[o["--from"]] then
    return usage_error("--from: %s has no step named '%s'", rb.name, o["--from"])
  end
  return start_run(rb, o, {
    params = values, redacted_params = redacted, run_id = new_run_id(), dry_run = o["--dry-run"],
    from = o["--from"], path = absolute(rb.file), sha256 = host.sha256(rb.source),
  })
end

function commands.resume(args)
  local o, ocode = parse_run_like("resume", args, RESUME_OPTS, "RUN_ID (see 'runbook history')")
  if not o then return ocode end
  local unknown = o["--on-unknown"]
  if unknown and unknown ~= "fail" and unknown ~= "redo" and unknown ~= "skip" then
    return usage_error("resume: --on-unknown must be fail, redo or skip")
  end
  local plan, code = require("runbook.resume").plan(o.positional[1], o, load_runbook)
  if not plan then return code end
  for _, kv in ipairs(o["-p"] or {}) do
    local p = plan.rb.params_by_name[kv:match("^([^=]*)")]
    if not (p and p.secret) then
      return usage_error("resume: -p %s: a resumed run keeps its params; only secret params, which the journal "
        .. "does not hold, are given again", kv)
    end
  end
  local values, redacted = resolve_params(plan.rb, o, plan.params)
  if not values then return redacted end
  plan.run.params, plan.run.redacted_params = values, redacted
  return start_run(plan.rb, o, plan.run)
end

function commands.history(args)
  local o, perr = parse(args, { ["--runbook"] = "value", ["--limit"] = "value", ["--output"] = "value" })
  if not o then return usage_error("history: %s", perr) end
  local limit = tonumber(o["--limit"] or "20")
  if not limit or limit < 1 then return usage_error("history: --limit must be a positive number") end
  return require("runbook.report").history(o["--runbook"], math.floor(limit), o["--output"] == "json")
end

function commands.report(args)
  local o, perr = parse(args, { ["--format"] = "value" })
  if not o then return usage_error("report: %s", perr) end
  if #o.positional ~= 1 then return usage_error("report: expected one RUN_ID (see 'runbook history')") end
  local fmt = o["--format"] or "markdown"
  if fmt ~= "markdown" and fmt ~= "json" then return usage_error("report: --format must be markdown or json") end
  local text, rerr = require("runbook.report").report(o.positional[1], fmt)
  if not text then err("%s", rerr); return EXIT.usage end
  io.stdout:write(host.redact(text))
  return EXIT.ok
end

function commands.describe(args)
  if #args ~= 1 then return usage_error("describe: expected one runbook FILE or NAME") end
  local rb, code = load_runbook(args[1])
  if not rb then return code end
  print(require("runbook.describe").text(rb))
  return EXIT.ok
end

function commands.lint(args)
  if #args == 0 then return usage_error("lint: expected runbook FILEs or NAMEs") end
  local worst = EXIT.ok
  for _, ref in ipairs(args) do
    local rb, code = load_runbook(ref)
    if rb then print(("%s: ok (%d params, %d steps)"):format(rb.file, #rb.params, #rb.steps)) else worst = code end
  end
  return worst
end

function commands.list()
  local lfs = require "lfs"
  local loader = require "runbook.loader"
  for _, d in ipairs(search_path()) do
    if lfs.attributes(d, "mode") == "directory" then
      local files = {}
      for f in lfs.dir(d) do if f:match("%.lua$") then files[#files + 1] = f end end
      table.sort(files)
      for _, f in ipairs(files) do
        local ok, rb = pcall(loader.load, d .. "/" .. f)
        if ok then
          print(("%-28s %s"):format(f:gsub("%.lua$", ""), rb.description:match("^[^\n]*")))
        else
          print(("%-28s (cannot load: %s)"):format(f:gsub("%.lua$", ""), tostring(rb)))
        end
      end
    end
  end
  return EXIT.ok
end

function commands.test(args)
  return require("runbook.test").run(args)
end

function commands.version()
  print("runbook " .. M.VERSION .. " (" .. _VERSION .. ")")
  return EXIT.ok
end

function commands.help()
  io.stdout:write(USAGE)
  return EXIT.ok
end

function M.main(args)
  local cmd = args[1]
  if cmd == "--help" or cmd == "-h" then cmd = "help" end
  if cmd == "--version" then cmd = "version" end
  if not cmd then io.stderr:write(USAGE); return EXIT.usage end
  local fn = commands[cmd]
  if not fn then return usage_error("unknown command '%s'", cmd) end
  return fn(table.move(args, 2, #args, 1, {}))
end

return M
