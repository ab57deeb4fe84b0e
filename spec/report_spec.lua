-- `runbook report` for a postmortem: every time with its date and UTC offset,
-- and the timeline as a Mermaid Gantt chart (rendered by GitHub and GitLab).
local cli = require "spec.support.cli"

local RB = [[
name = "timed" description = "three steps, one failing"
step "Warm up" { run = function() time.sleep("200ms") end }
step "Skip me" { when = function() return false end, run = function() end }
step "Break: now" { run = function() log.info("about to break"); error("broken") end }
]]

local STAMP = "%d%d%d%d%-%d%d%-%d%d %d%d:%d%d:%d%d%.%d%d%d [+-]%d%d:%d%d"

describe("report", function()
  teardown(cli.cleanup)

  it("shows every time with its date and UTC offset, and the timeline as a Mermaid Gantt chart", function()
    local env = { RUNBOOK_STATE_DIR = cli.tmpdir(), TZ = "Europe/Berlin" }
    local r = cli.run({ "run", cli.runbook(RB) }, env)
    assert.are.equal(1, r.code, r.stdout .. r.stderr)
    local id = r.stdout:match("runbook resume (%S+)")
    local md = cli.run({ "report", id }, env).stdout
    assert.matches("| Started | " .. STAMP .. " |", md)
    assert.matches("| " .. STAMP .. " | 1%. Warm up | ok |", md)
    assert.matches("started " .. STAMP, md)
    assert.matches(STAMP .. " INFO  about to break", md)
    assert.matches("%+0[12]:00", md)   -- Berlin: +01:00 or +02:00, not UTC
    local chart = md:match("```mermaid\n(gantt\n.-)```")
    assert.truthy(chart, md)
    assert.matches("dateFormat YYYY%-MM%-DDTHH:mm:ss%.SSS\n  axisFormat %%H:%%M:%%S\n", chart)
    assert.matches("\n  1%. Warm up %(ok%) :done, s1, %d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d%d%d, (%d+)ms\n", chart)
    assert.matches("\n  2%. Skip me %(skipped%) :s2, ", chart)
    assert.matches("\n  3%. Break  now %(failed%) :crit, s3, ", chart)   -- ':' would end the task's name
    local ms = tonumber(chart:match("Warm up %(ok%) :done, s1, %S+ (%d+)ms"))
    assert.is_true(ms >= 200 and ms < 2000, tostring(ms))
  end)
end)
