-- When the journal reaches the disk, seen through strace: an effect's intent
-- and outcome are fsync'd around it, and so are the ends of the step and run
-- that performed it; a run that performs nothing pays no fsync.
local cli = require "spec.support.cli"

--- The journal lines written before each fsync of the journal's descriptor.
local function synced(src, args)
  local dir, state = cli.tmpdir(), cli.tmpdir()
  local trace = dir .. "/trace"
  local rb = cli.runbook(src:gsub("DIR", dir), "fsync.lua")
  local cmd = { "run", rb, "--yes" }
  for _, a in ipairs(args or {}) do cmd[#cmd + 1] = a end
  local r = cli.run(cmd, { RUNBOOK_STATE_DIR = state },
    { "strace", "-f", "-qq", "-s", "4096", "-o", trace, "-e", "trace=write,fsync,fdatasync" })
  assert.are.equal(0, r.code, r.stderr)
  local events, out = {}, {}
  for line in io.lines(trace) do
    local ev = line:match('write%(%d+, "{.-\\"event\\":\\"([%w_]+)')
    if ev then events[#events + 1] = ev end
    if line:match("f%a*sync%(") then
      out[#out + 1] = table.concat(events, " ")
      events = {}
    end
  end
  return out
end

describe("the journal's fsyncs", function()
  it("a run that performs nothing, or a dry run, is never fsync'd", function()
    local noop = 'name = "n"\ndescription = "d"\nstep "one" { run = function() end }\nstep "two" { run = function() end }\n'
    assert.are.same({}, synced(noop))
    local writes = 'name = "w"\ndescription = "d"\nstep "one" { run = function() fs.write("DIR/out", "x") end }\n'
    assert.are.same({}, synced(writes, { "--dry-run" }))
  end)

  it("an effect is fsync'd before and after, and the ends of its step and run after it", function()
    local src = 'name = "w"\ndescription = "d"\nstep "one" { run = function() fs.write("DIR/out", "x") end }\n' ..
      'step "two" { run = function() end }\n'
    assert.are.same({
      "run_start step_start intent",
      "effect",
      "step_end",
      "step_start step_end run_end",
    }, synced(src))
  end)
end)
