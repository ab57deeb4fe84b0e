-- --step and confirm = true, driven through a real pseudo-terminal.
local cli = require("spec.support.cli")

local RB = [[
name = "steps" description = "three writes"
param "dir" { required = true }
step "one" { description = "first", run = function(ctx) fs.write(ctx.params.dir .. "/one", "1") end }
step "two" { description = "second", run = function(ctx) fs.write(ctx.params.dir .. "/two", "2") end }
step "three" { description = "third", confirm = true, run = function(ctx) fs.write(ctx.params.dir .. "/three", "3") end }
]]

--- Run on a pty typing `answers`; returns exit code, transcript and the files written.
local function on_pty(answers, ...)
  local dir = cli.tmpdir()
  local code, out = cli.pty(answers, { "run", cli.runbook(RB), "-p", "dir=" .. dir, ... })
  local files = {}
  for _, f in ipairs { "one", "two", "three" } do
    if io.open(dir .. "/" .. f) then files[#files + 1] = f end
  end
  return code, out, table.concat(files, " ")
end

local function count(s, pat)
  local n = 0
  for _ in s:gmatch(pat) do n = n + 1 end
  return n
end

describe("--step", function()
  teardown(cli.cleanup)

  it("previews with p, runs with y, skips with n, quits with q (exit 4)", function()
    local code, out, files = on_pty("p,y,n,q", "--step")
    assert.are.equal(4, code, out)
    assert.are.equal("one", files)
    assert.truthy(out:find("[1/3] one: first", 1, true), out)
    local preview = out:find("would write 1 bytes to", 1, true)
    local wrote = out:find("→ write 1 bytes to", 1, true)
    assert.truthy(preview and wrote and preview < wrote, out)
    assert.truthy(out:find("two skipped (by the operator)", 1, true), out)
    assert.truthy(out:find("three: aborted by the operator", 1, true), out)
    assert.are.equal(4, count(out, "Run this step%?"))
  end)

  it("runs the rest without asking after a", function()
    local code, out, files = on_pty("a", "--step")
    assert.are.equal(0, code, out)
    assert.are.equal("one two three", files)
    assert.are.equal(1, count(out, "Run this step%?"))
  end)

  it("asks again after an answer it does not know", function()
    local code, out, files = on_pty("maybe,y,y,y", "--step")
    assert.are.equal(0, code, out)
    assert.are.equal("one two three", files)
    assert.truthy(out:find("Please answer y, n, p, a or q.", 1, true), out)
  end)

  it("walks a dry run step by step, changing nothing", function()
    local code, out, files = on_pty("y,y,y", "--step", "--dry-run")
    assert.are.equal(0, code, out)
    assert.are.equal("", files)
    assert.are.equal(3, count(out, "would write"))
  end)

  it("without --step asks only for the confirm = true step", function()
    local code, out, files = on_pty("n")
    assert.are.equal(0, code, out)
    assert.are.equal("one two", files)
    assert.are.equal(1, count(out, "Run this step%?"))
    assert.truthy(out:find("[3/3] three: third  (asks for confirmation)", 1, true), out)
  end)

  it("never asks with --yes", function()
    local code, out, files = on_pty("", "--yes")
    assert.are.equal(0, code, out)
    assert.are.equal("one two three", files)
    assert.are.equal(0, count(out, "Run this step%?"))
  end)

  it("shows a long step's elapsed time on a terminal while it runs", function()
    local path = cli.runbook("name = 'slow' description = 'd'\nstep 'nap' { run = function() time.sleep('1.8s') end }\n")
    local _, out = cli.pty("", { "run", path, "--yes" })
    assert.truthy(out:find("[1/1] nap ⠙ 1s", 1, true) or out:find("[1/1] nap ⠋ 1s", 1, true)
      or out:match("%[1/1%] nap %S+ 1s"), out)
    assert.truthy(out:find("\r\27%[K%s*\27%[32m✓") or out:find("\r\27[K", 1, true), out)
  end)

  it("tells later steps that the operator declined one, and says so if they read its outputs", function()
    local dir = cli.tmpdir()
    local path = cli.runbook(([[
name = "declined" description = "d"
step "stop" { confirm = true, run = function() return { saved = 3 } end }
step "start" { when = function(ctx) return not ctx.skipped("stop") end, run = function() end }
step "report" { run = function(ctx)
  fs.write(%q, ctx.skipped("stop") .. "\n" .. select(2, pcall(function() return ctx.outputs.stop end)))
end }
]]):format(dir .. "/seen"))
    local code, out = cli.pty("n", { "run", path })
    assert.are.equal(0, code, out)
    assert.truthy(out:find("stop skipped (by the operator)", 1, true), out)
    assert.truthy(out:find("start skipped", 1, true), out)
    local seen = cli.slurp(dir .. "/seen")
    assert.truthy(seen:find('^operator\n'), seen)
    assert.truthy(seen:find('ctx.outputs["stop"]: that step was skipped (the operator skipped it)', 1, true), seen)
  end)

  it("refuses without a terminal before running anything, suggesting --yes", function()
    local dir = cli.tmpdir()
    local path = cli.runbook(RB)
    for _, extra in ipairs { { "--step" }, {} } do
      local args = { "run", path, "-p", "dir=" .. dir }
      for _, a in ipairs(extra) do args[#args + 1] = a end
      local r = cli.run(args)
      assert.are.equal(2, r.code)
      assert.truthy(r.stderr:find("--yes", 1, true), r.stderr)
      assert.truthy(r.stderr:find("not a terminal", 1, true), r.stderr)
      assert.is_nil(io.open(dir .. "/one"))
    end
    local r = cli.run { "run", path, "-p", "dir=" .. dir, "--yes" }
    assert.are.equal(0, r.code, r.stderr)
    assert.truthy(io.open(dir .. "/three"))
  end)
end)
