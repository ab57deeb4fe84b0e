-- runbooks/rotate-db-credentials.lua against the sandbox: the todo role's
-- password is really rotated; psql checks that the new one connects and the
-- old one is refused, curl that the deployments read the new Secret and the
-- old one is gone. The spec puts the old password back afterwards.
local cli = require("spec.support.cli")
local backends = require("spec.support.backends")
local sb = require("spec.sandbox.sandbox_helper")
local kh = require("spec.runbooks.k8s_helper")
local base64 = require("base64")

local RUNBOOK = "runbooks/rotate-db-credentials.lua"
local SECRETS = "/api/v1/namespaces/todo-chatbot/secrets"

local function secret(name)
  local status, s = sb.k8s("GET", SECRETS .. "/" .. name)
  if status ~= 200 then return nil end
  local data = {}
  for k, v in pairs(s.data) do data[k] = base64.decode(v) end
  return data
end

local function rotated_secrets()
  local _, list = sb.k8s("GET", SECRETS)
  local out = {}
  for _, s in ipairs(list.items) do
    if s.metadata.name:match("^todo%-chatbot%-secrets%-%d+$") then out[#out + 1] = s.metadata.name end
  end
  return out
end

local function connects(url)
  local _, ok = sb.sh("psql -X -A -t " .. cli.quote(url) .. " -c 'SELECT current_user' 2>&1")
  return ok
end

describe("rotate-db-credentials", function()
  local old_url = sb.env("DATABASE_URL")
  local old_password = old_url:match("^postgresql://[^:]+:([^@]+)@")

  after_each(function()
    -- the old password back, with whichever password works now
    for _, name in ipairs(rotated_secrets()) do
      local url = secret(name).DATABASE_URL
      if connects(url) then sb.psql(("ALTER ROLE todo PASSWORD '%s'"):format(old_password), url) end
    end
    assert(connects(old_url), "the sandbox's password could not be put back")
    kh.reset_world()
    cli.cleanup()
  end)

  it("sets a new password, rolls every deployment onto a new Secret, and deletes the old one", function()
    local r = cli.run { "run", RUNBOOK, "--yes" }
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    local names = rotated_secrets()
    assert.are.equal(1, #names)
    local new = secret(names[1])
    -- checked with psql and curl: the new password works, the old one is refused, the old Secret is gone
    assert.is_true(connects(new.DATABASE_URL))
    assert.is_false(connects(old_url))
    assert.are_not.equal(old_password, new.POSTGRES_PASSWORD)
    assert.are.equal(new.DATABASE_URL, old_url:gsub(old_password, new.POSTGRES_PASSWORD))
    assert.is_nil(secret("todo-chatbot-secrets"))
    for _, app in ipairs { "backend", "frontend", "websocket", "recurring-task", "notification" } do
      assert.are.equal(names[1], kh.deployment(app).spec.template.spec.containers[1].envFrom[2].secretRef.name)
      assert.truthy(kh.wait_rolled_out(app))
    end
    -- and neither password was printed
    assert.is_nil((r.stdout .. r.stderr):find(old_password, 1, true))
    assert.is_nil((r.stdout .. r.stderr):find(new.POSTGRES_PASSWORD, 1, true))
  end)

  it("undoes everything when a deployment cannot roll onto the new Secret", function()
    sb.ctl("k8s bad-image websocket")          -- its next rollout never finishes
    local r = cli.run { "run", RUNBOOK, "--yes", "-p", "rollout_timeout=15s" }
    assert.are.equal(1, r.code, r.stdout .. r.stderr)
    assert.is_true(connects(old_url))                         -- the old password again
    assert.are.same({}, rotated_secrets())                    -- the new Secret removed
    assert.truthy(secret("todo-chatbot-secrets"))
    assert.are.equal("todo-chatbot-secrets", kh.deployment("backend").spec.template.spec.containers[1].envFrom[2].secretRef.name)
  end)

  it("changes nothing in a dry run, and prints no password", function()
    local r = backends.assert_unchanged(function()
      return cli.run { "run", RUNBOOK, "--dry-run" }
    end)
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("would run: ALTER ROLE \"todo\" PASSWORD '%*%*%*'", r.stdout)
    assert.is_nil(r.stdout:find(old_password, 1, true))
    assert.is_true(connects(old_url))
  end)
end)
