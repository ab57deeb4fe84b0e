-- Adversarial: a dry run against Redis changes nothing, whatever the runbook
-- sends (issue 20, class 4). Each variant is a step body run with --dry-run
-- against the sandbox, then checked with redis-cli. Adding a variant is one
-- row in `variants`.
package.path = "spec/sandbox/?.lua;" .. package.path
local sb = require("sandbox_helper")
local cli = require("spec.support.cli")
local adv = require("spec.adversarial.support")

local function rcli(args)
  local out, ok = sb.redis(args)
  assert(ok, out)
  return (out:gsub("%s+$", ""))
end

-- ---- what a variant watches -----------------------------------------------

--- The number of ACL LOG entries, with at least one there (a failed AUTH).
local function acl_entries()
  local n = 0
  for _ in rcli("ACL LOG"):gmatch("\nreason\n") do n = n + 1 end
  return n
end

local ACL_LOG = {}
function ACL_LOG.start()
  sb.redis("AUTH rb-adv-nobody wrong-password")
  ACL_LOG.before = acl_entries()
  assert(ACL_LOG.before > 0, "no ACL LOG entry to protect")
end
function ACL_LOG.check() assert.are.equal(ACL_LOG.before, acl_entries(), "ACL LOG entries") end

-- ---- the variants ---------------------------------------------------------
-- body: the step's code, with `r` connected and try(fn) ignoring a refusal.

local variants = {
  { "ACL LOG RESET", ACL_LOG, [[try(function() r:command("ACL", "LOG", "RESET") end)]] },
  { "acl log reset in lower case", ACL_LOG, [[try(function() r:command("acl", "log", "reset") end)]] },
  { "Acl lOg ReSeT in mixed case", ACL_LOG, [[try(function() r:command("Acl", "lOg", "ReSeT") end)]] },
  { "ACL LOG RESET inside a pipeline", ACL_LOG, [[
    try(function() r:pipeline(function(p) p:command("PING"); p:command("ACL", "LOG", "RESET") end) end)]] },
  { "ACL LOG RESET on the shared connection", ACL_LOG, [[try(function() redis.command("ACL", "LOG", "RESET") end)]] },
  { "ACL LOG RESET after MULTI", ACL_LOG, [[
    try(function() r:command("MULTI") end)
    try(function() r:command("ACL", "LOG", "RESET") end)
    try(function() r:command("EXEC") end)]] },
}

local PREAMBLE = [[
  local r <close> = redis.connect()
  local function try(fn) pcall(fn) end
]]

teardown(function() cli.cleanup() end)

describe("a Redis dry run changes nothing", function()
  for _, v in ipairs(variants) do
    local name, watch, body = v[1], v[2], v[3]
    it("against " .. name, function()
      watch.start()
      local res = adv.dry_run(adv.runbook(PREAMBLE .. body), cli.tmpdir())
      watch.check()
      assert.is_nil(res.stderr:find("traceback", 1, true), res.stderr)
    end)
  end
end)
