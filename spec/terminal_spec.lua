-- The human view on a terminal (through a pty) and piped: coloured WARN and
-- ERROR, multi-line and long messages kept under the step's bar, a spinner
-- that says what it waits for and how long is left, no repeated words.
local cli = require("spec.support.cli")

local TALK = [[
name = "talk" description = "messages of every shape"
step "Talk" { run = function()
  log.warn("first line\nsecond line")
  log.error("it went wrong")
  log.info(("word "):rep(40))
end }
step "Never" { when = function() return false end, run = function() end }
]]

local WAIT = [[
name = "wait" description = "waits for a condition"
step "Wait" { run = function()
  local t0 = time.monotonic()
  time.wait_until({ timeout = "30s", every = "250ms", what = "the flag" }, function() return time.monotonic() - t0 > 3 end)
end }
]]

local function visible(s) return (s:gsub("\27%[[%d;]*[mK]", ""):gsub("\r", "")) end

describe("terminal output", function()
  teardown(cli.cleanup)

  it("colours WARN and ERROR, keeps the bar on every line of a message, and wraps long ones under it", function()
    local code, out = cli.pty("", { "run", cli.runbook(TALK) }, { TERM = "xterm", PTY_COLUMNS = "60" })
    assert.are.equal(0, code, out)
    assert.truthy(out:find("\27[33mWARN\27[0m first line", 1, true), out)
    assert.truthy(out:find("\27[33mWARN\27[0m second line", 1, true), out)
    assert.truthy(out:find("\27[1;31mERROR\27[0m it went wrong", 1, true), out)
    local words = 0
    for line in visible(out):gmatch("[^\n]+") do
      if line:find("word", 1, true) then
        assert.matches("^    │ word", line)
        assert.is_true(utf8.len(line) <= 60, line)
        local _, n = line:gsub("word", "")
        words = words + n
      end
    end
    assert.are.equal(40, words)
  end)

  it("piped, keeps the prefix on each line and says skipped once", function()
    local r = cli.run { "run", cli.runbook(TALK) }
    assert.are.equal(0, r.code, r.stderr)
    assert.truthy(r.stdout:find("    | WARN first line\n    | WARN second line\n", 1, true), r.stdout)
    assert.truthy(r.stdout:find("  - Never skipped (its when condition is false)", 1, true), r.stdout)
    assert.is_nil(r.stdout:find("skipped Never", 1, true), r.stdout)
    assert.is_nil(r.stdout:find("\27[", 1, true), r.stdout)
  end)

  it("has the spinner say what the step waits for and how long is left", function()
    local code, out = cli.pty("", { "run", cli.runbook(WAIT) }, { TERM = "xterm" })
    assert.are.equal(0, code, out)
    local left = visible(out):match("%[1/1%] Wait [^\n]- %d+s: waiting for the flag, 0m(%d%d)s left")
    assert.truthy(left, visible(out))
    assert.is_true(tonumber(left) <= 29 and tonumber(left) >= 20, left)
  end)
end)
