--- The command line's grammar (lua-argparse): every command, its options and
-- help. Only cli.lua uses it, and only when a command line is not a plain run
-- (loading the grammar is a large part of start-up).
local M = {}

local EXIT_TEXT = [[
Exit status: 0 success, 1 a step failed, 2 usage or parameter error,
3 runbook cannot be loaded, 4 aborted by the operator, 74 the journal
cannot be written (a full disk), 75 lock held by another run, 76 effects
of unknown outcome (resume --on-unknown), 77 apply: the runbook, params,
target or an effect differ from the plan, 78 apply: approvals missing,
124 ended by the watchdog, 130/143 interrupted by SIGINT/SIGTERM/SIGHUP.]]

local GLOBALS_TEXT = "Global options (before or after the command; see runbook --help): -v, -q, --no-color, "
  .. "-o FORMAT, --kubeconfig FILE, --context NAME, -n NAMESPACE."

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

--- The parser, and its commands' parsers by name: every command, or only
-- `only` (and the global options). A run builds only its own command, which
-- halves start-up; anything that did not parse is parsed again by the whole
-- grammar, so errors and hints are the same.
function M.build(only)
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
    option(run, "--push-metrics", "When the run ends, push its metrics to this Pushgateway "
      .. "(default: RUNBOOK_PUSHGATEWAY).", "URL")
    option(run, "--run-id", "The new run's id (runbook serve sets it, to answer with it).", "ID")
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
  option(plan, "--run-id", "The dry run's id, which is the plan's (runbook serve sets it).", "ID")
  option(plan, "--require-approval", "Approvals the plan needs besides the runbook's own approval policy.", "N")
  option(plan, "--alert", "The alert the plan answers (runbook serve sets it): when it resolves, apply refuses.",
    "KEY")
  option(plan, "--lock", "The run lock apply holds (default: the runbook's lock, else its name); "
    .. "k8s:NAMESPACE/NAME is a Kubernetes Lease, which the dry run checks.", "KEY"):args("?")

  local apply = command(p, "apply", "Run a plan for real, holding each effect to it.",
    "Run a plan made by `runbook plan`: refuses when the runbook, params or target changed (77) or approvals "
    .. "are missing (78); stops before any effect that is not the plan's next one (77).")
  apply:argument("plan", "The plan: a FILE, or a plan ID."):args("?")
  option(apply, "-p --param", "Give a secret param again (the plan does not hold it).", "KEY=VALUE")
    :count("*"):target("-p")
  flag(apply, "--step", "Ask before each step.")
  flag(apply, "-y --yes", "Do not ask, also for steps marked confirm.")
  option(apply, "--run-id", "The run's id (runbook serve's console sets it, to show the run).", "ID")

  local show = command(p, "show", "Show a plan as its dry run did, or as Markdown for a ticket.")
  show:argument("plan", "The plan: a FILE, or a plan ID."):args("?")
  option(show, "--format", "text (default) or markdown.", "FORMAT"):choices { "text", "markdown" }

  local approve = command(p, "approve", "Approve a plan as a second person.",
    "Record your approval of a plan's digest (you: RUNBOOK_USER, else the login name; never the requester).")
  approve:argument("plan", "The plan: a FILE, or a plan ID."):args("?")
  option(approve, "--comment", "Why, for the journal and the report.", "TEXT")
  option(approve, "--expires", "How long the approval holds (default 1h).", "DURATION")

  local serve = command(p, "serve", "Receive Alertmanager's webhook and plan or run runbooks by rules.",
    "An HTTP server (libmicrohttpd): POST /v1/alertmanager, POST and GET /v1/runs, GET /v1/runs/ID[/events], "
    .. "POST /v1/plans/ID/approve|deny (bearer token), GET /healthz, GET /metrics, and a web console for people "
    .. "(/, /runs/ID, /plans/ID; a login with a token). "
    .. "Each alert matching a rule makes a plan, a run or a dry run, in a child process.")
  option(serve, "--rules", "The rules file (YAML): which alerts start which runbook, how.", "FILE")
  option(serve, "--listen", "Address to listen on (default 127.0.0.1:9095; port 0 picks one).", "IPV4:PORT")
  option(serve, "--token-file", "File holding the bearer token (else RUNBOOK_SERVE_TOKEN).", "FILE")
  option(serve, "--users", "The console's people: NAME ROLE TOKEN a line, ROLE viewer or approver.", "FILE")
  option(serve, "--max-body", "Largest request body, in bytes (default 1048576).", "BYTES")
  option(serve, "--max-runs", "Plans and runs at once (default 4); alerts over it are refused and counted.", "N")
  option(serve, "--request-timeout", "Close a connection idle this many seconds, as a request sent too slowly "
    .. "(default 10).", "SECONDS")
  option(serve, "--tls-cert", "Serve HTTPS with this certificate (PEM; with --tls-key).", "FILE")
  option(serve, "--tls-key", "The certificate's private key (PEM, unencrypted).", "FILE")

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
  return p, parsers
end

return M

