-- The console in a browser (issue 29's acceptance): headless Chromium
-- (Debian's) driven by playwright-core (npm, installed by `make deps` under
-- build/node) through spec/console/browser.cjs. serve is started here with
-- two plans waiting; the script is refused without a token, logs in, sees a
-- new run appear on the list and its steps appear live, approves a plan by
-- clicking and applies it, denies the other without JavaScript on a phone's
-- screen, and takes screenshots into build/console-screenshots/.
local cli = require("spec.support.cli")

local TOKEN = "browser-serve-token-2c8e51a0"
local ALICE = "alice-browser-token-6a1f03"   -- a viewer's refusal: console_spec.lua
local PLAYWRIGHT = os.getenv("PWD") .. "/build/node/node_modules/playwright-core"
local dir, serve, results, missing = nil, nil, {}, nil


-- A run whose steps wait for go files: the browser sees each appear.
local LIVE = [[
name = "live" description = "three steps, the first two waiting for a go file"
param "go" { default = "" }
param "out" { default = "" }
local function go(ctx, n)
  if ctx.params.go == "" then return end
  time.wait_until({ timeout = "90s", every = "20ms", what = "go file " .. n },
    function() return fs.exists(ctx.params.go .. n) end)
end
step "first" { run = function(ctx) log.info("first: waiting") go(ctx, 1) end }
step "second" { run = function(ctx) log.info("second: waiting") go(ctx, 2) end }
step "third" { run = function(ctx)
  log.info("third: done")
  if ctx.params.out ~= "" then fs.write(ctx.params.out, "applied") end
end }
]]

local function plan_by(who)
  local r = cli.run({ "plan", dir .. "/live.lua", "-p", "out=" .. dir .. "/out-" .. math.random(1e9),
    "--require-approval", "1" }, { RUNBOOK_USER = who })
  assert.are.equal(0, r.code, r.stderr)
  return r.stdout:match("plan (%d+T%d+Z%-%x+)")
end

setup(function()
  if not (os.execute("command -v node >/dev/null && command -v chromium >/dev/null")
      and cli.slurp(PLAYWRIGHT .. "/package.json") ~= "") then
    missing = "node, chromium or playwright-core (make deps) is not installed"
    return
  end
  dir = cli.tmpdir()
  local live = cli.write(dir .. "/live.lua", LIVE)
  local rules = cli.write(dir .. "/rules.yml", ("rules:\n  - name: none\n    match: {alertname: None}\n"
    .. "    runbook: %s\n    mode: plan\nruns: [%s]\n"):format(live, live))
  local users = cli.write(dir .. "/users", ("alice approver %s\n"):format(ALICE))
  local url
  serve, url = cli.serve({ "--rules", rules, "--token-file", cli.write(dir .. "/token", TOKEN .. "\n"), "--users", users },
    { RUNBOOK_USER = "runbook-serve" })
  local plans = { plan_by("carol"), plan_by("carol") }
  local env = { URL = url, ALICE = ALICE, SERVE_TOKEN = TOKEN, PLANS = table.concat(plans, " "),
    LIVE = live, DIR = dir, SHOTS = os.getenv("PWD") .. "/build/console-screenshots", PLAYWRIGHT_CORE = PLAYWRIGHT }
  local parts = {}
  for k, v in pairs(env) do parts[#parts + 1] = k .. "=" .. cli.quote(v) end
  local p = io.popen(("env %s timeout 150 node spec/console/browser.cjs 2>&1"):format(table.concat(parts, " ")))
  for line in p:lines() do
    local verdict, name, detail = line:match("^(%a+) (%a+) ?(.*)$")
    if verdict == "ok" or verdict == "fail" then results[name] = { ok = verdict == "ok", detail = detail } end
    io.stderr:write("  browser: ", line, "\n")
  end
  p:close()
end)

teardown(function()
  if serve and serve.pid then os.execute("kill " .. serve.pid) end
  cli.cleanup()
end)

describe("the console in headless Chromium", function()
  for _, case in ipairs {
    { "refused", "sends every page to the login without a token, and refuses a wrong one" },
    { "live", "shows a new run on the list and its steps as they start, through Server-Sent Events, without a reload" },
    { "approve", "approves a plan by clicking, with a comment, and applies it into a run" },
    { "deny", "denies another plan without JavaScript, on a phone's screen" },
  } do
    it(case[2], function()
      if missing then return pending(missing) end
      local r = results[case[1]] or results.launch
      assert.truthy(r, "the browser script said nothing of " .. case[1])
      assert.is_true(r.ok, r.detail)
    end)
  end
end)
