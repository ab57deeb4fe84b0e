-- http.websocket against the sandbox's WebSocket endpoint (the websocket
-- app's /ws echo, $WEBSOCKET_URL, which spec/sandbox/dapr_spec.lua checks
-- with python3-websockets), each runbook run by ./runbook and the endpoint
-- looked at with curl: the upgrade's status and the app's /stats (messages
-- received).
-- Failures: refused upgrades (ctl dapr ws-refuse), refused connections, a
-- server that never answers, a reply that does not match, bad options; each
-- a clear error naming the URL, never a traceback.
local cli = require("spec.support.cli")
local sb = require("spec.sandbox.sandbox_helper")

local URL = sb.env("WEBSOCKET_URL")

-- curl's upgrade request, as seed 003 sends it: the status of the answer.
local function curl_upgrade(url)
  local out = sb.sh("curl -s -o /dev/null -w '%{http_code}' -m 5 --http1.1 -H 'Connection: Upgrade' -H 'Upgrade: websocket'"
    .. " -H 'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==' -H 'Sec-WebSocket-Version: 13' " .. sb.quote(url:gsub("^ws:", "http:")))
  return tonumber(out)
end

-- The app's own count of the messages its /ws received.
local function received()
  local out, ok = sb.sh("curl -s -f -m 5 " .. sb.quote(URL:gsub("^ws:", "http:"):gsub("/ws$", "/stats")))
  assert(ok, out)
  return require("cjson").decode(out).messages_received
end

-- A runbook whose one step runs `body` (URL in scope) and logs the result as JSON.
local function run(body, ...)
  local src = ("name = \"ws\"\ndescription = \"probe\"\nstep \"probe\" { run = function()\nlocal URL = %q\n"
    .. "local r = %s\nlog.info(\"result %%s\", json.encode(r))\nend }\n"):format(URL, body)
  local r = cli.run { "run", cli.runbook(src), ... }
  r.result = r.stdout:match("result (%b{})")
  r.result = r.result and require("cjson").decode(r.result)
  assert.is_nil((r.stdout .. r.stderr):find("traceback", 1, true), r.stdout .. r.stderr)
  return r
end

describe("http.websocket", function()
  after_each(function()
    sb.ctl("dapr ws-accept websocket")
    cli.cleanup()
  end)

  it("completes the handshake, gets a pong, and reads the echo of a message it sends", function()
    local before = received()
    local r = run('http.websocket(URL, { send = "hello from a runbook", expect = "^hello", timeout = "10s", protocol = "chat" })', "--yes")
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    local res = r.result
    assert.is_true(res.ok)
    assert.are.equal(101, res.status)
    assert.are.equal("chat", res.protocol)
    assert.are.equal("hello from a runbook", res.reply)
    assert.is_false(res.binary)
    assert.is_true(res.connect >= 0 and res.pong >= 0 and res.latency >= res.connect, r.stdout)
    assert.are.equal(before + 1, received())
  end)

  it("in a dry run completes the handshake and the ping but sends no message", function()
    local before = received()
    local r = run('http.websocket(URL, { send = "would change something" })', "--dry-run")
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("would send a 22%-byte message to ws://127%.0%.0%.1:%d+/ws", r.stdout)
    assert.is_true(r.result.skipped)
    assert.is_nil(r.result.reply)
    assert.is_true(r.result.pong >= 0)
    assert.are.equal(before, received())
  end)

  it("names the URL and the status when the server refuses the upgrade", function()
    local out, ok = sb.ctl("dapr ws-refuse websocket")
    assert(ok, out)
    assert.are.equal(503, curl_upgrade(URL))
    local r = run('(function() local ok, e = pcall(http.websocket, URL); return { code = e.code, retryable = e.retryable } end)()', "--yes")
    assert.are.same({ code = "503", retryable = true }, r.result)
    r = run("http.websocket(URL)", "--yes")
    assert.are.equal(1, r.code)
    assert.matches("WebSocket " .. URL:gsub("%p", "%%%0") .. ": handshake rejected: HTTP 503", r.stdout)
    assert.matches("handshake rejected: HTTP 404", run('http.websocket((URL:gsub("/ws$", "/nowhere")))', "--yes").stdout)
  end)

  it("names the URL of a port that refuses connections, and of a server that never answers, within the timeout", function()
    local closed = sb.sh([[python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])']])
    local url = "ws://127.0.0.1:" .. closed:match("%d+") .. "/ws"
    local r = run(("http.websocket(%q)"):format(url), "--yes")
    assert.are.equal(1, r.code)
    assert.matches("WebSocket " .. url:gsub("%p", "%%%0") .. ": connection refused or host unreachable", r.stdout)
    assert.matches("couldnt_connect", run(("select(2, pcall(http.websocket, %q)).code"):format(url), "--yes").stdout)

    local port, pid = cli.fixture("silent_tcp.py")
    local t0 = require("runbook.host").now()
    r = run(('http.websocket("ws://127.0.0.1:%s/ws", { timeout = "1s" })'):format(port), "--yes")
    local took = require("runbook.host").now() - t0
    os.execute("kill " .. pid)
    assert.are.equal(1, r.code)
    assert.matches("WebSocket ws://127%.0%.0%.1:" .. port .. "/ws: timed out after 1s waiting for the handshake", r.stdout)
    assert.is_true(took < 10, "took " .. took .. "s")
  end)

  it("raises when the reply does not match expect", function()
    local r = run('http.websocket(URL, { send = "pong?", expect = "^ping" })', "--yes")
    assert.are.equal(1, r.code)
    assert.matches('the reply "pong%?" does not match "%^ping"', r.stdout)
  end)

  it("refuses bad options with a clear error", function()
    for body, msg in pairs {
      ['http.websocket("http//nohost/ws")'] = "url must be a ws://, wss://, http:// or https:// URL",
      ['http.websocket("ws://user:pw@127.0.0.1:1/ws")'] = "credentials in the URL are not supported",
      ['http.websocket(URL .. "#frag")'] = "fragment",
      ['http.websocket(URL, { timeout = "soon" })'] = "timeout",
      ['http.websocket(URL, { expect = "[" })'] = "expect is not a valid Lua pattern",
      ['http.websocket(URL, { send = 42 })'] = "send must be a string",
      ["http.websocket(42)"] = "http.websocket expects a URL",
    } do
      local r = run(body, "--yes")
      assert.are.equal(1, r.code, body)
      assert.truthy(r.stdout:find(msg, 1, true), body .. ":\n" .. r.stdout)
      assert.is_nil(r.stdout:find("pw@", 1, true), r.stdout)
    end
  end)
end)
