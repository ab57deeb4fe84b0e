-- runbooks/rate-limit.lua against the sandbox: backend's upstream allows 12
-- requests/s per API key (ctl metrics rate-limit), so with its one key most
-- of its 30 requests/s answer 429, and it logs the provider's rate-limit
-- errors (ctl k8s log-errors); the runbook adds three keys to the Secret and
-- restarts its readers, and the 429 share falls under 1%: the Secret read back
-- with curl, the share with Prometheus. No key ever prints; a dry run changes nothing.
local cli = require("spec.support.cli")
local backends = require("spec.support.backends")
local sb = require("spec.sandbox.sandbox_helper")
local kh = require("spec.runbooks.k8s_helper")

local RUNBOOK = "runbooks/rate-limit.lua"
local SECRET = "/api/v1/namespaces/todo-chatbot/secrets/todo-chatbot-secrets"
local THROTTLED = 'sum(rate(http_requests_total{namespace="todo-chatbot",service="backend",status="429"}[10s]))'
  .. ' / sum(rate(http_requests_total{namespace="todo-chatbot",service="backend"}[10s]))'
local KEYS = { "sk-first-new-key-0001", "sk-second-new-key-0002", "sk-third-new-key-0003" }

local function throttled()
  local v = sb.promql(THROTTLED)[1]
  return v and v.value or 0
end

local function throttle()
  assert(select(2, sb.ctl("metrics rate-limit backend 12")))
  assert(select(2, sb.ctl("k8s log-errors backend 'LLM provider rate limit exceeded (429 Too Many Requests)'")))
  assert(sb.wait_until(40, function() return throttled() > 0.5 end), "the 429s never showed")
end

local function printed_a_key(out)
  for _, k in ipairs(KEYS) do if out:find(k, 1, true) then return k end end
end

-- In this order, so that only the last one needs the world reseeded after it.
describe("rate-limit", function()
  setup(function()
    kh.reset_world()
    throttle()
  end)
  after_each(cli.cleanup)
  teardown(function()
    sb.ctl("metrics reset")
    kh.reset_world()
  end)

  it("changes nothing in a dry run", function()
    local r = backends.assert_unchanged(function()
      return cli.run { "run", RUNBOOK, "-p", "service=backend", "-p", "window=10s", "-p", "add_keys=" .. table.concat(KEYS, ","), "--dry-run" }
    end)
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("backend: throttled share [%d.]+%% over 10s %(threshold 1%%%)", r.stdout)
    assert.matches("%d+ rate%-limit records in the last 15m", r.stdout)
    assert.matches("would patch secret todo%-chatbot%-secrets", r.stdout)
    assert.matches("would restart deployment todo%-chatbot%-backend", r.stdout)
    assert.is_nil(printed_a_key(r.stdout .. r.stderr))
  end)

  it("adds API keys to the Secret, restarts its readers, and the 429 share falls under 1%", function()
    local before = {}
    for _, p in ipairs(kh.pods("backend")) do before[p.metadata.name] = true end
    local r = cli.run { "run", RUNBOOK, "-p", "service=backend", "-p", "window=10s", "-p", "hold=4s", "-p", "every=1s",
      "-p", "add_keys=" .. table.concat(KEYS, ","), "--yes" }
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("LLM_API_KEY, LLM_API_KEY_2, LLM_API_KEY_3 added, 3 key%(s%) in all", r.stdout)
    assert.matches("backend throttled share < 1%% held for 4s", r.stdout)
    assert.is_nil(printed_a_key(r.stdout .. r.stderr))
    local _, s = sb.k8s("GET", SECRET)
    assert.are.equal(KEYS[1], sb.sh("printf %s " .. sb.quote(s.data.LLM_API_KEY) .. " | base64 -d"))
    assert.are.equal(KEYS[3], sb.sh("printf %s " .. sb.quote(s.data.LLM_API_KEY_3) .. " | base64 -d"))
    for _, p in ipairs(kh.pods("backend")) do assert.is_nil(before[p.metadata.name], p.metadata.name .. " was not restarted") end
    assert(sb.wait_until(30, function() return throttled() < 0.01 end), "Prometheus still shows 429s: " .. throttled())
  end)
end)
