-- runbook plan, approve and apply against the sandbox (issue 25). The
-- runbook (spec/fixtures/plan/add_capacity.lua) scales a deployment to one
-- more replica than it has, sets a Redis key and inserts a PostgreSQL row;
-- kubectl, redis-cli and psql say what happened. Each refusal is a row:
-- what changes between the plan and the apply, the exit status, the words
-- that say why, and, checked by the clients, that the apply changed nothing.
package.path = "spec/sandbox/?.lua;" .. package.path
local sb = require("sandbox_helper")
local cli = require("spec.support.cli")
local cjson = require("cjson")

local NS, DEPLOY = "plan-spec", "web"
local FIXTURE = "spec/fixtures/plan/add_capacity.lua"
local SECRET = "api-key-b7e41c"

local function ok_sh(out, ok) assert(ok, out); return (out:gsub("%s+$", "")) end
local PATH = "/apis/apps/v1/namespaces/" .. NS .. "/deployments/" .. DEPLOY
local function kubectl(args) return ok_sh(sb.kubectl("-n " .. NS .. " " .. args)) end
-- Reads and resets with curl against the API server (kubectl takes a second to start).
local function replicas()
  local status, d = sb.k8s("GET", PATH)
  return status == 200 and d.spec.replicas or nil
end
local function reset(n) assert.are.equal(200, (sb.k8s("PATCH", PATH, { spec = { replicas = n } }))) end

--- What the runbook changes, as the independent clients see it.
local function world()
  return { replicas = replicas(), note = ok_sh(sb.redis("GET plan_spec:reason")),
    rows = ok_sh(sb.psql("SELECT count(*) FROM plan_spec")) }
end

local function runbook(args, who)
  return cli.run(args, { RUNBOOK_USER = who or "alice" })
end

--- A copy of the fixture (a row may change it), planned with `params`. Returns the plan's path and runbook.
local function make_plan(params, extra)
  local dir = cli.tmpdir()
  local rb, plan = dir .. "/add_capacity.lua", dir .. "/plan.json"
  assert(os.execute(("cp %s %s"):format(FIXTURE, cli.quote(rb))))
  local args = { "plan", rb, "-p", "deployment=" .. DEPLOY, "-p", "namespace=" .. NS, "-p", "reason=" .. params.reason,
    "-p", "api_key=" .. SECRET, "--out", plan }
  for _, a in ipairs(extra or {}) do args[#args + 1] = a end
  local r = runbook(args)
  assert.are.equal(0, r.code, r.stdout .. r.stderr)
  return plan, rb
end

local function apply(plan, args, who)
  local a = { "apply", plan, "-p", "api_key=" .. SECRET }
  for _, x in ipairs(args or {}) do a[#a + 1] = x end
  return runbook(a, who)
end

setup(function()
  sb.kubectl("create namespace " .. NS)
  sb.kubectl("-n " .. NS .. " create deployment " .. DEPLOY .. " --image=nginx --replicas=1")
  cli.eventually(function() return replicas() ~= nil end, "the deployment")
  ok_sh(sb.psql("CREATE TABLE IF NOT EXISTS plan_spec (reason text)"))
end)

before_each(function()
  reset(1)
  ok_sh(sb.redis("SET plan_spec:reason none"))
  ok_sh(sb.psql("DELETE FROM plan_spec"))
end)

teardown(function()
  sb.kubectl("-n " .. NS .. " delete deployment " .. DEPLOY)
  cli.cleanup()
end)

describe("runbook plan", function()
  it("writes the dry run's effects, the runbook's hash, the params without secrets, the target and a digest", function()
    local before = world()
    local path = make_plan { reason = "p1" }
    assert.are.same(before, world())
    local text = cli.slurp(path)
    assert.is_nil(text:find(SECRET, 1, true))
    local plan = cjson.decode(text)
    assert.are.equal("***", plan.params.api_key)
    assert.are.equal("p1", plan.params.reason)
    assert.are.equal("alice", plan.requested_by.user)
    assert.are.equal("sandbox", plan.target.context)
    assert.matches("^sha256:%x+$", plan.digest)
    local shown = {}
    for i, e in ipairs(plan.effects) do shown[i] = ("%s %s %s %s"):format(e.step, e.module, e.op, e.target) end
    assert.are.same({ "scale k8s scale plan-spec/deployment/web", "note redis SET plan_spec:reason",
      "note pg exec todo.plan_spec" }, shown)
    assert.are.equal("scale deployment web to 2", plan.effects[1].summary)
    local view = runbook { "show", path }
    assert.are.equal(0, view.code, view.stderr)
    local out = view.stdout
    assert.truthy(out:find("[scale]\n    would scale deployment web to 2 → replicas 1 -> 2", 1, true), out)
    assert.truthy(out:find("would insert 1 row into plan_spec → rolled back", 1, true), out)
    local md = runbook { "show", path, "--format", "markdown" }
    assert.truthy(md.stdout:find("| 1 | scale | k8s | scale | plan-spec/deployment/web | scale deployment web to 2 → "
      .. "replicas 1 -> 2 |", 1, true), md.stdout)
    assert.truthy(md.stdout:find("| approvals | 0 needed; 0 valid |", 1, true), md.stdout)
    assert.is_nil((out .. md.stdout):find(SECRET, 1, true))
  end)
end)

describe("runbook apply", function()
  it("performs the planned effects", function()
    local path = make_plan { reason = "applied" }
    local r = apply(path)
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.are.same({ replicas = 2, note = "applied", rows = "1" }, world())
  end)

  -- The run's Lease is taken, renewed and released around the steps: the run's lock, not a planned effect.
  it("holds the Lease the plan names (--lock=k8s:NS/NAME): a held one ends it with 75, a free one is taken", function()
    local LEASES = "/apis/coordination.k8s.io/v1/namespaces/" .. NS .. "/leases"
    sb.k8s("DELETE", LEASES .. "/apply-lock")
    local path = make_plan({ reason = "leased" }, { "--lock=k8s:" .. NS .. "/apply-lock" })
    assert.are.equal("k8s:" .. NS .. "/apply-lock", cjson.decode(cli.slurp(path)).lock)
    local before = world()
    local now = os.date("!%Y-%m-%dT%H:%M:%S.000000Z")
    assert.are.equal(201, (sb.k8s("POST", LEASES, { apiVersion = "coordination.k8s.io/v1", kind = "Lease",
      metadata = { name = "apply-lock" }, spec = { holderIdentity = "cron-job-elsewhere", leaseDurationSeconds = 300,
        acquireTime = now, renewTime = now } })))
    local r = apply(path)
    assert.are.equal(75, r.code, r.stdout .. r.stderr)
    assert.truthy((r.stdout .. r.stderr):find("held by cron-job-elsewhere", 1, true), r.stdout .. r.stderr)
    assert.are.same(before, world())
    assert.are.equal(200, (sb.k8s("DELETE", LEASES .. "/apply-lock")))
    r = apply(path)
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.truthy(r.stdout:find("take lease " .. NS .. "/apply-lock", 1, true), r.stdout)
    assert.are.same({ replicas = 2, note = "leased", rows = "1" }, world())
    local status, lease = sb.k8s("GET", LEASES .. "/apply-lock")
    assert.are.equal(200, status)
    assert.is_nil(lease.spec.holderIdentity)   -- handed back
  end)

  -- Each row: what happens between plan and apply, then the apply's exit
  -- status and message; nothing the runbook writes may have changed.
  local REFUSALS = {
    { "the deployment was scaled by kubectl after the plan", code = 77, says = "effect 1 of step 'scale' differs",
      between = function() kubectl("scale deploy " .. DEPLOY .. " --replicas=3") end, replicas = 3 },
    { "the runbook file changed", code = 77, says = "changed since the plan was made",
      between = function(_, rb) assert(os.execute("echo '-- edited' >> " .. cli.quote(rb))) end },
    { "a param given again differs", code = 77, says = "params differ from the plan's: reason",
      args = { "-p", "reason=other" }, shared = true },
    { "the secret param differs", code = 77, says = "params differ from the plan's: api_key (secret)",
      args = { "-p", "api_key=wrong-key-0000" }, shared = true },
    { "the plan file was edited", code = 77, says = "its digest does not match",
      between = function(plan)
        local text = cli.slurp(plan):gsub('"reason":"r"', '"reason":"edited"')
        local f = assert(io.open(plan, "wb")); f:write(text); f:close()
      end },
    { "the secret param is not given again", code = 2, says = "give it again with -p api_key=",
      apply = function(plan) return runbook { "apply", plan } end, shared = true },
    { "approvals are missing", code = 78, says = "needs 1 approval by someone other than alice, and has 0",
      plan_args = { "--require-approval", "1" } },
  }
  local shared   -- one plan for the rows that change neither it nor its runbook
  for _, row in ipairs(REFUSALS) do
    it("refuses when " .. row[1] .. ", and changes nothing", function()
      local plan, rb
      if row.shared then
        shared = shared or make_plan { reason = "r" }
        plan = shared
      else
        plan, rb = make_plan({ reason = "r" }, row.plan_args)
      end
      if row.between then row.between(plan, rb) end
      local before = world()
      local r = row.apply and row.apply(plan) or apply(plan, row.args)
      assert.are.equal(row.code, r.code, r.stdout .. r.stderr)
      assert.truthy((r.stdout .. r.stderr):find(row.says, 1, true), r.stdout .. r.stderr)
      assert.are.same(before, world())
      assert.are.same({ replicas = row.replicas or 1, note = "none", rows = "0" }, world())
    end)
  end
end)

describe("runbook apply of a library's effect", function()
  it("holds pg.dump (its BEGIN and pg_dump inside) to the plan as the one effect the dry run showed", function()
    local dir = cli.tmpdir()
    local rb = cli.runbook("name = \"dump\"\ndescription = \"one dump\"\nparam \"dir\" {}\n"
      .. "step \"dump\" { run = function(ctx) pg.dump { file = ctx.params.dir .. \"/todo.dump\" } end }\n")
    local r = runbook { "plan", rb, "-p", "dir=" .. dir }
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    r = runbook { "apply", r.stdout:match("apply: runbook apply (%S+)") }
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.truthy(io.open(dir .. "/todo.dump"), "no dump written")
  end)
end)

describe("runbook approve", function()
  it("lets a second person approve the plan's digest, and then apply runs it", function()
    local plan = make_plan({ reason = "approved" }, { "--require-approval", "1" })
    local self = runbook({ "approve", plan }, "alice")
    assert.are.equal(2, self.code)
    assert.matches("alice requested plan", self.stderr)
    assert.are.equal(78, apply(plan).code)
    local ok = runbook({ "approve", plan, "--comment", "looks right" }, "bob")
    assert.are.equal(0, ok.code, ok.stderr)
    local r = apply(plan)
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.are.same({ replicas = 2, note = "approved", rows = "1" }, world())
    -- The journal records the plan and who approved it.
    local id = r.stdout:match("run (%d+T%d+Z%-%x+)")
    local journal = cli.slurp(os.getenv("RUNBOOK_STATE_DIR") .. "/runs/" .. id .. ".jsonl")
    local start = cjson.decode(journal:match("^[^\n]+"))
    assert.are.equal("bob", start.request.plan.approvals[1].by)
    assert.are.equal("looks right", start.request.plan.approvals[1].comment)
    assert.are.equal("alice", start.request.plan.requested_by)
  end)

  it("does not count an expired approval", function()
    local plan = make_plan({ reason = "late" }, { "--require-approval", "1" })
    local t0 = os.time()
    assert.are.equal(0, runbook({ "approve", plan, "--expires", "1s" }, "bob").code)
    sb.wait_until(10, function() return os.time() >= t0 + 2 end)
    assert.are.equal(78, apply(plan).code)
    assert.are.same({ replicas = 1, note = "none", rows = "0" }, world())
  end)

  it("holds the runbook's own policy: only the approvers it names count", function()
    local dir = cli.tmpdir()
    local rb = dir .. "/add_capacity.lua"
    local text = cli.slurp(FIXTURE) .. '\napproval = { required = 1, by = { "carol" } }\n'
    local f = assert(io.open(rb, "wb")); f:write(text); f:close()
    local r = runbook { "plan", rb, "-p", "deployment=" .. DEPLOY, "-p", "namespace=" .. NS, "-p", "reason=policy",
      "-p", "api_key=" .. SECRET, "--out", dir .. "/plan.json" }
    assert.are.equal(0, r.code, r.stderr)
    local bob = runbook({ "approve", dir .. "/plan.json" }, "bob")
    assert.are.equal(2, bob.code)
    assert.matches("bob may not approve", bob.stderr)
    assert.are.equal(78, apply(dir .. "/plan.json").code)
    assert.are.equal(0, runbook({ "approve", dir .. "/plan.json" }, "carol").code)
    assert.are.equal(0, apply(dir .. "/plan.json").code)
    assert.are.same({ replicas = 2, note = "policy", rows = "1" }, world())
  end)
end)

-- A hostile runbook under apply: each row is a step body that behaves in the
-- dry run and does more when it runs for real. DIR is a fresh directory; the
-- plan holds what the dry run showed, and `ls` says what the apply wrote.
describe("runbook apply holds a hostile runbook to its plan", function()
  local HOSTILE = {
    { "a write only when not a dry run", [[
        fs.write(DIR .. "/planned", "x")
        if not ctx.dry_run then fs.write(DIR .. "/hidden", "x") end ]], left = { "planned" } },
    { "a write in a step that planned none", [[
        if not ctx.dry_run then fs.write(DIR .. "/hidden", "x") end ]],
      says = "effect 1 of step 's' is not in the plan" },
    { "a pcall around the refused write, then a planned one", [[
        if not ctx.dry_run then pcall(fs.write, DIR .. "/hidden", "x") end
        fs.write(DIR .. "/planned", "x") ]] },
    { "a step that swallows the refusal and returns", [[
        if not ctx.dry_run then pcall(fs.write, DIR .. "/hidden", "x") end
        return { fine = true } ]] },
    { "an unplanned write inside a planned gate.effect", [[
        gate.effect { module = "fs", op = "write", target = DIR .. "/planned", summary = "write 1 bytes",
          perform = function() fs.write(DIR .. "/hidden", "x") end } ]] },
    { "a command run inside a planned gate.effect of its own module", [[
        gate.effect { module = "exec", op = "run", target = "true", summary = "run true",
          perform = function() exec.run({ "touch", DIR .. "/hidden" }) end } ]] },
    { "a write in the step's when", nil, when = [[
        if not ctx.dry_run then fs.write(DIR .. "/hidden", "x") end
        return true ]] },
  }
  for _, row in ipairs(HOSTILE) do
    it("stops " .. row[1] .. " with 77", function()
      local dir = cli.tmpdir()
      local when = row.when and ("when = function(ctx) local DIR = ctx.params.dir\n%s\nend,"):format(row.when) or ""
      local rb = cli.runbook(("name = \"hostile\"\ndescription = \"does more for real\"\nparam \"dir\" {}\n"
        .. "step \"s\" { %s run = function(ctx) local DIR = ctx.params.dir\n%s\nend }\n"):format(when, row[2] or ""))
      local r = runbook { "plan", rb, "-p", "dir=" .. dir }   -- kept in the state directory, by id
      assert.are.equal(0, r.code, r.stdout .. r.stderr)
      r = runbook { "apply", r.stdout:match("apply: runbook apply (%S+)") }
      assert.are.equal(77, r.code, r.stdout .. r.stderr)
      assert.truthy(r.stdout:find(row.says or "the plan:\n", 1, true), r.stdout)
      local p = io.popen("ls " .. cli.quote(dir))
      local left = {}
      for name in p:lines() do left[#left + 1] = name end
      p:close()
      assert.are.same(row.left or {}, left)
    end)
  end
end)
