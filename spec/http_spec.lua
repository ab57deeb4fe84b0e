-- http: against a real local server (spec/fixtures/http_server.py), no fakes.
local http = require("http")
local exec = require("exec")

local fixtures = debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") .. "/fixtures"

-- Starts the fixture server (HTTPS when given cert and key) and returns its
-- base URL and a function that stops it.
local function start_server(dir, cert, key, client_ca)
  local r = exec.read{ shell = [[
    python3 "$1" "$2/port" $3 $4 $5 >"$2/server.log" 2>&1 &
    i=0; while [ ! -s "$2/port" ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done
    echo $! $(cat "$2/port")]], fixtures .. "/http_server.py", dir, cert or "", key or "", client_ca or "" }
  local pid, port = r.stdout:match("(%d+) (%d+)")
  assert(port, "fixture server did not start: " .. r.stdout .. r.stderr)
  local scheme = cert and "https" or "http"
  return ("%s://127.0.0.1:%s"):format(scheme, port), function() exec.read{ "kill", pid } end
end

local function raises(f)
  local ok, err = pcall(f)
  assert.is_false(ok, "expected an error")
  assert.is_table(err, "expected a structured error, got " .. tostring(err))
  return err
end

local dir, base, stop

setup(function()
  dir = exec.read{ "mktemp", "-d" }.stdout:gsub("%s+$", "")
  base, stop = start_server(dir)
end)

teardown(function()
  if stop then stop() end
  if dir then exec.read{ "rm", "-rf", dir } end
end)

describe("http.request", function()
  it("GETs, lower-cases header names, joins repeats and decodes JSON", function()
    local r = http.get(base .. "/echo", { headers = { ["X-Trace"] = "abc" } })
    assert.are.equal(200, r.status)
    assert.are.equal("application/json", r.headers["content-type"])
    assert.are.equal("a, b", r.headers["x-multi"])
    assert.are.equal("GET", r.json.method)
    assert.are.equal("abc", r.json.headers["x-trace"])
    assert.are.equal("runbook", r.json.headers["user-agent"])
  end)

  for _, method in ipairs { "post", "put", "patch", "delete" } do
    it(method:upper() .. " sends its method and body", function()
      local r = http[method](base .. "/echo", { body = "payload " .. method })
      assert.are.equal(method:upper(), r.json.method)
      assert.are.equal("payload " .. method, r.json.body)
    end)
  end

  it("POSTs without a body as an empty one", function()
    local r = http.post(base .. "/echo")
    assert.are.equal("", r.json.body)
    assert.are.equal("0", r.json.headers["content-length"])
  end)

  it("encodes json= bodies and labels them", function()
    local r = http.request{ method = "post", url = base .. "/echo", json = { n = 1, list = { "a" } } }
    assert.are.equal("application/json", r.json.headers["content-type"])
    assert.are.same({ n = 1, list = { "a" } }, require("cjson").decode(r.json.body))
  end)

  it("HEAD returns headers without a body", function()
    local r = http.head(base .. "/json")
    assert.are.same({ 200, "" }, { r.status, r.body })
    assert.is_nil(r.json)
  end)

  it("decodes JSON only when the content type says so", function()
    assert.are.same({ ok = true, items = { 1, 2, 3 } }, http.get(base .. "/json").json)
    local r = http.get(base .. "/text")
    assert.are.equal('{"not": "json"}', r.body)
    assert.is_nil(r.json)
  end)

  for _, status in ipairs { 201, 204, 301, 404, 429, 500, 503 } do
    it("returns status " .. status .. " without raising", function()
      assert.are.equal(status, http.get(base .. "/status/" .. status).status)
    end)
  end

  it("does not follow redirects unless asked", function()
    assert.are.equal(302, http.get(base .. "/redirect").status)
    local r = http.get(base .. "/redirect", { follow = true })
    assert.are.same({ 200, "/echo" }, { r.status, r.json.path })
  end)

  it("reuses one connection for several requests", function()
    local ports = {}
    for i = 1, 4 do ports[i] = http.get(base .. "/echo").json.client_port end
    assert.are.same({ ports[1], ports[1], ports[1], ports[1] }, ports)
    -- and a write in between does not break the connection either
    assert.are.equal(ports[1], http.post(base .. "/echo", { body = "x" }).json.client_port)
  end)

  it("raises a retryable couldnt_connect naming the URL, without its password", function()
    local url = "http://ops:s3cret-pw@127.0.0.1:1/path"
    local err = raises(function() http.get(url) end)
    assert.are.equal("http", err.module)
    assert.are.equal("couldnt_connect", err.code)
    assert.is_true(err.retryable)
    assert.matches("127.0.0.1:1/path", err.message, 1, true)
    assert.is_nil(err.message:find("s3cret-pw", 1, true))
  end)

  it("raises timeout (retryable) when the server is slower than the timeout", function()
    local t0 = os.time()
    local err = raises(function() http.get(base .. "/slow?ms=3000", { timeout = "300ms" }) end)
    assert.are.same({ "timeout", true }, { err.code, err.retryable })
    assert.is_true(err.retryable)
    assert.is_true(os.time() - t0 <= 2)
  end)

  it("rejects misuse", function()
    assert.has_error(function() http.request{} end)
    assert.has_error(function() http.get(base, { headers = { ["X"] = "a\r\nInjected: 1" } }) end)
    assert.has_error(function() http.get(base, { timeout = "soon" }) end)
    assert.has_error(function() http.post(base, { body = "x", json = {} }) end)
  end)
end)

describe("http.check", function()
  it("returns responses below 400", function()
    assert.are.equal(200, http.check(base .. "/json").status)
  end)

  local cases = { { 404, false }, { 400, false }, { 429, true }, { 500, true }, { 503, true } }
  for _, c in ipairs(cases) do
    it("raises for " .. c[1] .. (c[2] and ", retryable" or ""), function()
      local err = raises(function() http.check(base .. "/status/" .. c[1]) end)
      assert.are.same({ "http", tostring(c[1]), c[2] }, { err.module, err.code, err.retryable })
      assert.matches("HTTP " .. c[1], err.message, 1, true)
    end)
  end

  it("raises when the connection fails", function()
    assert.are.equal("couldnt_connect", raises(function() http.check("http://127.0.0.1:1/") end).code)
  end)
end)

describe("http over TLS", function()
  local tls_dir, tls_base, tls_stop

  setup(function()
    tls_dir = exec.read{ "mktemp", "-d" }.stdout:gsub("%s+$", "")
    exec.read{ fixtures .. "/http_certs.sh", tls_dir }
    tls_base, tls_stop = start_server(tls_dir, tls_dir .. "/server.pem", tls_dir .. "/server.key")
  end)

  teardown(function()
    if tls_stop then tls_stop() end
    if tls_dir then exec.read{ "rm", "-rf", tls_dir } end
  end)

  it("verifies the server with cafile", function()
    local r = http.get(tls_base .. "/echo", { cafile = tls_dir .. "/ca.pem" })
    assert.are.equal(200, r.status)
  end)

  it("refuses an unknown CA by default", function()
    local err = raises(function() http.get(tls_base .. "/echo") end)
    assert.are.equal("peer_failed_verification", err.code)
    assert.is_false(err.retryable)
  end)

  it("skips verification with insecure=true", function()
    assert.are.equal(200, http.get(tls_base .. "/echo", { insecure = true }).status)
  end)

  describe("with client certificates", function()
    local mtls_dir, mtls_base, mtls_stop
    setup(function()
      mtls_dir = tls_dir .. "/mtls"
      exec.read{ "mkdir", mtls_dir }
      mtls_base, mtls_stop = start_server(mtls_dir, tls_dir .. "/server.pem", tls_dir .. "/server.key", tls_dir .. "/ca.pem")
    end)
    teardown(function() if mtls_stop then mtls_stop() end end)

    local function slurp(path)
      local f = assert(io.open(path, "rb"))
      local s = f:read("a")
      f:close()
      return s
    end

    it("presents a certificate from files or from PEM text", function()
      local ca = tls_dir .. "/ca.pem"
      assert.are.equal(200, http.get(mtls_base .. "/echo", { cafile = ca, cert = tls_dir .. "/client.pem",
        key = tls_dir .. "/client.key" }).status)
      local key = slurp(tls_dir .. "/client.key")
      assert.are.equal(200, http.get(mtls_base .. "/echo", { cafile = ca, cert_pem = slurp(tls_dir .. "/client.pem"),
        key_pem = key }).status)
      assert.are.equal("***", require("runbook.host").redact(key))
      local res = http.check_all{ urls = { mtls_base .. "/json" }, cafile = ca, cert = tls_dir .. "/client.pem",
        key = tls_dir .. "/client.key" }
      assert.is_true(res.ok, tostring(res.results[1].error))
    end)

    it("is refused without one", function()
      local err = raises(function() http.get(mtls_base .. "/echo", { cafile = tls_dir .. "/ca.pem" }) end)
      assert.are.equal("http", err.module)
      local res = http.check_all{ urls = { mtls_base .. "/json" }, cafile = tls_dir .. "/ca.pem" }
      assert.is_false(res.ok)
      assert.is_string(res.results[1].code)
    end)
  end)
end)

describe("http and the effect gate", function()
  local host = require("runbook.host")
  local effects

  before_each(function()
    effects = {}
    host.set_effect_sink(function(e) effects[#effects + 1] = e end)
  end)

  after_each(function()
    host.set_mode("run")
    host.set_effect_sink(nil)
  end)

  it("records writes, not reads", function()
    http.get(base .. "/echo")
    http.put(base .. "/echo", { body = "12345" })
    assert.are.equal(1, #effects)
    local e = effects[1]
    assert.are.same({ "http", "PUT", base .. "/echo", "PUT " .. base .. "/echo (5 bytes)", "performed", true },
      { e.module, e.op, e.target, e.summary, e.decision, e.ok })
  end)

  it("skips writes in dry-run; reads still reach the server", function()
    host.set_mode("dry-run")
    for _, method in ipairs { "post", "put", "patch", "delete" } do
      assert.are.same({ skipped = true }, http[method](base .. "/dry-" .. method, { body = "x" }))
    end
    assert.are.equal(200, http.get(base .. "/echo").status)
    host.set_mode("run")
    for _, req in ipairs(http.get(base .. "/requests").json) do
      assert.is_nil(req.path:match("^/dry%-"), "a skipped write reached the server: " .. req.path)
    end
    assert.are.equal(4, #effects)
    assert.are.equal("skipped", effects[1].decision)
  end)

  it("keeps passwords and Authorization values out of effects and errors", function()
    local url = "http://ops:url-s3cret@127.0.0.1:1/x"
    local err = raises(function()
      http.post(url, { headers = { Authorization = "Bearer tok-s3cret-123" } })
    end)
    local text = err.message .. effects[1].target .. effects[1].summary .. tostring(effects[1].result)
    assert.is_nil(text:find("url-s3cret", 1, true))
    assert.are.equal("***", host.redact("tok-s3cret-123"))
    assert.are.equal("***", host.redact("Bearer tok-s3cret-123"))
  end)
end)
