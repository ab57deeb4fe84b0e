-- The engine under an operator's hands, through a terminal: each case is one
-- observation of the issue "The engine under an operator's hands" (declining
-- a step, previews, resume after undo, locks, setup errors, --from, Ctrl-C).
-- The two that need the sandbox's runbooks are in spec/runbooks/decline_spec.lua.
local cli = require("spec.support.cli")

local function exists(path)
  local f = io.open(path, "rb")
  if f then f:close() end
  return f ~= nil
end

--- The run id of the only journal in `state`.
local function run_id(state)
  local p = io.popen("ls " .. cli.quote(state .. "/runs"))
  local id = p:read("a"):match("([^\n]+)%.jsonl")
  p:close()
  return id
end

describe("an operator at a terminal", function()
  after_each(cli.cleanup)

  it("previews a step in a dry run everywhere: ctx.dry_run is true in the preview", function()
    local dir = cli.tmpdir()
    local rb = cli.runbook([[
name = "preview" description = "d"
param "dir" { required = true }
step "Wait for it" { confirm = true, run = function(ctx)
  if ctx.dry_run then log.info("would wait") return end
  log.info("real branch")
  fs.write(ctx.params.dir .. "/real", "x")
end }
]])
    local code, out = cli.pty("p,n", { "run", rb, "-p", "dir=" .. dir }, { RUNBOOK_STATE_DIR = cli.tmpdir() })
    assert.are.equal(0, code, out)
    assert.truthy(out:find("would wait", 1, true), out)
    assert.falsy(out:find("real branch", 1, true), out)
    assert.is_false(exists(dir .. "/real"))
  end)

  it("resumes after an undo by running the undone steps again: never skipped, never undone twice", function()
    local state, dir = cli.tmpdir(), cli.tmpdir()
    local env = { RUNBOOK_STATE_DIR = state }
    local rb = cli.runbook([[
name = "undo-resume" description = "d"
on_failure = "undo"
param "dir" { required = true }
step "make file" {
  run = function(ctx)
    fs.write(ctx.params.dir .. "/file", "x")
    fs.write(ctx.params.dir .. "/log", "do\n", { append = true })
  end,
  undo = function(ctx)
    fs.remove(ctx.params.dir .. "/file")
    fs.write(ctx.params.dir .. "/log", "undo\n", { append = true })
  end,
}
step "check" { run = function(ctx) fs.read(ctx.params.dir .. "/go") end }
]])
    local r = cli.run({ "run", rb, "-p", "dir=" .. dir, "--yes" }, env)
    assert.are.equal(1, r.code, r.stdout)
    assert.is_false(exists(dir .. "/file"))
    local id = run_id(state)
    -- resumed while the cause remains: it fails again, and undoes only what it did again
    local code, out = cli.pty("", { "resume", id }, env)
    assert.are.equal(1, code, out)
    assert.truthy(out:find("'make file' was undone", 1, true), out)
    io.open(dir .. "/go", "w"):close()
    code, out = cli.pty("", { "resume", id }, env)
    assert.are.equal(0, code, out)
    assert.is_true(exists(dir .. "/file"))
    assert.are.equal("do\nundo\ndo\nundo\ndo\n", cli.slurp(dir .. "/log"))
  end)

  it("--from takes earlier outputs from --outputs-from RUN_ID, or refuses naming the missing ones", function()
    local state, dir = cli.tmpdir(), cli.tmpdir()
    local env = { RUNBOOK_STATE_DIR = state }
    local rb = cli.runbook([[
name = "from" description = "d"
param "dir" { required = true }
step "Verify service health" { run = function() return { failing = 2 } end }
step "Roll back" { needs = { "Verify service health" }, run = function(ctx)
  fs.write(ctx.params.dir .. "/rolled", tostring(ctx.outputs["Verify service health"].failing))
end }
]])
    local code, out = cli.pty("", { "run", rb, "-p", "dir=" .. dir, "--from", "Roll back" }, env)
    assert.are.equal(2, code, out)
    assert.truthy(out:find("--from 'Roll back': no outputs of 'Verify service health' (needed by 'Roll back')", 1, true), out)
    assert.falsy(out:find("ctx.outputs", 1, true), out)
    assert.is_false(exists(dir .. "/rolled"))
    assert.are.equal(0, cli.run({ "run", rb, "-p", "dir=" .. cli.tmpdir() }, env).code)
    local id = run_id(state)
    code, out = cli.pty("", { "run", rb, "-p", "dir=" .. dir, "--from", "Roll back", "--outputs-from", id }, env)
    assert.are.equal(0, code, out)
    assert.are.equal("2", cli.slurp(dir .. "/rolled"))
  end)

  it("resumes a run under the lock key it was started with", function()
    local state, dir = cli.tmpdir(), cli.tmpdir()
    local env = { RUNBOOK_STATE_DIR = state }
    local rb = cli.runbook([[
name = "locked-resume" description = "d"
param "dir" { required = true }
step "one" { run = function() end }
step "two" { run = function(ctx) fs.read(ctx.params.dir .. "/go") end }
]])
    local r = cli.run({ "run", rb, "-p", "dir=" .. dir, "--lock=team-key", "--yes" }, env)
    assert.are.equal(1, r.code, r.stderr)
    local id = run_id(state)
    local holder = cli.runbook([[
name = "holder" description = "d"
step "hold" { run = function() time.sleep("20s") end }
]], "holder.lua")
    local h = cli.spawn({ "run", holder, "--lock=team-key", "--yes" }, env)
    cli.eventually(function() return cli.slurp(state .. "/locks/team-key.lock"):find("holder", 1, true) end, "holder")
    local code, out = cli.pty("", { "resume", id }, env)
    os.execute("kill " .. h.pid)
    h.wait()
    assert.are.equal(75, code, out)
    assert.truthy(out:find("team-key is locked by", 1, true), out)
  end)

  it("refuses to start when the state directory cannot be written: exit 2, nothing runs", function()
    local dir = cli.tmpdir()
    local file = dir .. "/not-a-dir"
    io.open(file, "wb"):close()
    local rb = cli.runbook([[
name = "nostate" description = "d"
param "dir" { required = true }
step "write" { run = function(ctx) fs.write(ctx.params.dir .. "/ran", "x") end }
]])
    local code, out = cli.pty("", { "run", rb, "-p", "dir=" .. dir, "--yes" }, { RUNBOOK_STATE_DIR = file .. "/state" })
    assert.are.equal(2, code, out)
    assert.truthy(out:find("not-a-dir", 1, true), out)
    assert.falsy(out:find("interrupted", 1, true), out)
    assert.is_false(exists(dir .. "/ran"))
  end)

  it("refuses a bad lock key, and a Lease without a Kubernetes configuration: exit 2, nothing runs", function()
    local dir = cli.tmpdir()
    local rb = cli.runbook([[
name = "badlock" description = "d"
param "dir" { required = true }
step "write" { run = function(ctx) fs.write(ctx.params.dir .. "/ran", "x") end }
]])
    local env = { RUNBOOK_STATE_DIR = cli.tmpdir(), KUBECONFIG = dir .. "/no-such-kubeconfig" }
    local code, out = cli.pty("", { "run", rb, "-p", "dir=" .. dir, "--lock=k8s:Bad_Name" }, env)
    assert.are.equal(2, code, out)
    assert.truthy(out:find("lower-case DNS names", 1, true), out)
    code, out = cli.pty("", { "run", rb, "-p", "dir=" .. dir, "--lock=k8s:ops/nightly" }, env)
    assert.are.equal(2, code, out)
    assert.truthy(out:find("no-such-kubeconfig: no such file", 1, true), out)
    assert.is_false(exists(dir .. "/ran"))
  end)

  it("Ctrl-C says 'interrupted by SIGINT' and how to resume, exits 130, without a Lua location or a failure", function()
    local state = cli.tmpdir()
    local rb = cli.runbook([[
name = "ctrl-c" description = "d"
step "long wait" { run = function() time.sleep("30s") end }
step "after" { run = function() end }
]])
    local code, out = cli.pty("", { "run", rb, "--yes" }, { RUNBOOK_STATE_DIR = state, PTY_INTERRUPT_AFTER = "long wait" })
    assert.are.equal(130, code, out)
    assert.truthy(out:find("interrupted by SIGINT", 1, true), out)
    assert.truthy(out:find("runbook resume " .. run_id(state), 1, true), out)
    assert.falsy(out:find("%.lua:%d+"), out)
    assert.falsy(out:find("1 failed", 1, true), out)
  end)
end)
