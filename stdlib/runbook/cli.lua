--- The command line: `runbook [GLOBAL OPTIONS] COMMAND ...`, parsed by
-- lua-argparse. Returns the exit status (runbook.exit). `run` and `resume`
-- hand a request to runbook.run; each option's target is its own flag
-- (o["--dry-run"]), as runbook.run and runbook.resume read it.
-- Modules that a plain run does not need are required where they are used:
-- loading them is most of start-up.
local host = require "runbook.host"

local M = {}

M.VERSION = "0.1.0"

local EXIT = require "runbook.exit"

local EXIT_TEXT = [[
Exit status: 0 success, 1 a step failed, 2 usage or parameter error,
3 runbook cannot be loaded, 4 aborted by the operator, 74 the journal
cannot be written (a full disk), 75 lock held by another run, 76 effects
of unknown outcome (resume --on-unknown), 77 apply: the runbook, params,
target or an effect differ from the plan, 78 apply: approvals missing,
124 ended by the watchdog, 130/143 interrupted by SIGINT/SIGTERM/SIGHUP.]]

local GLOBALS_TEXT = "Global options (before or after the command; see runbook --help): -v, -q, --no-color, "
  .. "-o FORMAT, --kubeconfig FILE, --context NAME, -n NAMESPACE."

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
  local lfs = require "lfs"
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
  local lfs = require "lfs"
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

-- ---- the grammar --------------------------------------------------------------

local function flag(p, names, help) return p:flag(names, help):target(names:match("%-%-[%w%-]+")) end
local function option(p, names, help, argname)
  return p:option(names, help):argname(argname):target(names:match("%-%-[%w%-]+") or names)
end

-- Each command's parser by name, for `runbook help COMMAND`.
local parsers

local function command(p, name, summary, description)
  local c = p:command(name, description or summary):summary(summary):add_help(false)
    :help_description_margin(30):epilog(GLOBALS_TEXT)
  c:flag("-h --help", "Show this help and exit."):target("help")
  parsers[name] = c
  return c
end

--- The parser: every command, or only `only` (and the global options). A run
-- builds only its own command, which halves start-up; anything that did not
-- parse is parsed again by the whole grammar, so errors and hints are the same.
local function build(only)
  parsers = {}
  local function want(name) return only == nil or only == name end
  local p = require("argparse")("runbook", "Run operational procedures written in Lua, step by step, with a dry run.")
    :add_help(false):require_command(false):command_target("command"):epilog(EXIT_TEXT)
    :help_max_width(100):help_description_margin(30)
  p:flag("-h --help", "Show this help and exit."):target("help")
  flag(p, "--version", "Print the version and exit.")
  flag(p, "-v --verbose", "Show log.debug messages (tagged DEBUG).")
  flag(p, "-q --quiet", "Show only warnings, errors, failures and the summary.")
  flag(p, "--no-color", "No colour and no spinner (also: NO_COLOR set, TERM=dumb).")
  option(p, "-o --output", "Output format of run, resume and history: text or json (JSON lines).", "FORMAT")
    :choices { "text", "json" }
  option(p, "--kubeconfig", "Kubernetes configuration file(s), instead of $KUBECONFIG.", "FILE")
  option(p, "--context", "Kubernetes context, instead of the kubeconfig's current-context.", "NAME")
  option(p, "-n --namespace", "Default Kubernetes namespace of the k8s library.", "NAMESPACE")

  if want("run") then
    local run = command(p, "run", "Run a runbook.",
      "Run a runbook, named by FILE or by NAME on RUNBOOK_PATH. `runbook run NAME --help` also lists its params.")
    run:argument("runbook", "The runbook: a FILE, or a NAME on RUNBOOK_PATH."):args("?")
    option(run, "-p --param", "Set a param (repeatable); -p wins over --params-file.", "KEY=VALUE"):count("*"):target("-p")
    option(run, "--params-file", "Read params from a YAML or JSON file.", "FILE")
    flag(run, "--dry-run", "Change nothing: show each write instead of performing it.")
    flag(run, "--step", "Ask before each step (yes, no, preview, all, quit).")
    flag(run, "-y --yes", "Do not ask, also for steps marked confirm (needed without a terminal).")
    option(run, "--from", "Start at this step.", "STEP")
    option(run, "--outputs-from", "With --from: the earlier steps' outputs from this run.", "RUN_ID")
    flag(run, "--undo-on-failure", "When a step fails, undo the completed steps in reverse.")
    option(run, "--lock", "Hold a run lock (default key: the runbook's lock, else its name); "
      .. "k8s:NAMESPACE/NAME is a Kubernetes Lease.", "KEY"):args("?")
    option(run, "--wait-lock", "Wait this long for a held lock instead of ending with 75.", "DURATION")
  end
  if only then return p end

  local resume = command(p, "resume", "Continue a failed, aborted, interrupted or killed run.")
  resume:argument("run_id", "The run (see runbook history)."):args("?")
  option(resume, "-p --param", "Give a secret param again (the journal does not hold it).", "KEY=VALUE")
    :count("*"):target("-p")
  flag(resume, "--force", "Resume although the runbook changed since the run.")
  flag(resume, "--rerun-interrupted", "Run the interrupted step again instead of asking.")
  option(resume, "--on-unknown", "Effects of unknown outcome no check answers, without a terminal to ask: fail "
    .. "(exit 76), redo the step, or skip them as done.", "fail|redo|skip"):choices { "fail", "redo", "skip" }
  flag(resume, "-y --yes", "Do not ask.")
  flag(resume, "--step", "Ask before each step.")
  option(resume, "--wait-lock", "Wait this long for a held lock.", "DURATION")
  flag(resume, "--undo-on-failure", "When a step fails, undo the completed steps in reverse.")

  local plan = command(p, "plan", "Dry-run a runbook and write the plan that apply runs.",
    "Run the dry run of a runbook and write it as a plan: the runbook's hash, the params (secrets redacted, "
    .. "bound by hash), the Kubernetes target, who asked, the ordered effects and a digest.")
  plan:argument("runbook", "The runbook: a FILE, or a NAME on RUNBOOK_PATH."):args("?")
  option(plan, "-p --param", "Set a param (repeatable); -p wins over --params-file.", "KEY=VALUE"):count("*"):target("-p")
  option(plan, "--params-file", "Read params from a YAML or JSON file.", "FILE")
  option(plan, "--out", "Also write the plan to FILE (it is always kept in the state directory).", "FILE")
  option(plan, "--require-approval", "Approvals the plan needs besides the runbook's own approval policy.", "N")
  option(plan, "--alert", "The alert the plan answers (runbook serve sets it): when it resolves, apply refuses.",
    "KEY")

  local apply = command(p, "apply", "Run a plan for real, holding each effect to it.",
    "Run a plan made by `runbook plan`: refuses when the runbook, params or target changed (77) or approvals "
    .. "are missing (78); stops before any effect that is not the plan's next one (77).")
  apply:argument("plan", "The plan: a FILE, or a plan ID."):args("?")
  option(apply, "-p --param", "Give a secret param again (the plan does not hold it).", "KEY=VALUE")
    :count("*"):target("-p")
  flag(apply, "--step", "Ask before each step.")
  flag(apply, "-y --yes", "Do not ask, also for steps marked confirm.")

  local show = command(p, "show", "Show a plan as its dry run did, or as Markdown for a ticket.")
  show:argument("plan", "The plan: a FILE, or a plan ID."):args("?")
  option(show, "--format", "text (default) or markdown.", "FORMAT"):choices { "text", "markdown" }

  local approve = command(p, "approve", "Approve a plan as a second person.",
    "Record your approval of a plan's digest (you: RUNBOOK_USER, else the login name; never the requester).")
  approve:argument("plan", "The plan: a FILE, or a plan ID."):args("?")
  option(approve, "--comment", "Why, for the journal and the report.", "TEXT")
  option(approve, "--expires", "How long the approval holds (default 1h).", "DURATION")

  local serve = command(p, "serve", "Receive Alertmanager's webhook and plan or run runbooks by rules.",
    "An HTTP server (libmicrohttpd): POST /v1/alertmanager (bearer token), GET /healthz, GET /metrics. "
    .. "Each alert matching a rule makes a plan, a run or a dry run, in a child process.")
  option(serve, "--rules", "The rules file (YAML): which alerts start which runbook, how.", "FILE")
  option(serve, "--listen", "Address to listen on (default 127.0.0.1:9095; port 0 picks one).", "IPV4:PORT")
  option(serve, "--token-file", "File holding the bearer token (else RUNBOOK_SERVE_TOKEN).", "FILE")
  option(serve, "--max-body", "Largest request body, in bytes (default 1048576).", "BYTES")
  option(serve, "--max-runs", "Plans and runs at once (default 4); alerts over it are refused and counted.", "N")

  local history = command(p, "history", "Past runs, newest first.")
  option(history, "--runbook", "Only the runs of this runbook.", "NAME")
  option(history, "--limit", "How many runs (default 20).", "N")

  local report = command(p, "report", "A run's timeline for a postmortem.")
  report:argument("run_id", "The run (see runbook history)."):args("?")
  option(report, "--format", "markdown (default), json or html.", "FORMAT"):choices { "markdown", "json", "html" }
  flag(report, "--html", "A self-contained HTML page with an SVG timeline (--format html).")

  command(p, "describe", "Show a runbook's params and steps (nothing runs).")
    :argument("runbook", "A FILE, or a NAME on RUNBOOK_PATH."):args("?")
  command(p, "lint", "Check runbooks for typos: unknown functions, params and steps (nothing runs).")
    :argument("runbooks", "FILEs or NAMEs."):args("*")
  command(p, "list", "The runbooks on RUNBOOK_PATH with their descriptions.")
  command(p, "test", "Run busted specs inside the host (default: spec/); busted's options follow.")
    :argument("args", "busted options and PATHs."):args("*")
  command(p, "version", "Print the version.")
  command(p, "help", "Show the help of runbook or of a command.")
    :argument("topic", "A command."):args("?")
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

--- --wait-lock is parsed here, once: the request (run.lua, resume.lua) reads its seconds.
local function duration_ok(cmd, o)
  if not o["--wait-lock"] then return true end
  local secs, why = require("duration").parse(o["--wait-lock"])
  if not secs then return nil, usage_error(cmd, "%s: --wait-lock: %s", cmd, why) end
  o["--wait-lock"] = secs
  return true
end

function commands.run(o)
  if not o.runbook then return usage_error("run", "run: expected one runbook FILE or NAME") end
  local ok, code = duration_ok("run", o)
  if not ok then return code end
  local rb
  rb, code = load_runbook(o.runbook)
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
  local ok, code = duration_ok("resume", o)
  if not ok then return code end
  local plan
  plan, code = require("runbook.resume").plan(o.run_id, o, load_runbook)
  if not plan then return code end
  return require("runbook.run").start(plan.rb, plan.request, plan.resumed)
end

function commands.plan(o)
  if not o.runbook then return usage_error("plan", "plan: expected one runbook FILE or NAME") end
  local n = o["--require-approval"] and math.tointeger(tonumber(o["--require-approval"]))
  if o["--require-approval"] and not (n and n >= 0) then
    return usage_error("plan", "plan: --require-approval must be a whole number")
  end
  local rb, code = load_runbook(o.runbook)
  if not rb then return code end
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
  for _, name in ipairs { "--max-body", "--max-runs" } do
    nums[name] = o[name] and math.tointeger(tonumber(o[name]))
    if o[name] and not (nums[name] and nums[name] > 0) then
      return usage_error("serve", "serve: %s must be a positive whole number", name)
    end
  end
  return require("runbook.serve").serve({ rules = o["--rules"], listen = o["--listen"], token_file = o["--token-file"],
    max_body = nums["--max-body"], max_runs = nums["--max-runs"] }, resolve_runbook)
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
  if not o.runbook then return usage_error("describe", "describe: expected one runbook FILE or NAME") end
  local rb, code = load_runbook(o.runbook)
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
  local loader = require "runbook.loader"
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
  local output = require "runbook.output"
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
local PLAIN_VALUES = { ["-p"] = "-p", ["--param"] = "-p", ["-o"] = "--output", ["--output"] = "--output" }
local OUTPUTS = { text = true, json = true }

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
    elseif target == "-p" and value and value:sub(1, 1) ~= "-" then
      table.insert(o["-p"], value)
      i = i + 1
    elseif target == "--output" and OUTPUTS[value] and not o[target] then
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

function M.main(args)
  _G.print = redacting_print
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
  return commands[o.command](o)
end

return M
