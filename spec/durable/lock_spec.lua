-- A lock that follows the run: a Lease is handed back after SIGTERM, SIGINT
-- and SIGHUP; a resume takes exactly the lock its run recorded (file key or
-- Lease) and never runs while another process holds it; two processes never
-- act for one run id; a loser always names the holder. Checked with kubectl
-- and with the runs' own journals.
local cli = require("spec.support.cli")
local cjson = require("cjson")

local HOLD = [[
name = "lock-follows"
description = "holds its lock while a step waits"
param "hold" { type = "duration", default = "30s" }
step "work" { run = function(ctx) log.info("holding"); time.sleep(ctx.params.hold) end }
step "after" { run = function() end }
]]

local function sh(cmd)
  local p = io.popen(cmd .. " 2>&1")
  local out = p:read("a")
  p:close()
  return out
end

local function holding(state)
  return function()
    for l in sh("cat " .. cli.quote(state) .. "/runs/*.jsonl"):gmatch("[^\n]+") do
      local ok, e = pcall(cjson.decode, l)
      if ok and type(e) == "table" and e.event == "log" and e.message == "holding" then return true end
    end
    return false
  end
end

local function run_id(state) return (sh("ls " .. cli.quote(state) .. "/runs"):match("([^\n]+)%.jsonl")) end

describe("the lock follows the run", function()
  after_each(cli.cleanup)

  local K8S = os.getenv("KUBECONFIG")
  local NS = "todo-chatbot"
  local function holder(name)
    return sh(("kubectl get lease %s -n %s -o jsonpath='{.spec.holderIdentity}'"):format(name, NS))
  end

  for _, sig in ipairs { "TERM", "INT", "HUP" } do
    it(("hands its Lease back after SIG%s, within the release's own deadline"):format(sig), function()
      if not K8S then return pending("needs the sandbox (KUBECONFIG)") end
      local state, name = cli.tmpdir(), "durable-lease-" .. sig:lower()
      local rb = cli.runbook(HOLD)
      local p = cli.spawn({ "run", rb, "--yes", "--lock=k8s:" .. NS .. "/" .. name }, { RUNBOOK_STATE_DIR = state })
      cli.eventually(holding(state), "the run to hold its lease")
      assert.truthy(holder(name):find("pid " .. p.pid, 1, true))
      os.execute("kill -" .. sig .. " " .. p.pid)
      local code, out = p.wait()
      assert.are.equal(sig == "INT" and 130 or 143, code, out)
      assert.truthy(out:find("release lease " .. NS .. "/" .. name, 1, true), out)
      assert.are.equal("", holder(name), "the lease is still held")
    end)
  end

  it("a resume of a Lease run takes that Lease: refused while it is held, runs once it is free", function()
    if not K8S then return pending("needs the sandbox (KUBECONFIG)") end
    local state, name = cli.tmpdir(), "durable-lease-resume"
    local rb = cli.runbook(HOLD)
    local env = { RUNBOOK_STATE_DIR = state }
    local p = cli.spawn({ "run", rb, "--yes", "-p", "hold=1s", "--lock=k8s:" .. NS .. "/" .. name }, env)
    cli.eventually(holding(state), "the run to hold its lease")
    os.execute("kill -KILL " .. p.pid)
    p.wait()
    local id = run_id(state)
    -- the killed run's Lease is still held: the resume must not run under it
    local r = cli.run({ "resume", id, "--yes" }, env)
    assert.are.equal(75, r.code, r.stderr .. r.stdout)
    assert.matches("held by", r.stdout .. r.stderr)
    -- once it is free (expired, or handed back: here cleared as an operator would), the resume takes it
    sh(("kubectl patch lease %s -n %s --type=merge -p '{\"spec\":{\"holderIdentity\":null}}'"):format(name, NS))
    r = cli.run({ "resume", id, "--yes" }, env)
    assert.are.equal(0, r.code, r.stderr .. r.stdout)
    assert.truthy(r.stdout:find("take lease " .. NS .. "/" .. name, 1, true), r.stdout)
    assert.are.equal("", holder(name))
  end)

  it("a resume takes the run's file lock key, not the runbook's name, and waits for no other holder", function()
    local state = cli.tmpdir()
    local env = { RUNBOOK_STATE_DIR = state }
    local rb = cli.runbook(HOLD)
    local p = cli.spawn({ "run", rb, "--yes", "-p", "hold=1s", "--lock=team-key" }, env)
    cli.eventually(holding(state), "the first run")
    os.execute("kill -KILL " .. p.pid)
    p.wait()
    local id = run_id(state)
    -- another runbook now holds team-key
    local other = cli.runbook(HOLD:gsub('name = "lock%-follows"', 'name = "other"'))
    local q = cli.spawn({ "run", other, "--yes", "--lock=team-key" }, env)
    cli.eventually(function()
      return sh("grep -l '\"runbook\":\"other\"' " .. state .. "/runs/*.jsonl") ~= "" and holding(state)()
    end, "the other run")
    local r = cli.run({ "resume", id, "--yes" }, env)
    assert.are.equal(75, r.code, r.stderr)
    assert.matches("team%-key is locked by run %S+ %(pid " .. q.pid, r.stderr)
    os.execute("kill -TERM " .. q.pid)
    q.wait()
    assert.are.equal(0, cli.run({ "resume", id, "--yes" }, env).code)
  end)

  it("two processes never act for one run id: a second resume while the first runs is refused", function()
    local state = cli.tmpdir()
    local env = { RUNBOOK_STATE_DIR = state }
    local rb = cli.runbook(HOLD)
    local p = cli.spawn({ "run", rb, "--yes", "-p", "hold=1s" }, env)
    cli.eventually(holding(state), "the run")
    os.execute("kill -KILL " .. p.pid)
    p.wait()
    local id = run_id(state)
    local a = cli.spawn({ "resume", id, "--yes" }, env)   -- "work" runs again, holding 1s
    cli.eventually(function() return select(2, sh("cat " .. state .. "/runs/*.jsonl"):gsub('"message":"holding"', "")) >= 2 end,
      "the resume to run")
    local b = cli.run({ "resume", id, "--yes" }, env)
    assert.are.equal(75, b.code, b.stderr)
    assert.matches("still running", b.stderr)
    assert.are.equal(0, (a.wait()))
  end)

  it("a loser always names the holder: 10 rounds of 6 runs started at once", function()
    local state, out = cli.tmpdir(), cli.tmpdir()
    local rb = cli.runbook(HOLD)
    local unnamed, losers = 0, 0
    for round = 1, 10 do
      os.execute(("for i in 1 2 3 4 5 6; do RUNBOOK_STATE_DIR=%s %s run %s --yes -p hold=0.5s </dev/null >/dev/null "
        .. "2>%s/%d-$i.err & done; wait"):format(cli.quote(state), cli.BIN, cli.quote(rb), out, round))
      for i = 1, 6 do
        local err = cli.slurp(("%s/%d-%d.err"):format(out, round, i))
        if err:find("is locked by", 1, true) then
          losers = losers + 1
          if not err:match("locked by run %S+ %(pid %d+") then unnamed = unnamed + 1 end
        end
      end
    end
    print(("\n  lock losers: %d, of whom %d could not name the holder"):format(losers, unnamed))
    assert.is_true(losers > 0)
    assert.are.equal(0, unnamed)
  end)
end)
