-- runbooks/websocket-triage.lua against the sandbox: the websocket app
-- refusing upgrades until its pods are replaced (ctl dapr ws-stuck), its pods
-- crowded with connections (ctl dapr ws-load) and the Ingress closing idle
-- WebSockets after nginx's 60 s; the runbook raises the timeouts, restarts and
-- scales out, checked with curl; a JWT_SECRET that differs from
-- BETTER_AUTH_SECRET is named, never printed; a dry run changes nothing.
local cli = require("spec.support.cli")
local backends = require("spec.support.backends")
local sb = require("spec.sandbox.sandbox_helper")
local kh = require("spec.runbooks.k8s_helper")

local RUNBOOK = "runbooks/websocket-triage.lua"
local INGRESS = "/apis/networking.k8s.io/v1/namespaces/todo-chatbot/ingresses/todo-chatbot"
local SECRET = "/api/v1/namespaces/todo-chatbot/secrets/todo-chatbot-secrets"

-- The HTTP status of an upgrade request to the app's WebSocket endpoint, with curl.
local function upgrade_status()
  local url = sb.env("WEBSOCKET_URL"):gsub("^ws:", "http:")
  return sb.sh("curl -s -o /dev/null -m 2 -w '%{http_code}' -H 'Connection: Upgrade' -H 'Upgrade: websocket' "
    .. "-H 'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==' -H 'Sec-WebSocket-Version: 13' " .. sb.quote(url)):match("%d+")
end

local function pod_names()
  local names = {}
  for _, p in ipairs(kh.pods("websocket")) do names[p.metadata.name] = true end
  return names
end

local function faults()
  assert(select(2, sb.ctl("dapr ws-stuck websocket")))
  assert(select(2, sb.ctl("dapr ws-load websocket 900")))   -- 450 a pod at 2 replicas: over 80% of 500
  assert.are.equal("503", upgrade_status())
end

-- In this order, so that only the last one needs the world reseeded after it.
describe("websocket-triage", function()
  setup(kh.reset_world)
  after_each(function()
    sb.ctl("dapr ws-accept websocket")
    sb.ctl("dapr ws-load websocket 0")
    cli.cleanup()
  end)
  teardown(kh.reset_world)

  it("changes nothing in a dry run", function()
    faults()
    local r = backends.assert_unchanged(function()
      return cli.run { "run", RUNBOOK, "--dry-run" }
    end)
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("would patch ingress todo%-chatbot", r.stdout)
    assert.matches("would restart deployment todo%-chatbot%-websocket", r.stdout)
    assert.matches("would scale deployment todo%-chatbot%-websocket to 3", r.stdout)
    assert.are.equal("503", upgrade_status())
    assert.are.equal(2, kh.deployment("websocket").spec.replicas)
  end)

  it("names a JWT_SECRET that differs from BETTER_AUTH_SECRET without printing either", function()
    local _, secret = sb.k8s("GET", SECRET)
    assert.are.equal(200, (sb.k8s("PATCH", SECRET, { stringData = { JWT_SECRET = "a-stale-jwt-secret-value" } })))
    local r = cli.run { "run", RUNBOOK, "-p", "settle=1s", "-p", "ingress_timeout=60", "--yes" }
    assert.are.equal(200, (sb.k8s("PATCH", SECRET, { data = { JWT_SECRET = secret.data.JWT_SECRET } })))
    assert.are.equal(1, r.code, r.stdout .. r.stderr)
    assert.matches("JWT_SECRET and BETTER_AUTH_SECRET differ in secret todo%-chatbot%-secrets", r.stdout .. r.stderr)
    assert.falsy((r.stdout .. r.stderr):find("a-stale-jwt-secret-value", 1, true))
    assert.falsy((r.stdout .. r.stderr):find("sandbox-better-auth-secret", 1, true))
  end)

  it("raises the Ingress timeouts, restarts the pods that refuse upgrades and scales out the crowded ones", function()
    faults()
    local before = pod_names()
    local r = cli.run { "run", RUNBOOK, "-p", "settle=20s", "--yes" }
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("900 connections open, 450 per ready pod", r.stdout)
    assert.matches("HTTP 503", r.stdout)
    assert.matches("ingress todo%-chatbot: proxy%-read%-timeout 60s", r.stdout)
    local _, ing = sb.k8s("GET", INGRESS)
    assert.are.equal("3600", ing.metadata.annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"])
    assert.are.equal("3600", ing.metadata.annotations["nginx.ingress.kubernetes.io/proxy-send-timeout"])
    assert.are.equal(3, kh.deployment("websocket").spec.replicas)
    for name in pairs(pod_names()) do assert.is_nil(before[name], name .. " was not replaced") end
    assert.are.equal("101", upgrade_status())
  end)
end)
