-- The run console of `runbook serve` (issue 29) as curl sees it: the login
-- and its cookie, the Content-Security-Policy, CSRF tokens, the viewer and
-- approver roles, and hostile text (a param, an alert's label, a log line)
-- shown escaped. Plans are made with `runbook plan`; what an approval
-- recorded is read from the state directory, and apply's answer from the CLI.
local cli = require("spec.support.cli")
local cjson = require("cjson")

local TOKEN = "console-serve-token-5f0c9a1e"
local ALICE, VICTOR = "alice-approver-token-41d7e2", "victor-viewer-token-93b0c8"
local XSS = [[<script>alert("x")</script>]]
local LABEL = [[<img src=x onerror=alert(1)>]]
local dir, serve, url

local wait_until = cli.wait_until

--- A request with curl: its status, headers (lower-case names) and body.
-- o = {jar = a cookie file, form = {k = v}, json = text, bearer = token}.
local function http(method, path, o)
  o = o or {}
  local hdr = os.tmpname()
  local args = { "curl", "-s", "-m", "30", "-D", hdr, "-X", method, "-w", "\n%{http_code}" }
  if o.jar then table.move({ "-b", o.jar, "-c", o.jar }, 1, 4, #args + 1, args) end
  if o.bearer then table.move({ "-H", "Authorization: Bearer " .. o.bearer }, 1, 2, #args + 1, args) end
  for k, v in pairs(o.form or {}) do table.move({ "--data-urlencode", k .. "=" .. v }, 1, 2, #args + 1, args) end
  if o.json then table.move({ "--data-binary", o.json }, 1, 2, #args + 1, args) end
  args[#args + 1] = url .. path
  for i, a in ipairs(args) do args[i] = cli.quote(a) end
  local p = io.popen(table.concat(args, " "))
  local out = p:read("a")
  p:close()
  local headers = {}
  for name, value in cli.slurp(hdr):gmatch("([%w%-]+):%s*([^\r\n]*)") do headers[name:lower()] = value end
  os.remove(hdr)
  local body, status = out:match("^(.*)\n(%d+)%s*$")
  return tonumber(status), headers, body
end

--- A session: the cookie jar after logging in with `token` (and `name`).
local function login(token, name)
  local jar = os.tmpname()
  local _, _, page = http("GET", "/login", { jar = jar })
  local csrf = page:match('name="csrf" value="(%x+)"')
  local status, headers = http("POST", "/login", { jar = jar, form = { token = token, name = name, csrf = csrf } })
  assert.are.equal(303, status)
  return jar, headers
end

--- The CSRF token of the page at `path` in session `jar`.
local function csrf_of(jar, path)
  local _, _, page = http("GET", path, { jar = jar })
  return page:match('name="csrf" value="(%x+)"')
end

--- A plan of the writer requested by `who`, needing one approval: its id.
local function plan_by(who, note)
  local r = cli.run({ "plan", dir .. "/planned.lua", "-p", "out=" .. dir .. "/plan-out-" .. math.random(1e9), "-p",
    "note=" .. note, "--require-approval", "1" }, { RUNBOOK_USER = who })
  assert.are.equal(0, r.code, r.stderr)
  return r.stdout:match("plan (%d+T%d+Z%-%x+)")
end

local function approvals(id)
  return cli.slurp(os.getenv("RUNBOOK_STATE_DIR") .. "/approvals/" .. id .. ".jsonl")
end

local WRITER = [[
name = "writer" description = "writes a note, and logs it"
param "out" {}
param "note" { default = "hello" }
param "api_key" { secret = true, default = "none" }
step "write" { run = function(ctx)
  log.info("note: " .. ctx.params.note)
  fs.write(ctx.params.out, ctx.params.note)
end }
]]

-- Fails at its second step until the file `ready` exists: a resume then finishes it.
local FLAKY = [[
name = "flaky" description = "fails until ready"
param "ready" {}
step "first" { run = function() log.info("first") end }
step "second" { run = function(ctx)
  if not fs.exists(ctx.params.ready) then error("not ready yet") end
end }
]]

setup(function()
  dir = cli.tmpdir()
  local writer = cli.write(dir .. "/writer.lua", WRITER)
  local flaky = cli.write(dir .. "/flaky.lua", FLAKY)
  -- Apply needs a plan's secrets given again: the console's plans have none.
  cli.write(dir .. "/planned.lua", (WRITER:gsub('param "api_key"[^\n]*\n', "")))
  local rules = cli.write(dir .. "/rules.yml", ([[
rules:
  - name: label-note
    match: {alertname: ConsoleXss}
    runbook: %s
    mode: dry-run
    params: {note: "{{ labels.service }}", out: "%s/alert-out"}
runs: [%s, %s]
]]):format(writer, dir, writer, flaky))
  local users = cli.write(dir .. "/users", ("# name role token\nalice approver %s\nvictor viewer %s\n"):format(ALICE,
    VICTOR))
  serve, url = cli.serve({ "--rules", rules, "--token-file", cli.write(dir .. "/token", TOKEN .. "\n"), "--users", users },
    { RUNBOOK_USER = "runbook-serve" })
end)

teardown(function()
  if serve and serve.pid then os.execute("kill " .. serve.pid) end
  cli.cleanup()
end)

describe("runbook serve's console", function()
  it("refuses every page without a login, and a wrong token at the login", function()
    for _, path in ipairs { "/", "/runs/20260101T000000Z-00000000", "/plans/20260101T000000Z-00000000" } do
      local status, headers, body = http("GET", path)
      assert.are.equal(303, status, path)
      assert.are.equal("/login", headers.location)
      assert.is_nil(body:find("<table", 1, true))
    end
    assert.are.equal(401, (http("GET", "/runs/20260101T000000Z-00000000/events")))
    assert.are.equal(401, (http("POST", "/plans/20260101T000000Z-00000000/approve", { form = { comment = "x" } })))
    local jar = os.tmpname()
    local _, _, page = http("GET", "/login", { jar = jar })
    local csrf = page:match('name="csrf" value="(%x+)"')
    local status, headers, body = http("POST", "/login", { jar = jar, form = { token = TOKEN .. "x", csrf = csrf } })
    assert.are.equal(401, status)
    assert.is_nil((headers["set-cookie"] or ""):find("rb_session", 1, true))
    assert.truthy(body:find("wrong token", 1, true), body)
    -- The serve token names its holder.
    status = http("POST", "/login", { jar = jar, form = { token = TOKEN, csrf = csrf } })
    assert.are.equal(400, status)
    -- A login without the login page's CSRF token.
    assert.are.equal(403, (http("POST", "/login", { form = { token = ALICE } })))
    assert.are.equal(303, (http("POST", "/login", { jar = jar, form = { token = TOKEN, name = "sam", csrf = csrf } })))
    assert.are.equal(200, (http("GET", "/", { jar = jar })))
  end)

  it("sets an HttpOnly, SameSite=Strict cookie, and serves every page under a strict CSP", function()
    local jar, headers = login(ALICE)
    local cookie = headers["set-cookie"]
    assert.truthy(cookie:find("HttpOnly", 1, true), cookie)
    assert.truthy(cookie:find("SameSite=Strict", 1, true), cookie)
    local status, h, body = http("GET", "/", { jar = jar })
    assert.are.equal(200, status)
    assert.truthy(h["content-security-policy"]:find("script-src 'self'", 1, true), h["content-security-policy"])
    assert.truthy(h["content-security-policy"]:find("default-src 'none'", 1, true))
    assert.is_nil(h["content-security-policy"]:find("unsafe", 1, true))
    assert.are.equal("nosniff", h["x-content-type-options"])
    assert.truthy(body:find("alice", 1, true))
    -- No inline script, handler or style: the script is a file.
    for script in body:gmatch("<script[^>]*>") do assert.truthy(script:find('src="/static/', 1, true), script) end
    for tag in body:gmatch("<[^>]*>") do
      assert.is_nil(tag:find("%son%a+%s*="), "an inline event handler: " .. tag)
      assert.is_nil(tag:find("style=", 1, true), "an inline style: " .. tag)
    end
    local js_status, js = http("GET", "/static/console.js")
    assert.are.equal(200, js_status)
    assert.truthy(js["content-type"]:find("javascript", 1, true))
    assert.are.equal(200, (http("GET", "/static/console.css")))
  end)

  it("shows a param, an alert's label and a log line escaped, and no secret", function()
    local secret = "console-secret-api-key-77"
    local start = cjson.encode { runbook = dir .. "/writer.lua", by = "alice",
      params = { note = XSS, out = dir .. "/xss-out", api_key = secret } }
    local status, _, body = http("POST", "/v1/runs", { bearer = TOKEN, json = start })
    assert.are.equal(202, status, body)
    local run = cjson.decode(body).run_id
    local alert = cjson.encode { version = "4", alerts = { { status = "firing",
      labels = { alertname = "ConsoleXss", service = LABEL } } } }
    status, _, body = http("POST", "/v1/alertmanager", { bearer = TOKEN, json = alert })
    assert.are.equal(200, status, body)
    local alert_run = cjson.decode(body).started[1].run_id
    local jar = login(VICTOR)
    for _, id in ipairs { run, alert_run } do
      assert.truthy(wait_until(60, function()
        local _, _, page = http("GET", "/runs/" .. id, { jar = jar })
        return page:find("s-ok", 1, true)
      end), "run " .. id .. " did not end ok")
    end
    local _, _, page = http("GET", "/runs/" .. run, { jar = jar })
    assert.is_nil(page:find(XSS, 1, true))
    assert.truthy(page:find("note: &lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;", 1, true), page)
    assert.is_nil(page:find(secret, 1, true))
    _, _, page = http("GET", "/runs/" .. alert_run, { jar = jar })
    assert.is_nil(page:find(LABEL, 1, true))
    assert.truthy(page:find("&lt;img src=x onerror=alert(1)&gt;", 1, true), page)
    -- The rule's mode is dry-run: the page says so, and what the step would have done.
    assert.truthy(page:find('<span class="dry">dry run</span>', 1, true))
    assert.truthy(page:find("<b>would (not simulated)</b> write", 1, true), page)
    -- The list names the alert with its labels; a filter's text comes back escaped.
    _, _, page = http("GET", "/?alert=ConsoleXss", { jar = jar })
    assert.truthy(page:find(alert_run, 1, true))
    assert.is_nil(page:find(run, 1, true))
    assert.is_nil(page:find(LABEL, 1, true))
    assert.truthy(page:find("service=&lt;img src=x onerror=alert(1)&gt;", 1, true), page)
    _, _, page = http("GET", "/?status=failed", { jar = jar })
    assert.is_nil(page:find(alert_run, 1, true))
    _, _, page = http("GET", "/?status=ok&alert=ConsoleXss", { jar = jar })
    assert.truthy(page:find(alert_run, 1, true))
    _, _, page = http("GET", "/?runbook=" .. XSS:gsub("[^%w]", function(c) return ("%%%02X"):format(c:byte()) end),
      { jar = jar })
    assert.is_nil(page:find(XSS, 1, true))
    assert.truthy(page:find("&lt;script&gt;", 1, true))
  end)

  it("names a run without a terminal as cron's or a script's, and logs out", function()
    local r = cli.run { "run", dir .. "/writer.lua", "--yes", "-p", "out=" .. dir .. "/cron-out" }
    assert.are.equal(0, r.code, r.stderr)
    local jar = login(VICTOR)
    local _, _, page = http("GET", "/", { jar = jar })
    assert.truthy(page:find("cron or script, ", 1, true), page)
    local status, headers = http("POST", "/logout", { jar = jar, form = { csrf = csrf_of(jar, "/") } })
    assert.are.equal(303, status)
    assert.are.equal("/login", headers.location)
    assert.are.equal(303, (http("GET", "/", { jar = jar })))
  end)

  it("refuses a --users file with a bad line, naming it", function()
    local users = cli.write(dir .. "/bad-users", "alice approver " .. ALICE .. "\nbob admin " .. VICTOR .. "\n")
    local r = cli.run { "serve", "--rules", dir .. "/rules.yml", "--listen", "127.0.0.1:0", "--token-file",
      dir .. "/token", "--users", users }
    assert.are.equal(2, r.code)
    assert.truthy(r.stderr:find(users .. ":2: role 'admin': expected viewer or approver", 1, true), r.stderr)
    assert.is_nil(r.stderr:find(VICTOR, 1, true))
  end)

  it("shows a plan's hostile param escaped, and refuses to approve a plan changed after it was made", function()
    local id = plan_by("carol", XSS)
    local jar = login(ALICE)
    local _, _, page = http("GET", "/plans/" .. id, { jar = jar })
    assert.is_nil(page:find(XSS, 1, true))
    assert.truthy(page:find("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;", 1, true), page)
    local file = os.getenv("RUNBOOK_STATE_DIR") .. "/plans/" .. id .. ".json"
    cli.write(file, (cli.slurp(file):gsub('"required":1', '"required":0')))
    local status
    status, _, page = http("POST", "/plans/" .. id .. "/approve", { jar = jar, form = { csrf = csrf_of(jar, "/") } })
    assert.are.equal(409, status)
    assert.truthy(page:find("the plan was changed after it was made", 1, true), page)
    assert.are.equal("", approvals(id))
  end)

  it("marks the cookie Secure under TLS, and redacts serve's tokens from pages", function()
    os.execute(("openssl req -x509 -newkey rsa:2048 -nodes -keyout %s/key.pem -out %s/cert.pem -days 1 "
      .. "-subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1 2>/dev/null"):format(dir, dir))
    local tls = cli.spawn({ "serve", "--rules", dir .. "/rules.yml", "--listen", "127.0.0.1:0", "--token-file",
      dir .. "/token", "--users", dir .. "/users", "--tls-cert", dir .. "/cert.pem", "--tls-key", dir .. "/key.pem" })
    local tls_url = wait_until(60, function() return cli.slurp(tls.dir .. "/out"):match("https://127%.0%.0%.1:%d+") end)
    assert.truthy(tls_url, cli.slurp(tls.dir .. "/err"))
    local p = io.popen(("curl -s --cacert %s/cert.pem -D - -o /dev/null %s/login"):format(dir, tls_url))
    local headers = p:read("a")
    p:close()
    os.execute("kill " .. tls.pid)
    assert.truthy(headers:find("Set%-Cookie: rb_login=%x+;[^\n]*; Secure"), headers)
    -- A run that logs a person's token (it does not know it is one): the console does.
    local start = cjson.encode { runbook = dir .. "/writer.lua", params = { note = ALICE, out = dir .. "/tok-out" } }
    local status, _, body = http("POST", "/v1/runs", { bearer = TOKEN, json = start })
    assert.are.equal(202, status, body)
    local run = cjson.decode(body).run_id
    local jar = login(VICTOR)
    local page = wait_until(60, function()
      local _, _, pg = http("GET", "/runs/" .. run, { jar = jar })
      return pg:find("s-ok", 1, true) and pg
    end)
    assert.truthy(page, "the run did not end ok")
    assert.is_nil(page:find(ALICE, 1, true))
    assert.truthy(page:find("note: ***", 1, true), page)
  end)

  it("resumes a failed run for an approver, not for a viewer", function()
    local ready = dir .. "/ready-" .. math.random(1e9)
    local status, _, body = http("POST", "/v1/runs", { bearer = TOKEN,
      json = cjson.encode { runbook = dir .. "/flaky.lua", params = { ready = ready } } })
    assert.are.equal(202, status, body)
    local run = cjson.decode(body).run_id
    local viewer, jar = login(VICTOR), login(ALICE)
    local page = wait_until(60, function()
      local _, _, pg = http("GET", "/runs/" .. run, { jar = jar })
      return pg:find("s-failed", 1, true) and pg
    end)
    assert.truthy(page, "the run did not fail")
    assert.truthy(page:find("runbook resume " .. run, 1, true))
    local csrf = page:match('name="csrf" value="(%x+)"')
    local _, _, seen = http("GET", "/runs/" .. run, { jar = viewer })
    assert.is_nil(seen:find('action="/runs/' .. run .. '/resume"', 1, true))
    local theirs = csrf_of(viewer, "/")
    assert.are.equal(403, (http("POST", "/runs/" .. run .. "/resume", { jar = viewer, form = { csrf = theirs } })))
    cli.write(ready, "")
    assert.are.equal(303, (http("POST", "/runs/" .. run .. "/resume", { jar = jar, form = { csrf = csrf } })))
    assert.truthy(wait_until(60, function()
      local _, _, pg = http("GET", "/runs/" .. run, { jar = jar })
      return pg:find('<tr><th>Status</th><td><span class="status s-ok">', 1, true)
    end), "the resumed run did not end ok")
  end)

  it("refuses a POST without the session's CSRF token", function()
    local id = plan_by("carol", "csrf")
    local jar, other = login(ALICE), login(ALICE)
    local path = "/plans/" .. id .. "/approve"
    assert.are.equal(403, (http("POST", path, { jar = jar, form = { comment = "forged" } })))
    local theirs = csrf_of(other, "/")
    assert.are.equal(403, (http("POST", path, { jar = jar, form = { comment = "forged", csrf = theirs } })))
    assert.are.equal(403, (http("POST", path, { jar = jar, form = { comment = "forged", csrf = ("0"):rep(32) } })))
    assert.are.equal("", approvals(id))
    assert.are.equal(303, (http("POST", path, { jar = jar, form = { comment = "real", csrf = csrf_of(jar, "/") } })))
    assert.truthy(approvals(id):find('"by":"alice"', 1, true), approvals(id))
  end)

  it("lets a viewer see a plan but not approve it", function()
    local id = plan_by("carol", "viewer")
    local jar = login(VICTOR)
    local status, _, page = http("GET", "/plans/" .. id, { jar = jar })
    assert.are.equal(200, status)
    assert.truthy(page:find("carol", 1, true))
    assert.is_nil(page:find('action="/plans/' .. id .. '/approve"', 1, true))
    status = http("POST", "/plans/" .. id .. "/approve", { jar = jar, form = { csrf = csrf_of(jar, "/") } })
    assert.are.equal(403, status)
    assert.are.equal("", approvals(id))
  end)

  it("approves a plan with a comment, applies it, and denies another", function()
    local id = plan_by("carol", "approved in the console")
    local jar = login(ALICE)
    local status, _, page = http("GET", "/plans/" .. id, { jar = jar })
    assert.are.equal(200, status)
    assert.truthy(page:find("would", 1, true))
    assert.truthy(page:find("[write]", 1, true) or page:find("write", 1, true))
    local csrf = page:match('name="csrf" value="(%x+)"')
    status = http("POST", "/plans/" .. id .. "/approve",
      { jar = jar, form = { comment = "diff <b>ok</b>", csrf = csrf } })
    assert.are.equal(303, status)
    _, _, page = http("GET", "/plans/" .. id, { jar = jar })
    assert.truthy(page:find("diff &lt;b&gt;ok&lt;/b&gt;", 1, true), page)
    local h
    status, h = http("POST", "/plans/" .. id .. "/apply", { jar = jar, form = { csrf = csrf } })
    assert.are.equal(303, status)
    local run = h.location:match("^/runs/(%d+T%d+Z%-%x+)$")
    assert.truthy(run, h.location)
    assert.truthy(wait_until(60, function()
      local _, _, p = http("GET", "/runs/" .. run, { jar = jar })
      return p:find("s-ok", 1, true)
    end), "the apply did not end ok")
    -- Another plan denied: apply refuses it.
    local other = plan_by("carol", "denied in the console")
    status = http("POST", "/plans/" .. other .. "/deny", { jar = jar, form = { comment = "no", csrf = csrf } })
    assert.are.equal(303, status)
    assert.truthy(approvals(other):find('"denied":true', 1, true), approvals(other))
    assert.are.equal(78, cli.run({ "apply", other }, { RUNBOOK_USER = "carol" }).code)
    -- The requester's own approval is refused, as runbook approve refuses it.
    local own = plan_by("alice", "own")
    status, _, page = http("POST", "/plans/" .. own .. "/approve", { jar = jar, form = { csrf = csrf } })
    assert.are.equal(403, status)
    assert.truthy(page:find("alice requested plan", 1, true), page)
    assert.are.equal("", approvals(own))
  end)
end)
