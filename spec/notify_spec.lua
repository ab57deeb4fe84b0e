-- notify: Slack, webhooks and mail against local receivers (an HTTP server
-- that captures posts, spec/fixtures/http_server.py, and an SMTP receiver,
-- spec/fixtures/smtp_server.py), and the runbook-level hooks end to end.
local notify = require("notify")
local host = require("runbook.host")
local events = require("runbook.events")
local cjson = require("cjson")
local cli = require("spec.support.cli")

local dir, base, smtp, silent_smtp, mailbox, pids

local function captured()
  local out = {}
  for _, r in ipairs(require("http").get(base .. "/requests").json) do
    if r.path:match("^/capture/") or r.path:match("^/status/") or r.path:match("^/slow") then out[#out + 1] = r end
  end
  return out
end

local function mails()
  local out = {}
  for line in cli.slurp(mailbox):gmatch("[^\n]+") do out[#out + 1] = cjson.decode(line) end
  return out
end

local function header(mail, name)
  return mail.data:match("\r?\n?" .. name .. ": ([^\r\n]*)")
end

local logs
setup(function()
  dir = cli.tmpdir()
  mailbox = dir .. "/mailbox.jsonl"
  pids = {}
  local port
  port, pids[1] = cli.fixture("http_server.py")
  base = "http://127.0.0.1:" .. port
  port, pids[2] = cli.fixture("smtp_server.py", mailbox)
  smtp = "smtp://127.0.0.1:" .. port
  port, pids[3] = cli.fixture("smtp_server.py", dir .. "/unused", "silent")
  silent_smtp = "smtp://127.0.0.1:" .. port
end)

teardown(function()
  for _, pid in ipairs(pids or {}) do os.execute("kill " .. pid) end
  cli.cleanup()
end)

local effects
before_each(function()
  logs, effects = {}, {}
  os.execute("curl -s " .. base .. "/requests >/dev/null") -- the server is up
  events.reset()
  events.add_sink(function(e) if e.event == "log" then logs[#logs + 1] = e end end)
  host.set_effect_sink(function(e) effects[#effects + 1] = e end)
end)

after_each(function()
  events.reset()
  host.set_effect_sink(nil)
  host.set_mode("run")
end)

describe("notify.slack", function()
  it("posts the message to the webhook, which never prints", function()
    local hook = base .. "/capture/services/T000/B000/xoxb-s3cret-path"
    local n = #captured()
    local res = notify.slack{ webhook = hook, text = "backend is down", channel = "#incidents",
      blocks = { { type = "section", text = { type = "mrkdwn", text = "*down*" } } } }
    assert.are.same({ true, 200 }, { res.ok, res.status })
    local got = captured()[n + 1]
    assert.are.equal("POST", got.method)
    assert.are.equal("application/json", got.headers["content-type"])
    local body = cjson.decode(got.body)
    assert.are.same({ "backend is down", "#incidents", "*down*" }, { body.text, body.channel, body.blocks[1].text.text })
    assert.are.equal(base .. "/***", host.redact(hook))   -- the path is the credential; the host still shows
    assert.are.equal("/***", host.redact("/capture/services/T000/B000/xoxb-s3cret-path"))
    assert.are.same({ "notify", "slack", "#incidents", "post to #incidents: backend is down", "performed" },
      { effects[1].module, effects[1].op, effects[1].target, effects[1].summary, effects[1].decision })
  end)

  it("logs a rejected post and returns it; fatal raises it", function()
    local res = notify.slack{ webhook = base .. "/status/404", text = "x" }
    assert.is_false(res.ok)
    assert.are.same({ "notify", "404", 404 }, { res.error.module, res.error.code, res.error.status })
    assert.are.equal(1, #logs)
    assert.are.equal("error", logs[1].level)
    assert.matches("notify.slack failed: .*HTTP 404", logs[1].message)
    local ok, err = pcall(notify.slack, { webhook = base .. "/status/500", text = "x", fatal = true })
    assert.is_false(ok)
    assert.are.same({ "500", true }, { err.code, err.retryable })
  end)

  it("rejects misuse whether or not it is fatal", function()
    assert.has_error(function() notify.slack{ text = "no webhook" } end)
    assert.has_error(function() notify.slack{ webhook = base } end)
    assert.has_error(function() notify.slack{ webhook = base, text = "x", timeout = "soon" } end)
  end)
end)

describe("notify.webhook", function()
  it("posts a PagerDuty Events v2 event, its routing key kept secret", function()
    local n = #captured()
    local event = { routing_key = "R0UTING-k3y-secret", event_action = "trigger",
      payload = { summary = "consumer lag 120000 on task-events", severity = "critical", source = "runbook" } }
    assert.is_true(notify.webhook{ url = base .. "/capture/v2/enqueue", json = event }.ok)
    assert.are.same(event, cjson.decode(captured()[n + 1].body))
    assert.are.equal("***", host.redact("R0UTING-k3y-secret"))
    assert.are.equal("post to " .. base .. "/***: consumer lag 120000 on task-events", effects[1].summary)
  end)

  it("times out, and a refused connection is a logged failure", function()
    local t0 = host.now()
    local res = notify.webhook{ url = base .. "/slow?ms=3000", json = {}, timeout = "300ms" }
    assert.is_true(host.now() - t0 < 2)
    assert.are.same({ false, "timeout" }, { res.ok, res.error.code })
    res = notify.webhook{ url = "http://127.0.0.1:1/hook", json = {} }
    assert.are.same({ false, "couldnt_connect" }, { res.ok, res.error.code })
    assert.are.equal(2, #logs)
  end)
end)

describe("notify.email", function()
  it("delivers a mail over SMTP with the envelope and headers asked for", function()
    local n = #mails()
    local res = notify.email{ smtp_url = smtp, from = "runbook@example.com", to = { "oncall@example.com", "ops@example.com" },
      subject = "KAFKA LAG ALERT", body = "CRITICAL: lag is 120000 messages\n.a line starting with a dot\nend" }
    assert.is_true(res.ok)
    local m = mails()[n + 1]
    assert.are.same({ "runbook@example.com", { "oncall@example.com", "ops@example.com" } }, { m.from, m.to })
    assert.are.equal("KAFKA LAG ALERT", header(m, "Subject"))
    assert.are.equal("oncall@example.com, ops@example.com", header(m, "To"))
    assert.matches("\r\n\r\nCRITICAL: lag is 120000 messages\r\n.a line starting with a dot\r\nend", m.data, 1, true)
    assert.are.same({ "notify", "email", "oncall@example.com, ops@example.com", "mail oncall@example.com, ops@example.com: KAFKA LAG ALERT" },
      { effects[1].module, effects[1].op, effects[1].target, effects[1].summary })
  end)

  it("encodes a UTF-8 subject and logs in with a password that never prints", function()
    local n = #mails()
    local url = smtp:gsub("//", "//ops:smtp-pw-s3cret@")
    assert.is_true(notify.email{ smtp_url = url, from = "a@example.com", to = "b@example.com",
      subject = "Störung: backend", body = "x" }.ok)
    local m = mails()[n + 1]
    assert.are.equal("ops", m.auth)
    assert.are.equal("=?UTF-8?B?" .. notify.base64("Störung: backend") .. "?=", header(m, "Subject"))
    assert.are.equal("***", host.redact("smtp-pw-s3cret"))
    local bad = notify.email{ smtp_url = smtp, username = "ops", password = "wrong-password", from = "a@example.com",
      to = "b@example.com", subject = "s", body = "x" }
    assert.are.same({ false, "login_denied" }, { bad.ok, bad.error.code })
    assert.is_nil(tostring(bad.error):find("wrong-password", 1, true))
  end)

  it("reports a refused recipient and a server that never answers", function()
    local n = #mails()
    local res = notify.email{ smtp_url = smtp, from = "a@example.com", to = "nobody@reject.example", subject = "s", body = "x" }
    assert.is_false(res.ok)
    assert.are.equal("smtp", res.error.module)
    assert.matches("550", tostring(res.error))
    assert.are.equal(n, #mails())
    local t0 = host.now()
    res = notify.email{ smtp_url = silent_smtp, from = "a@example.com", to = "b@example.com", subject = "s", body = "x",
      timeout = "500ms" }
    assert.are.same({ false, "timeout" }, { res.ok, res.error.code })
    assert.is_true(host.now() - t0 < 2)
    assert.are.equal(2, #logs)
  end)

  it("rejects header injection and missing fields", function()
    local ok_opts = { smtp_url = smtp, from = "a@example.com", to = "b@example.com", subject = "s", body = "x" }
    for field, bad in pairs { subject = "s\r\nBcc: evil@example.com", from = "a@example.com\nX: y",
      to = { "b@example.com\r\nX: y" }, smtp_url = "http://mail" } do
      local o = {}
      for k, v in pairs(ok_opts) do o[k] = v end
      o[field] = bad
      assert.has_error(function() notify.email(o) end, nil, field)
    end
    assert.has_error(function() notify.email{ smtp_url = smtp, from = "a@example.com", subject = "s" } end)
  end)
end)

describe("notify in dry-run", function()
  it("sends nothing and says what it would send", function()
    local n, m = #captured(), #mails()
    host.set_mode("dry-run")
    assert.are.same({ skipped = true }, notify.slack{ webhook = base .. "/capture/slack", text = "x", channel = "#incidents" })
    assert.are.same({ skipped = true }, notify.webhook{ url = base .. "/capture/hook", json = { text = "y" } })
    assert.are.same({ skipped = true }, notify.email{ smtp_url = smtp, from = "a@example.com", to = "b@example.com",
      subject = "z", body = "z" })
    host.set_mode("run")
    assert.are.equal(n, #captured())
    assert.are.equal(m, #mails())
    local seen = {}
    for _, e in ipairs(effects) do seen[#seen + 1] = e.decision .. ": " .. e.summary end
    assert.are.same({ "skipped: post to #incidents: x", "skipped: post to " .. base .. "/***: y",
      "skipped: mail b@example.com: z" }, seen)
  end)
end)

describe("runbook notify hooks", function()
  local function runbook(fail, extra)
    return cli.runbook(([[
name = "hooked" description = "reports its end"
notify = {
  on_failure = {
    webhook = { url = %q },
    email = { smtp_url = %q, from = "runbook@example.com", to = "oncall@example.com" },
  },
  on_success = { slack = { webhook = %q, channel = "#ops" } },
}
%s
step "first" { run = function() end }
step "second" { run = function() if %s then error("the database is gone") end end }
]]):format(base .. "/capture/hook", smtp, base .. "/capture/slack", extra or "", tostring(fail)))
  end

  local function run_id(stdout)
    return cli.only(cli.events(stdout), "run_start")[1].run_id
  end

  it("reports a failed run by webhook and mail, with the run id and the report command", function()
    local n, m = #captured(), #mails()
    local r = cli.run({ "run", runbook(true), "--output", "json" }, { RUNBOOK_STATE_DIR = cli.tmpdir() })
    assert.are.equal(1, r.code, r.stderr)
    local id = run_id(r.stdout)
    local posts = captured()
    assert.are.equal(n + 1, #posts)
    local ev = cjson.decode(posts[n + 1].body)
    assert.are.same({ "runbook.failed", "hooked", id, "failed", "second", "runbook report " .. id },
      { ev.event, ev.runbook, ev.run_id, ev.status, ev.step, ev.report })
    assert.matches("the database is gone", ev.error, 1, true)
    assert.matches("runbook hooked failed at step 'second'", ev.text, 1, true)
    local mail = mails()[m + 1]
    assert.are.equal("[runbook] hooked failed", header(mail, "Subject"))
    assert.matches("run " .. id .. "; details: runbook report " .. id, mail.data, 1, true)
    -- the run's own end comes after the notifications
    local all = cli.events(r.stdout)
    assert.are.equal("run_end", all[#all].event)
  end)

  it("reports a successful run to Slack", function()
    local n = #captured()
    local r = cli.run({ "run", runbook(false), "--output", "json" }, { RUNBOOK_STATE_DIR = cli.tmpdir() })
    assert.are.equal(0, r.code, r.stderr)
    local id = run_id(r.stdout)
    local body = cjson.decode(captured()[n + 1].body)
    assert.are.equal("#ops", body.channel)
    assert.matches("^runbook hooked succeeded %(2 steps in .-%)\nrun " .. id:gsub("%-", "%%-") .. "; details: runbook report ", body.text)
  end)

  it("sends nothing in a dry run, and shows what it would send", function()
    local n, m = #captured(), #mails()
    local r = cli.run({ "run", runbook(true), "--dry-run" }, { RUNBOOK_STATE_DIR = cli.tmpdir() })
    assert.are.equal(1, r.code, r.stderr)
    assert.are.same({ n, m }, { #captured(), #mails() })
    assert.matches("would post to " .. base .. "/***: runbook hooked failed", r.stdout, 1, true)
    assert.matches("would mail oncall@example.com: [runbook] hooked failed", r.stdout, 1, true)
  end)

  it("logs a notification that cannot be delivered without changing the exit status", function()
    local src = cli.slurp(runbook(false)):gsub(base:gsub("%p", "%%%0") .. "/capture/slack", "http://127.0.0.1:1/slack")
    local r = cli.run({ "run", cli.runbook(src), "--output", "json" }, { RUNBOOK_STATE_DIR = cli.tmpdir() })
    assert.are.equal(0, r.code, r.stderr)
    local errors = {}
    for _, e in ipairs(cli.only(cli.events(r.stdout), "log")) do
      if e.level == "error" then errors[#errors + 1] = e.message end
    end
    assert.are.equal(1, #errors)
    assert.matches("notify.slack failed: .*couldnt_connect", errors[1])
  end)

  it("refuses to load a runbook with a malformed notify field", function()
    for _, bad in ipairs { 'notify = { on_falure = {} }', 'notify = { on_failure = { pager = {} } }',
      'notify = { on_failure = { slack = { text = "x" } } }', 'notify = { on_success = "yes" }' } do
      local r = cli.run({ "lint", cli.runbook('name = "x" description = "y"\n' .. bad .. '\nstep "s" { run = function() end }') })
      assert.are.equal(3, r.code, bad)
      assert.matches("notify", r.stderr, 1, true)
    end
  end)
end)
