-- The command line as kubectl and ansible-playbook users expect it: --help on
-- every command, "did you mean", global options, verbosity and colour.
local cli = require("spec.support.cli")
local cjson = require("cjson")

local COMMANDS = { "run", "resume", "history", "report", "describe", "lint", "list", "version", "help" }

local LOGS = [[
name = "logs" description = "logs at every level"
param "who" { type = "string", default = "ops" }
step "Talk" { run = function(ctx)
  log.debug("a debug detail")
  log.info("hello %s", ctx.params.who)
  log.warn("a warning")
end }
]]

describe("cli flags", function()
  teardown(cli.cleanup)

  for _, cmd in ipairs(COMMANDS) do
    it(cmd .. " --help prints its usage and options, as runbook help " .. cmd .. " does", function()
      local r = cli.run { cmd, "--help" }
      assert.are.equal(0, r.code, r.stderr)
      assert.truthy(r.stdout:find("Usage: runbook " .. cmd, 1, true), r.stdout)
      assert.truthy(r.stdout:find("-h, --help", 1, true), r.stdout)
      assert.are.equal(r.stdout, cli.run({ "help", cmd }).stdout)
    end)
  end

  it("runbook NAME --help and run NAME --help print the runbook's params", function()
    for _, args in ipairs { { "hello", "--help" }, { "run", "hello", "--help" }, { "run", "examples/hello.lua", "-h" } } do
      local r = cli.run(args, { RUNBOOK_PATH = "examples" })
      assert.are.equal(0, r.code, r.stderr)
      for _, want in ipairs { "Usage: runbook run", "--dry-run", "Params:", "name", "who to greet", "Steps:" } do
        assert.truthy(r.stdout:find(want, 1, true), want .. " missing:\n" .. r.stdout)
      end
    end
  end)

  -- mistyped -> exit status, what the message names
  local typos = {
    { { "rnu" }, 2, "unknown command 'rnu'; did you mean 'run'?" },
    { { "help", "hisotry" }, 2, "did you mean 'history'?" },
    { { "run", "examples/hello.lua", "--dryrun" }, 2, "unknown option '--dryrun'; did you mean '--dry-run'?" },
    { { "run", "outage-recvery" }, 3, "no runbook named 'outage-recvery' on RUNBOOK_PATH (runbooks); did you mean 'outage-recovery'?" },
    { { "run", "examples/hello.lua", "-p", "nmae=x" }, 2, "unknown param 'nmae'; did you mean 'name'?" },
    { { "run", "examples/hello.lua", "-p", "name=x", "--from", "Gret" }, 2, "no step named 'Gret'; did you mean 'Greet'?" },
    { { "outage-recovery" }, 2, "to run the runbook: runbook run outage-recovery" },
  }
  for _, t in ipairs(typos) do
    it("suggests what was meant for: runbook " .. table.concat(t[1], " "), function()
      local r = cli.run(t[1])
      assert.are.equal(t[2], r.code, r.stderr)
      assert.truthy(r.stderr:find(t[3], 1, true), r.stderr)
    end)
  end

  it("raises, naming it, when a step reads a param the runbook does not declare", function()
    local rb = cli.runbook(LOGS:gsub("ctx.params.who", "ctx.params.woh"))
    local r = cli.run { "run", rb }
    assert.are.equal(1, r.code)
    assert.matches("ctx.params.woh: logs declares no param 'woh'; did you mean 'who'%?", r.stdout)
  end)

  it("-o json is --output json, before or after the command", function()
    for _, args in ipairs { { "-o", "json", "run", "examples/hello.lua", "-p", "name=x", "--dry-run" },
      { "run", "examples/hello.lua", "-p", "name=x", "--dry-run", "-o", "json" } } do
      local r = cli.run(args)
      assert.are.equal(0, r.code, r.stderr)
      local n = 0
      for line in r.stdout:gmatch("[^\n]+") do
        local e = cjson.decode(line)
        assert.is_string(e.event, line)
        n = n + 1
      end
      assert.is_true(n > 4)
    end
  end)

  it("hides log.debug unless -v, tags it, and -q keeps only warnings, errors and the summary", function()
    local rb = cli.runbook(LOGS)
    local plain, verbose, quiet = cli.run { "run", rb }, cli.run { "-v", "run", rb }, cli.run { "run", rb, "-q" }
    assert.is_nil(plain.stdout:find("debug detail", 1, true), plain.stdout)
    assert.truthy(plain.stdout:find("| hello ops", 1, true), plain.stdout)
    assert.truthy(verbose.stdout:find("| DEBUG a debug detail", 1, true), verbose.stdout)
    assert.is_nil(quiet.stdout:find("hello ops", 1, true), quiet.stdout)
    assert.truthy(quiet.stdout:find("| WARN a warning", 1, true), quiet.stdout)
    assert.truthy(quiet.stdout:find("ok: 1 ok, 0 failed", 1, true), quiet.stdout)
  end)

  it("colours WARN on a terminal, and NO_COLOR, TERM=dumb and --no-color turn colour and the spinner off", function()
    local rb = cli.runbook(LOGS)
    local code, out = cli.pty("", { "run", rb }, { TERM = "xterm" })
    assert.are.equal(0, code, out)
    assert.truthy(out:find("\27[33mWARN\27[0m a warning", 1, true), out)
    for _, c in ipairs { { {}, { NO_COLOR = "1", TERM = "xterm" } }, { {}, { TERM = "dumb" } },
      { { "--no-color" }, { TERM = "xterm" } } } do
      local args = { "run", rb }
      for _, a in ipairs(c[1]) do args[#args + 1] = a end
      code, out = cli.pty("", args, c[2])
      assert.are.equal(0, code, out)
      assert.is_nil(out:find("\27[", 1, true), out)
      assert.truthy(out:find("WARN a warning", 1, true), out)
    end
  end)

  it("lists each runbook once", function()
    local r = cli.run { "list" }
    assert.are.equal(0, r.code, r.stderr)
    local seen = {}
    for name in r.stdout:gmatch("([%w%-]+)[^\n]*\n") do
      assert.is_nil(seen[name], name .. " listed twice")
      seen[name] = true
    end
    assert.is_true(seen["outage-recovery"])
  end)

  -- global option -> what the run of a runbook reading deploy/todo-chatbot-backend without a namespace says
  local K8S = [[
name = "where" description = "reads a deployment in the default namespace"
step "Read" { run = function() log.info("found in %s", k8s.get("deploy/todo-chatbot-backend").metadata.namespace) end }
]]
  local k8s_cases = {
    { { "-n", "todo-chatbot" }, 0, "found in todo%-chatbot" },
    { { "--namespace", "todo-chatbot", "--context", "sandbox-anonymous" }, 1, "401" },
    { { "--kubeconfig", "/nonexistent/kubeconfig" }, 1, "/nonexistent/kubeconfig" },
    { {}, 1, "404" },
  }
  for _, c in ipairs(k8s_cases) do
    it("makes the k8s library's defaults from: " .. (#c[1] > 0 and table.concat(c[1], " ") or "nothing"), function()
      local args = { "run", cli.runbook(K8S) }
      for _, a in ipairs(c[1]) do args[#args + 1] = a end
      local r = cli.run(args)
      assert.are.equal(c[2], r.code, r.stdout .. r.stderr)
      assert.matches(c[3], r.stdout)
    end)
  end
end)
