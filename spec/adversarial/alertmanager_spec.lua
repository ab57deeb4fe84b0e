-- Alertmanager silences in a dry run (issue 25). Each row is a step run with
-- --dry-run against the sandbox's Alertmanager; amtool lists its silences
-- before and after (one made beforehand for the rows that try to expire it),
-- and they must be the same. A row may be refused with an error or skipped as
-- a write; either way nothing is silenced or expired.
local adv = require("spec.adversarial.support")
local cli = require("spec.support.cli")

local AM = os.getenv("ALERTMANAGER_URL")
local amtool = "amtool --alertmanager.url=" .. cli.quote(AM)
local existing   -- a silence made by amtool, which the rows try to expire

local function sh(cmd)
  local p = assert(io.popen(cmd .. " 2>&1"))
  local out = p:read("a")
  p:close()
  return out
end

-- Every silence amtool lists, active and expired: ids, matchers, ends.
local function silences() return sh(amtool .. " silence query --expired -q; " .. amtool .. " silence query") end

setup(function()
  existing = sh(amtool .. ' silence add --duration=1h --comment="adversarial spec" --author=spec '
    .. 'alertname=AdversarialExisting'):match("[%w%-]+")
end)

teardown(function()
  sh(amtool .. " silence expire " .. existing)
  cli.cleanup()
end)

local SILENCE = '{ matchers = { alertname = "AdversarialNew" }, for_ = "1h", comment = "dry" }'

local VARIANTS = {
  { "alertmanager.silence", "alertmanager.silence " .. SILENCE },
  { "a client of its own", "alertmanager.connect{ url = os.getenv('ALERTMANAGER_URL') }:silence " .. SILENCE },
  { "expire", "alertmanager.expire(EXISTING)" },
  { "the client's request as a GET with the silence as its body", [[
      local c = alertmanager.connect()
      c:call("x", "GET", { "api", "v2", "silences" }, { json = { matchers = { { name = "a", value = "b",
        isRegex = false } }, startsAt = "2026-01-01T00:00:00Z", endsAt = "2099-01-01T00:00:00Z", createdBy = "x",
        comment = "x" } }) ]] },
  { "the client's call replaced through its metatable", [[
      local c = alertmanager.connect()
      getmetatable(c).__index.call = function() return { status = 200, json = { silenceID = "x" } } end
      c:silence ]] .. SILENCE },
  { "the client's headers asking for another method", [[
      local c = alertmanager.connect()
      c.headers = { ["X-HTTP-Method-Override"] = "GET" }
      c:expire(EXISTING) ]] },
  { "http.delete of the silence", "http.delete(os.getenv('ALERTMANAGER_URL') .. '/api/v2/silence/' .. EXISTING)" },
  { "http.post of a silence", [[http.post(os.getenv('ALERTMANAGER_URL') .. '/api/v2/silences', { json = {
      matchers = { { name = "a", value = "b", isRegex = false } }, startsAt = "2026-01-01T00:00:00Z",
      endsAt = "2099-01-01T00:00:00Z", createdBy = "x", comment = "x" } })]] },
}

describe("adversarial: Alertmanager silences in a dry run", function()
  for _, v in ipairs(VARIANTS) do
    it(v[1], function()
      assert.truthy(existing and #existing > 10, "amtool made no silence")
      adv.check { step = ("local EXISTING = %q\n%s"):format(existing, v[2]), snapshot = silences }
    end)
  end
end)
