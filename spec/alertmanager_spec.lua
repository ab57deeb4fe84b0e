-- alertmanager (issue 25): silences through the gate, against the sandbox's
-- real Alertmanager; amtool (Debian's prometheus-alertmanager) says what it
-- holds. Each run is `runbook run` of a small runbook, as an operator's.
package.path = "spec/sandbox/?.lua;" .. package.path
local sb = require("sandbox_helper")
local cli = require("spec.support.cli")
local cjson = require("cjson")

local AM = os.getenv("ALERTMANAGER_URL")

--- The silences amtool lists (expired too) whose comment holds `tag`.
local function silences(tag)
  local out = sb.sh("amtool --alertmanager.url=" .. cli.quote(AM) .. " silence query --expired -o json; "
    .. "amtool --alertmanager.url=" .. cli.quote(AM) .. " silence query -o json")
  local found = {}
  for line in out:gmatch("[^\n]+") do
    local ok, list = pcall(cjson.decode, line)
    for _, s in ipairs(ok and type(list) == "table" and list or {}) do
      if tostring(s.comment):find(tag, 1, true) then found[#found + 1] = s end
    end
  end
  return found
end

local function runbook(step, args)
  local rb = cli.runbook(('name = "silencer"\ndescription = "silences"\nparam "tag" { required = true }\n'
    .. 'step "silence" { run = function(ctx)\n%s\nend }\n'):format(step))
  local a = { "run", rb, "--yes" }
  for _, x in ipairs(args or {}) do a[#a + 1] = x end
  return cli.run(a, { RUNBOOK_USER = "maint-op" })
end

local SILENCE = [[
  local s = alertmanager.silence { matchers = { alertname = "SpecMaintenance", namespace = "todo-chatbot",
    service = "=~backend.*", severity = "!=info" }, for_ = "2h", comment = "maintenance " .. ctx.params.tag }
  log.info("silence id %s", tostring(s.id))
  return { id = s.id }
]]

teardown(function() cli.cleanup() end)

describe("alertmanager.silence", function()
  it("creates the silence Alertmanager then holds, and expire ends it", function()
    local tag = "create-" .. os.time()
    local r = runbook(SILENCE, { "-p", "tag=" .. tag })
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    local list = silences(tag)
    assert.are.equal(1, #list, r.stdout)
    local s = list[1]
    assert.are.same({ "active", "maint-op" }, { s.status.state, s.createdBy })
    local m = {}
    for _, x in ipairs(s.matchers) do m[x.name] = { x.value, x.isRegex, x.isEqual ~= false } end
    assert.are.same({ alertname = { "SpecMaintenance", false, true }, namespace = { "todo-chatbot", false, true },
      service = { "backend.*", true, true }, severity = { "info", false, false } }, m)
    -- Two hours from now, give or take the run's time.
    local y, mo, d, h, mi, sec = s.endsAt:match("^(%d+)-(%d+)-(%d+)T(%d+):(%d+):(%d+)")
    local ends = os.time { year = y, month = mo, day = d, hour = h, min = mi, sec = sec }
    local now = os.time(os.date("!*t"))
    assert.is_true(math.abs(ends - now - 7200) < 120, s.endsAt)
    assert.truthy(r.stdout:find("silence id " .. s.id, 1, true), r.stdout)

    r = runbook(('alertmanager.expire(%q)'):format(s.id), { "-p", "tag=" .. tag })
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.truthy(r.stdout:find("expire silence " .. s.id, 1, true), r.stdout)
    assert.are.equal("expired", silences(tag)[1].status.state)
  end)

  it("in a dry run shows the silence it would create and creates nothing", function()
    local tag = "dry-" .. os.time()
    local r = runbook(SILENCE, { "-p", "tag=" .. tag, "--dry-run" })
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.truthy(r.stdout:find('would silence {alertname="SpecMaintenance",namespace="todo-chatbot",'
      .. 'service=~"backend.*",severity!="info"} for 2h: maintenance ' .. tag, 1, true), r.stdout)
    assert.are.same({}, silences(tag))
  end)

  local BAD = {
    { "no matchers", 'alertmanager.silence { matchers = {}, for_ = "1h", comment = "x" }', "at least one" },
    { "no comment", 'alertmanager.silence { matchers = { a = "b" }, for_ = "1h" }', "comment is required" },
    { "a bad length", 'alertmanager.silence { matchers = { a = "b" }, for_ = "soon", comment = "x" }', "for_" },
    { "a regex Alertmanager refuses", 'alertmanager.silence { matchers = { a = "=~(" }, for_ = "1h", comment = "x" }',
      "answered HTTP 400" },
    { "an unknown silence", 'alertmanager.expire("00000000-0000-0000-0000-000000000000")', "HTTP 404" },
  }
  for _, row in ipairs(BAD) do
    it("fails the step with a clear message for " .. row[1], function()
      local r = runbook(row[2], { "-p", "tag=bad" })
      assert.are.equal(1, r.code, r.stdout .. r.stderr)
      assert.truthy((r.stdout .. r.stderr):find(row[3], 1, true), r.stdout .. r.stderr)
      assert.is_nil((r.stdout .. r.stderr):find("traceback", 1, true))
    end)
  end
end)
