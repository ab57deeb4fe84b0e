--- The command line: `runbook [GLOBAL OPTIONS] COMMAND ...`, parsed by
-- lua-argparse. Returns the exit status (runbook.exit). `run` and `resume`
-- hand a request to runbook.run; each option's target is its own flag
-- (o["--dry-run"]), as runbook.run and runbook.resume read it.
-- Modules that a plain run does not need are required where they are used:
-- loading them is most of start-up.
local host = require("runbook.host")

local M = {}

M.VERSION = "0.1.0"

local EXIT = require("runbook.exit")

--- "; did you mean 'x'?" when `word` is close to one of `names`, else "".
local function hint(word, names) return require("runbook.suggest").hint(word, names) end

local function err(fmt, ...)
  io.stderr:write(host.redact("runbook: " .. fmt:format(...) .. "\n"))
end

local function usage_error(cmd, fmt, ...)
  err(fmt, ...)
  io.stderr:write(("Try 'runbook help%s'.\n"):format(cmd and (" " .. cmd) or ""))
  return EXIT.usage
end

--- Directories searched for `run NAME` and `list`: RUNBOOK_PATH, else
-- ./runbooks and the shipped runbooks; a directory named twice (in the
-- checkout, ./runbooks is the shipped one) counts once.
local function search_path()
  local lfs = require("lfs")
  local dirs, seen = {}, {}
  local default = "runbooks:" .. host.stdlib_dir .. "/../runbooks"
  for d in (os.getenv("RUNBOOK_PATH") or default):gmatch("[^:]+") do
    local a = lfs.attributes(d)
    local id = a and (a.dev .. ":" .. a.ino) or d
    if not seen[id] then seen[id] = true; dirs[#dirs + 1] = d end
  end
  return dirs
end

--- Every runbook on the path, once by name (the first directory wins, as for
-- `run NAME`), sorted: {{name, path}...}.
local function runbooks_on_path()
  local lfs = require("lfs")
  local found, by_name = {}, {}
  for _, d in ipairs(search_path()) do
    if lfs.attributes(d, "mode") == "directory" then
      for f in lfs.dir(d) do
        local name = f:match("^(.+)%.lua$")
        if name and not by_name[name] then
          by_name[name] = true
          found[#found + 1] = { name = name, path = d .. "/" .. f }
        end
      end
    end
  end
  table.sort(found, function(a, b) return a.name < b.name end)
  return found
end

local function resolve_runbook(ref)
  if ref:match("%.lua$") or ref:find("/", 1, true) then return ref end
  local names = {}
  for _, rb in ipairs(runbooks_on_path()) do
    if rb.name == ref then return rb.path end
    names[#names + 1] = rb.name
  end
  return nil, ("no runbook named '%s' on RUNBOOK_PATH (%s)%s"):format(ref, table.concat(search_path(), ":"),
    hint(ref, names))
end

--- Load a runbook by file or name; on failure print why and return nil, exit status.
local function load_runbook(ref)
  local path, perr = resolve_runbook(ref)
  if not path then err("%s", perr); return nil, EXIT.load end
  local loader = require("runbook.loader")
  local ok, rb = pcall(loader.load, path)
  if ok then return rb end
  if getmetatable(rb) == loader.LoadError then
    err("cannot load runbook: %s", rb.message)
  else
    err("internal error loading %s: %s", path, tostring(rb))
  end
  return nil, EXIT.load
end

--- The runbook command `cmd` names (o.runbook), loaded; or nil and the exit status.
local function command_runbook(o, cmd)
  if not o.runbook then return nil, usage_error(cmd, "%s: expected one runbook FILE or NAME", cmd) end
  return load_runbook(o.runbook)
end

-- Each command's parser by name, for `runbook help COMMAND`: set by build.
local parsers

--- The parser (runbook.grammar): every command, or only `only`.
local function build(only)
  local p
  p, parsers = require("runbook.grammar").build(only)
  return p
end

-- ---- commands -------------------------------------------------------------------

local commands = {}

--- The help of `runbook run` for one runbook: its usage and its params.
local function runbook_help(parser, ref)
  local rb, code = load_runbook(ref)
  if not rb then return code end
  io.stdout:write(parser:get_help(), "\n\n", require("runbook.describe").text(rb), "\n")
  return EXIT.ok
end

function commands.run(o)
  local rb, code = command_runbook(o, "run")
  if not rb then return code end
  if o["--from"] and not rb.steps_by_name[o["--from"]] then
    local names = {}
    for _, s in ipairs(rb.steps) do names[#names + 1] = s.name end
    return usage_error("run", "--from: %s has no step named '%s'%s", rb.name, o["--from"], hint(o["--from"], names))
  end
  if o["--outputs-from"] and not o["--from"] then return usage_error("run", "--outputs-from goes with --from STEP") end
  return require("runbook.run").start(rb, require("runbook.run").request(o))
end

function commands.resume(o)
  if not o.run_id then return usage_error("resume", "resume: expected one RUN_ID (see 'runbook history')") end
  local plan, code = require("runbook.resume").plan(o.run_id, o, load_runbook)
  if not plan then return code end
  return require("runbook.run").start(plan.rb, plan.request, plan.resumed)
end

function commands.plan(o)
  local rb, code = command_runbook(o, "plan")
  if not rb then return code end
  local n = o["--require-approval"] and math.tointeger(tonumber(o["--require-approval"]))
  if o["--require-approval"] and not (n and n >= 0) then
    return usage_error("plan", "plan: --require-approval must be a whole number")
  end
  return require("runbook.plan").make(rb, require("runbook.run").request(o), o["--out"], n, o["--alert"])
end

function commands.apply(o)
  if not o.plan then return usage_error("apply", "apply: expected one plan FILE or ID") end
  return require("runbook.plan").apply(o.plan, o, load_runbook)
end

function commands.show(o)
  if not o.plan then return usage_error("show", "show: expected one plan FILE or ID") end
  return require("runbook.plan").show(o.plan, o["--format"])
end

function commands.approve(o)
  if not o.plan then return usage_error("approve", "approve: expected one plan FILE or ID") end
  local ttl
  if o["--expires"] then
    local why
    ttl, why = require("duration").parse(o["--expires"])
    if not ttl then return usage_error("approve", "approve: --expires: %s", why) end
  end
  return require("runbook.plan").approve(o.plan, o["--comment"], ttl)
end

function commands.serve(o)
  if not o["--rules"] then return usage_error("serve", "serve: --rules FILE is needed") end
  local nums = {}
  for _, name in ipairs { "--max-body", "--max-runs", "--request-timeout" } do
    nums[name] = o[name] and math.tointeger(tonumber(o[name]))
    if o[name] and not (nums[name] and nums[name] > 0) then
      return usage_error("serve", "serve: %s must be a positive whole number", name)
    end
  end
  return require("runbook.serve").serve({ rules = o["--rules"], listen = o["--listen"], token_file = o["--token-file"],
    users = o["--users"], max_body = nums["--max-body"], max_runs = nums["--max-runs"],
    timeout = nums["--request-timeout"], tls_cert = o["--tls-cert"], tls_key = o["--tls-key"] }, resolve_runbook)
end

function commands.history(o)
  local limit = tonumber(o["--limit"] or "20")
  if not limit or limit < 1 then return usage_error("history", "history: --limit must be a positive number") end
  return require("runbook.report").history(o["--runbook"], math.floor(limit), o["--output"] == "json")
end

function commands.report(o)
  if not o.run_id then return usage_error("report", "report: expected one RUN_ID (see 'runbook history')") end
  if o["--html"] and o["--format"] and o["--format"] ~= "html" then
    return usage_error("report", "report: --html and --format " .. o["--format"] .. " ask for different formats")
  end
  local text, rerr = require("runbook.report").report(o.run_id, o["--html"] and "html" or o["--format"] or "markdown")
  if not text then err("%s", rerr); return EXIT.usage end
  io.stdout:write(host.redact(text))
  return EXIT.ok
end

function commands.describe(o)
  local rb, code = command_runbook(o, "describe")
  if not rb then return code end
  print(require("runbook.describe").text(rb))
  return EXIT.ok
end

function commands.lint(o)
  if #o.runbooks == 0 then return usage_error("lint", "lint: expected runbook FILEs or NAMEs") end
  local worst = EXIT.ok
  for _, ref in ipairs(o.runbooks) do
    local rb, code = load_runbook(ref)
    local problems = rb and require("runbook.lint").check(rb) or {}
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
  local loader = require("runbook.loader")
  for _, f in ipairs(runbooks_on_path()) do
    local ok, rb = pcall(loader.load, f.path)
    if ok then
      print(("%-28s %s"):format(f.name, rb.description:match("^[^\n]*")))
    else
      print(("%-28s (cannot load: %s)"):format(f.name, tostring(rb)))
    end
  end
  return EXIT.ok
end

function commands.version()
  print("runbook " .. M.VERSION .. " (" .. _VERSION .. ")")
  return EXIT.ok
end

-- ---- main -----------------------------------------------------------------------

--- The global options take effect: verbosity and colour for the output,
-- --kubeconfig, --context and --namespace as the k8s library's defaults.
local function apply_globals(o)
  local output = require("runbook.output")
  output.verbosity = o["--verbose"] and 1 or o["--quiet"] and -1 or 0
  output.no_color = o["--no-color"] or nil
  if o["--kubeconfig"] or o["--context"] or o["--namespace"] then
    local defaults = require("k8s.config").defaults
    defaults.kubeconfig, defaults.context, defaults.namespace = o["--kubeconfig"], o["--context"], o["--namespace"]
  end
end

--- argparse's message as one line: "unknown option '--dryrun'; did you mean '--dry-run'?"
local function one_line(msg)
  return (msg:gsub("\nDid you mean", "; did you mean"):gsub("\n", " "))
end

-- The host's own print (history, describe, list) passes redaction as every
-- other output does.
local function redacting_print(...)
  local parts = table.pack(...)
  for i = 1, parts.n do parts[i] = tostring(parts[i]) end
  io.stdout:write(host.redact(table.concat(parts, "\t", 1, parts.n) .. "\n"))
end

-- Global options that take a value, whose value is not the command.
local GLOBAL_VALUE = { ["-o"] = true, ["--output"] = true, ["--kubeconfig"] = true, ["--context"] = true,
  ["-n"] = true, ["--namespace"] = true }

--- Where the command word is in args (nil when there is none).
local function command_index(args)
  local i = 1
  while args[i] do
    local a = args[i]
    if a:sub(1, 1) ~= "-" then return i end
    i = i + (GLOBAL_VALUE[a] and 2 or 1)
  end
end

-- The options of the usual `run FILE|NAME ...` (a script's or a timer's),
-- by name -> target: flags, and options that take the next word as value.
local PLAIN_FLAGS = { ["--dry-run"] = "--dry-run", ["-y"] = "--yes", ["--yes"] = "--yes",
  ["--step"] = "--step", ["--undo-on-failure"] = "--undo-on-failure", ["-v"] = "--verbose",
  ["--verbose"] = "--verbose", ["-q"] = "--quiet", ["--quiet"] = "--quiet", ["--no-color"] = "--no-color" }
local PLAIN_VALUES = { ["-p"] = "-p", ["--param"] = "-p", ["-o"] = "--output", ["--output"] = "--output",
  ["--run-id"] = "--run-id", ["--params-file"] = "--params-file" }
local OUTPUTS = { text = true, json = true }

--- Whether `value` is one the plain reading takes for option `target`.
local function plain_value(target, value)
  if target == "--output" then return OUTPUTS[value] end
  return value and value:sub(1, 1) ~= "-"
end

--- The options of `run` in its usual forms, as argparse would return them,
-- read without building the grammar (most of a no-op run's start-up). nil
-- for anything else: another option, a joined or missing value, a repeated
-- flag, --help; argparse parses those, so its messages stay the only ones.
local function plain_run(args)
  if args[1] ~= "run" then return nil end
  local o = { command = "run", run = true, ["-p"] = {} }
  local i = 2
  while args[i] do
    local a, value = args[i], args[i + 1]
    local target = PLAIN_FLAGS[a] or PLAIN_VALUES[a]
    if a:sub(1, 1) ~= "-" then
      if o.runbook then return nil end
      o.runbook = a
    elseif PLAIN_FLAGS[a] and not o[target] then
      o[target] = true
    elseif target == "-p" and plain_value(target, value) then
      table.insert(o["-p"], value)
      i = i + 1
    elseif PLAIN_VALUES[a] and plain_value(target, value) and not o[target] then
      o[target] = value
      i = i + 1
    else
      return nil
    end
    i = i + 1
  end
  return o.runbook and o
end

--- `runbook help [COMMAND]`, `runbook COMMAND --help`, and bare `runbook`
-- (the usage on stderr, exit 2).
local function show_help(parser, o)
  local topic = o.command
  if topic == "help" and not o.help then topic = o.topic end
  local sub = topic and parsers[topic]
  if topic and not sub then
    local names = {}
    for name in pairs(parsers) do names[#names + 1] = name end
    return usage_error(nil, "help: no command '%s'%s", topic, hint(topic, names))
  end
  if topic == "run" and o.runbook then return runbook_help(sub, o.runbook) end
  local asked = o.command or o.help
  local out = asked and io.stdout or io.stderr
  out:write((sub or parser):get_help(), "\n")
  return asked and EXIT.ok or EXIT.usage
end

-- What a run loads before its run_start, whatever its command: the zygote loads it once.
local ZYGOTE_PRELOAD = { "runbook.run", "runbook.loader", "runbook.env", "runbook.deadline", "runbook.journal",
  "runbook.events", "runbook.params", "runbook.output", "runbook.engine", "runbook.heartbeat", "runbook.lock",
  "runbook.plan", "runbook.grammar", "argparse", "duration", "cjson", "lfs" }

--- `runbook serve --zygote`, serve's pre-loaded child (host/zygote.c): the
-- command line of a run forked from it, or nil once serve has gone (and why
-- when this is not serve's child).
local function zygote()
  for _, name in ipairs(ZYGOTE_PRELOAD) do require(name) end
  collectgarbage()
  local args, why = host.zygote_wait()
  -- A forked run starts with the zygote's random state: its own, as an exec'd run's is.
  if args then math.randomseed(math.floor(host.wallclock() * 1e6), host.identity().pid) end
  return args, why
end

function M.main(args)
  _G.print = redacting_print
  if args[1] == "serve" and args[2] == "--zygote" and #args == 2 then
    local why
    args, why = zygote()
    if why then err("%s", why) end
    if not args then return why and EXIT.usage or EXIT.ok end
  end
  local plain = plain_run(args)
  if plain then
    apply_globals(plain)
    return commands.run(plain)
  end
  -- `test` hands everything after it to busted, whose options are its own.
  local at, busted_args = command_index(args)
  if at and args[at] == "test" then
    busted_args = table.move(args, at + 1, #args, 1, {})
    args = table.move(args, 1, at, 1, {})
  end
  -- `--lock` alone takes the default key; a separate value only when it cannot be the runbook (k8s:...).
  for i, a in ipairs(args) do
    if a == "--lock" and not (args[i + 1] or ""):match("^k8s:") then args[i] = "--lock=" end
  end
  local parser = build(args[at or 0] == "run" and "run" or nil)
  local ok, o = parser:pparse(args)
  if not ok or o.help then
    parser = build()
    ok, o = parser:pparse(args)
  end
  if not ok then
    local word = o:match("^unknown command '(.*)'")
    if word and resolve_runbook(word) then
      local has_help = false
      for _, a in ipairs(args) do has_help = has_help or a == "--help" or a == "-h" end
      if has_help then return runbook_help(parsers.run, word) end
      return usage_error(nil, "unknown command '%s'; to run the runbook: runbook run %s", word, word)
    end
    return usage_error(not word and at and parsers[args[at]] and args[at] or nil, "%s", one_line(o))
  end
  if type(o["--lock"]) == "table" then o["--lock"] = o["--lock"][1] ~= "" and o["--lock"][1] or true end
  apply_globals(o)
  if o["--version"] then return commands.version() end
  if o.command == "help" or o.help or not o.command then return show_help(parser, o) end
  if o.command == "test" then return require("runbook.test").run(busted_args) end
  if o["--wait-lock"] then -- parsed here, once: the request (run.lua, resume.lua) reads its seconds
    local secs, why = require("duration").parse(o["--wait-lock"])
    if not secs then return usage_error(o.command, "%s: --wait-lock: %s", o.command, why) end
    o["--wait-lock"] = secs
  end
  return commands[o.command](o)
end

return M
