--- notify: tell people what a runbook did, through Slack, a webhook or mail.
--
--   notify.slack{webhook=, text=, blocks=, channel=, username=, icon_emoji=}
--   notify.webhook{url=, json= or body=, headers=, method="POST"}   (e.g. PagerDuty Events API v2)
--   notify.email{smtp_url=, from=, to= (address or list), subject=, body=,
--                username=, password=, starttls="try"|"required"}
--   Every one also takes timeout (default "10s", bounded by the step), connect_timeout
--   (default "10s") and fatal.
--   -> {ok=true} | {skipped=true} (dry run) | {ok=false, error=err} (failed, logged)
--
-- Every send goes through the effect gate ("would post to #incidents: ...").
-- A notification that fails is logged as an error and returned, so a report
-- that cannot be delivered does not stop the procedure; fatal=true raises it
-- instead. A Slack webhook URL, a password and a PagerDuty routing_key are
-- secrets and never print.
--
-- Runbook-level hooks, sent when the run ends (see M.check_hooks):
--   notify = { on_failure = { slack = {webhook=...}, email = {...}, webhook = {...} },
--              on_success = function(run) ... end }
local host = require("runbook.host")
local duration = require("duration")

local M = {}

local function native() return require("runbook.http") end

local function check_string(v, what, op, level)
  if type(v) ~= "string" or v == "" then
    error(("notify.%s: %s is required (a non-empty string)"):format(op, what), level or 3)
  end
  return v
end

-- {timeout, connect_timeout} as the http module takes them.
local function timeouts_of(opts, op)
  return { timeout = duration.check(opts.timeout or "10s", "notify." .. op .. " timeout"),
    connect_timeout = opts.connect_timeout and duration.check(opts.connect_timeout, "notify." .. op .. " connect_timeout") }
end

local function one_line(s, max)
  s = tostring(s):gsub("%s+", " ")
  if #s > max then s = s:sub(1, max - 3) .. "..." end
  return s
end

--- Runs send(); a failure is logged and returned unless fatal.
local function deliver(op, opts, send)
  local ok, res = pcall(send)
  if ok then return res end
  host.check_deadline() -- a timed-out step or Ctrl-C is not a failed notification
  if opts.fatal then error(res, 0) end
  require("log").error("notify.%s failed: %s", op, tostring(res))
  return { ok = false, error = res }
end

local raise = host.raiser "notify"

local function post(op, url, body, headers, effect, timeouts, method)
  local h = { ["Content-Type"] = "application/json" }
  for k, v in pairs(headers or {}) do h[k] = v end
  local r = native().request { method = method or "POST", url = url, body = body, headers = h,
    timeout = timeouts.timeout, connect_timeout = timeouts.connect_timeout, effect = effect }
  if r.skipped then return r end
  if r.status >= 300 then
    raise { op = op, code = tostring(r.status), retryable = r.status >= 500 or r.status == 429, status = r.status,
      message = ("%s answered HTTP %d: %s"):format(effect.target, r.status, one_line(r.body, 200)) }
  end
  return { ok = true, status = r.status }
end

-- A webhook URL's credential is its path (Slack's /services/T../B../X..,
-- a token in the query) and any password: the scheme and host still print,
-- so an operator sees where a notification goes. A URL with no such path is
-- registered whole.
local function register_url(url)
  local path = url:match("^%a[%w+.-]*://[^/?#]+/(.+)$")
  if path and #path >= 8 then host.secret(path) else host.secret(url) end
  local password = url:match("^%a[%w+.-]*://[^/@]-:([^/@]*)@")
  if password then host.secret(password) end
end

function M.slack(opts)
  if type(opts) ~= "table" then error("notify.slack expects a table {webhook=, text=}", 2) end
  check_string(opts.webhook, "webhook", "slack")
  if opts.text == nil and opts.blocks == nil then error("notify.slack: give text or blocks", 2) end
  if opts.blocks ~= nil and type(opts.blocks) ~= "table" then error("notify.slack: blocks must be a list", 2) end
  local timeouts = timeouts_of(opts, "slack")
  register_url(opts.webhook)
  local payload = host.redact_value { text = opts.text and tostring(opts.text), blocks = opts.blocks,
    channel = opts.channel, username = opts.username, icon_emoji = opts.icon_emoji }
  local where = opts.channel or "Slack"
  return deliver("slack", opts, function()
    local body = require("cjson").encode(payload)
    return post("slack", opts.webhook, body, nil, { module = "notify", op = "slack", target = where,
      summary = ("post to %s: %s"):format(where, one_line(opts.text or "(blocks)", 120)) }, timeouts)
  end)
end

--- The line a dry run shows for a webhook: the event's own summary when it has one.
local function webhook_summary(json, body)
  if type(json) == "table" then
    local s = json.text or json.summary or (type(json.payload) == "table" and json.payload.summary)
    if s then return one_line(s, 120) end
  end
  return ("%d bytes"):format(#body)
end

function M.webhook(opts)
  if type(opts) ~= "table" then error("notify.webhook expects a table {url=, json=}", 2) end
  check_string(opts.url, "url", "webhook")
  if opts.json ~= nil and opts.body ~= nil then error("notify.webhook: give json or body, not both", 2) end
  if opts.body ~= nil and type(opts.body) ~= "string" then error("notify.webhook: body must be a string", 2) end
  local method = (opts.method or "POST"):upper()
  if method == "GET" or method == "HEAD" then error("notify.webhook: method must be one that sends (POST, PUT)", 2) end
  local timeouts = timeouts_of(opts, "webhook")
  register_url(opts.url)
  -- the body is redacted, but for the credential the receiver needs in it
  local json = opts.json == nil and {} or host.redact_value(opts.json)
  if type(opts.json) == "table" then
    for _, k in ipairs { "routing_key", "token", "api_key" } do
      if type(opts.json[k]) == "string" then json[k] = opts.json[k]; host.secret(opts.json[k]) end
    end
  end
  local body = opts.body and host.redact(opts.body) or require("cjson").encode(json)
  local headers = opts.headers
  if opts.body ~= nil and not opts.headers then headers = { ["Content-Type"] = "text/plain" } end
  local target = host.redact(opts.url)
  return deliver("webhook", opts, function()
    return post("webhook", opts.url, body, headers, { module = "notify", op = "webhook", target = target,
      summary = ("post to %s: %s"):format(target, webhook_summary(opts.json, body)) }, timeouts, method)
  end)
end

-- ---- email ------------------------------------------------------------------

local function header_safe(v, what)
  v = tostring(v)
  if v:find("[\r\n]") then error(("notify.email: %s cannot contain a line break"):format(what), 4) end
  return v
end

local base64 = require("base64").encode
M.base64 = base64

--- A header value: as it is when ASCII, else RFC 2047 base64 UTF-8.
local function encode_word(s)
  if not s:find("[\128-\255]") then return s end
  return "=?UTF-8?B?" .. base64(s) .. "?="
end

local function message_id(from)
  local f = io.open("/dev/urandom", "rb")
  local bytes = f and f:read(8) or tostring(host.now())
  if f then f:close() end
  return ("<%s@%s>"):format(bytes:gsub(".", function(c) return ("%02x"):format(c:byte()) end),
    from:match("@([%w%.%-]+)$") or "runbook")
end

local function build_message(opts, to)
  local lines = {
    "From: " .. header_safe(opts.from, "from"),
    "To: " .. table.concat(to, ", "),
    "Subject: " .. encode_word(header_safe(opts.subject or "", "subject")),
    "Date: " .. os.date("!%a, %d %b %Y %H:%M:%S +0000"),
    "Message-ID: " .. message_id(opts.from),
    "MIME-Version: 1.0",
    "Content-Type: text/plain; charset=utf-8",
    "Content-Transfer-Encoding: 8bit",
    "X-Mailer: runbook",
    "",
  }
  local body = tostring(opts.body or ""):gsub("\r\n", "\n"):gsub("\n", "\r\n")
  return table.concat(lines, "\r\n") .. "\r\n" .. body .. (body:sub(-2) == "\r\n" and "" or "\r\n")
end

function M.email(opts)
  if type(opts) ~= "table" then error("notify.email expects a table {smtp_url=, from=, to=, subject=, body=}", 2) end
  check_string(opts.smtp_url, "smtp_url", "email")
  if not opts.smtp_url:match("^smtps?://") then error("notify.email: smtp_url must start with smtp:// or smtps://", 2) end
  check_string(opts.from, "from", "email")
  local to = type(opts.to) == "string" and { opts.to } or opts.to
  if type(to) ~= "table" or #to == 0 then error("notify.email: to is required (an address or a list)", 2) end
  for _, a in ipairs(to) do check_string(a, "each address in to", "email"); header_safe(a, "to") end
  header_safe(opts.from, "from")
  local timeouts = timeouts_of(opts, "email")
  if opts.password then host.secret(tostring(opts.password)) end
  local message = host.redact(build_message(opts, to))
  local rcpt = table.concat(to, ", ")
  return deliver("email", opts, function()
    return native().smtp_send { url = opts.smtp_url, from = opts.from, to = to, message = message,
      username = opts.username, password = opts.password, starttls = opts.starttls,
      timeout = timeouts.timeout, connect_timeout = timeouts.connect_timeout,
      cafile = opts.cafile, insecure = opts.insecure,
      effect = { module = "notify", op = "email", target = rcpt,
        summary = ("mail %s: %s"):format(rcpt, one_line(opts.subject or "(no subject)", 120)) } }
  end)
end

-- ---- runbook-level hooks ----------------------------------------------------

local CHANNELS = {
  slack = { "webhook" },
  webhook = { "url" },
  email = { "smtp_url", "from", "to" },
}
local HOOKS = { on_failure = true, on_success = true }

--- Checks a runbook's `notify` field when it loads; raises a message naming what is wrong.
function M.check_hooks(t)
  for k, hook in pairs(t) do
    if not HOOKS[k] then error(("notify: unknown field '%s' (known: on_failure, on_success)"):format(tostring(k)), 0) end
    if type(hook) == "table" then
      for ch, o in pairs(hook) do
        local need = CHANNELS[ch]
        if not need then
          error(("notify.%s: unknown channel '%s' (known: email, slack, webhook)"):format(k, tostring(ch)), 0)
        end
        if type(o) ~= "table" then error(("notify.%s.%s must be a table of options"):format(k, ch), 0) end
        for _, f in ipairs(need) do
          if o[f] == nil then error(("notify.%s.%s: %s is required"):format(k, ch, f), 0) end
        end
        -- registered as the runbook loads, before any step can print them
        local url = o.webhook or o.url
        if type(url) == "string" then register_url(url) end
        if type(o.password) == "string" then host.secret(o.password) end
      end
    elseif type(hook) ~= "function" then
      error(("notify.%s must be a table {slack=..., email=..., webhook=...} or a function(run)"):format(k), 0)
    end
  end
end

--- The text of a run-end notification.
function M.run_message(run)
  local head
  if run.status == "ok" then
    head = ("runbook %s succeeded (%d steps in %s)"):format(run.runbook, run.ok or 0, duration.format(run.duration or 0))
  else
    head = ("runbook %s %s"):format(run.runbook, run.status)
    if run.step then head = head .. (" at step '%s'"):format(run.step) end
    if run.error then head = head .. ": " .. tostring(run.error) end
  end
  return ("%s%s\nrun %s; details: runbook report %s"):format(head, run.dry_run and " (dry run)" or "",
    run.run_id, run.run_id)
end

local function copy(t)
  local c = {}
  for k, v in pairs(t) do c[k] = v end
  return c
end

--- Sends the hook for how the run ended (on_success for "ok", on_failure for
-- "failed" and "interrupted"). run: {runbook, run_id, status, step, error,
-- duration, ok, dry_run}. Never raises: failures are logged.
function M.run_hooks(hooks, run)
  local hook = run.status == "ok" and hooks.on_success or
    (run.status == "failed" or run.status == "interrupted") and hooks.on_failure
  if not hook then return end
  -- After Ctrl-C or SIGTERM the report still goes out; another signal stops it.
  if host.interrupted() then host.clear_interrupt() end
  run.text, run.report = M.run_message(run), "runbook report " .. run.run_id
  if type(hook) == "function" then
    local ok, err = pcall(hook, run)
    if not ok then require("log").error("notify hook failed: %s", tostring(err)) end
    return
  end
  local subject = ("[runbook] %s %s"):format(run.runbook, run.status == "ok" and "succeeded" or run.status)
  for _, ch in ipairs { "slack", "webhook", "email" } do
    local o = hook[ch]
    if o then
      o = copy(o)
      o.fatal, o.timeout = false, o.timeout or "10s"
      if ch == "slack" then o.text = o.text or run.text end
      if ch == "webhook" and o.json == nil and o.body == nil then
        o.json = { event = "runbook." .. run.status, runbook = run.runbook, run_id = run.run_id, status = run.status,
          step = run.step, error = run.error and tostring(run.error), text = run.text, report = run.report,
          dry_run = run.dry_run or nil }
      end
      if ch == "email" then o.subject, o.body = o.subject or subject, o.body or run.text end
      local ok, err = pcall(M[ch], o)
      if not ok then require("log").error("notify.%s hook failed: %s", ch, tostring(err)) end
    end
  end
end

return M
