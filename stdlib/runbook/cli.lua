--- The command line: `runbook COMMAND ...`. Returns the exit status
-- (runbook.exit). `run` and `resume` hand a request to runbook.run.
local host = require "runbook.host"

local M = {}

M.VERSION = "0.1.0"

local USAGE = [==[
usage: runbook COMMAND [ARGS]

  run FILE|NAME [-p key=value]... [--params-file F] [--dry-run] [--step] [--yes]
                [--output json] [--from STEP [--outputs-from RUN_ID]] [--undo-on-failure]
                [--lock[=KEY]] [--lock k8s:NAMESPACE/NAME] [--wait-lock DURATION]
                        run a runbook
  resume RUN_ID [--force] [--rerun-interrupted] [-p secret=value]... [--yes] [--step]
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
3 runbook cannot be loaded, 4 aborted by the operator, 75 lock held by
another run, 130/143 interrupted.
]==]

local EXIT = require "runbook.exit"

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

local RUN_OPTS = { ["-p"] = "list", ["--param"] = "list", ["--params-file"] = "value", ["--dry-run"] = "flag",
  ["--step"] = "flag", ["--yes"] = "flag", ["-y"] = "flag", ["--output"] = "value", ["--from"] = "value",
  ["--outputs-from"] = "value",
  ["--undo-on-failure"] = "flag", ["--lock"] = "optional", ["--wait-lock"] = "value" }

local RESUME_OPTS = { ["-p"] = "list", ["--step"] = "flag", ["--yes"] = "flag", ["-y"] = "flag",
  ["--output"] = "value", ["--force"] = "flag", ["--rerun-interrupted"] = "flag", ["--wait-lock"] = "value",
  ["--undo-on-failure"] = "flag" }

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

local commands = {}

function commands.run(args)
  local o, ocode = parse_run_like("run", args, RUN_OPTS, "runbook FILE or NAME")
  if not o then return ocode end
  local rb, code = load_runbook(o.positional[1])
  if not rb then return code end
  if o["--from"] and not rb.steps_by_name[o["--from"]] then
    return usage_error("--from: %s has no step named '%s'", rb.name, o["--from"])
  end
  if o["--outputs-from"] and not o["--from"] then return usage_error("--outputs-from goes with --from STEP") end
  return require("runbook.run").start(rb, require("runbook.run").request(o))
end

function commands.resume(args)
  local o, ocode = parse_run_like("resume", args, RESUME_OPTS, "RUN_ID (see 'runbook history')")
  if not o then return ocode end
  local plan, code = require("runbook.resume").plan(o.positional[1], o, load_runbook)
  if not plan then return code end
  return require("runbook.run").start(plan.rb, plan.request, plan.resumed)
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
    local problems = rb and require("runbook.loader").undeclared_reads(rb) or {}
    for _, p in ipairs(problems) do print(p) end
    if not rb then
      worst = code
    elseif #problems > 0 then
      worst = math.max(worst, EXIT.failed)
    else
      print(("%s: ok (%d params, %d steps)"):format(rb.file, #rb.params, #rb.steps))
    end
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
