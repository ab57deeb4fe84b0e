--- serve's console: HTML pages for people over the JSON API's own code paths
-- (docs/design.md, "The run console"). The runs list is Server:list_runs, a
-- run's live view the same Server-Sent Events stream as /v1/runs/ID/events,
-- approve and deny Server:decide, apply a child of Server:spawn; a run's page
-- is drawn with the HTML report's pieces (report.lua). A login with a token
-- (serve's, or a person's from --users) opens a session held in serve's
-- memory: an HttpOnly, SameSite=Strict cookie, and a CSRF token every POST
-- carries. Pages are plain HTML under a strict Content-Security-Policy: one
-- style sheet and one script, both files; every text passes esc().
local cjson = require("cjson")
local host = require("runbook.host")
local journal = require("runbook.journal")
local plan = require("runbook.plan")
local report = require("runbook.report")
local assets = require("runbook.console_assets")

local H = report.html
local esc, stamp, dur = H.esc, H.stamp, H.dur

local M = {}

M.SESSION_TTL = 12 * 3600   -- seconds a login holds
M.MAX_SESSIONS = 10000
M.PAGE_ROWS = 50            -- runs on the list
local ROLES = { viewer = true, approver = true }
local NAME = "^[%w._@%-]+$"

local CSP = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
  .. "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"

--- The people of a --users file: one "NAME ROLE TOKEN" a line (# comments),
-- ROLE viewer or approver, tokens of at least 16 characters. Returns them,
-- or nil and "PATH:LINE: message".
function M.load_users(path, text)
  local users, n = {}, 0
  for line in (text .. "\n"):gmatch("([^\n]*)\n") do
    n = n + 1
    if not line:match("^%s*#") and line:match("%S") then
      local name, role, token = line:match("^%s*(%S+)%s+(%S+)%s+(%S+)%s*$")
      local why = not name and "expected NAME ROLE TOKEN"
        or not name:match(NAME) and "the name takes letters, digits, . _ @ -"
        or not ROLES[role] and ("role '%s': expected viewer or approver"):format(role)
        or #token < 16 and "the token needs at least 16 characters"
      if why then return nil, ("%s:%d: %s"):format(path, n, why) end
      host.secret(token)
      users[#users + 1] = { name = name, role = role, token = token }
    end
  end
  return users
end

-- ---- requests -------------------------------------------------------------------

local function unescape(s)
  return (s:gsub("+", " "):gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end))
end

--- An application/x-www-form-urlencoded body as a table (the first of a repeated name).
local function form(body)
  local t = {}
  for pair in (body or ""):gmatch("[^&]+") do
    local k, v = pair:match("^([^=]*)=?(.*)$")
    k = unescape(k)
    if t[k] == nil then t[k] = unescape(v) end
  end
  return t
end

local function cookies(header)
  local t = {}
  for k, v in (header or ""):gmatch("([%w_]+)=([%w]+)") do t[k] = t[k] or v end
  return t
end

-- ---- the console ----------------------------------------------------------------

local Console = {}
Console.__index = Console

--- The console of `server` (serve.lua's): o = {users, secure (TLS)}.
function M.new(server, o)
  return setmetatable({ server = server, users = o.users or {}, secure = o.secure, sessions = {}, nsessions = 0 },
    Console)
end

--- The response headers every page has, with `extra`.
function Console:headers(extra)
  local h = { ["Content-Security-Policy"] = CSP, ["X-Content-Type-Options"] = "nosniff",
    ["Referrer-Policy"] = "no-referrer", ["X-Frame-Options"] = "DENY", ["Cache-Control"] = "no-store" }
  for k, v in pairs(extra or {}) do h[k] = v end
  return h
end

function Console:cookie(name, value, ttl)
  return ("%s=%s; Path=/; Max-Age=%d; HttpOnly; SameSite=Strict%s"):format(name, value, ttl,
    self.secure and "; Secure" or "")
end

local function redirect(self, to, extra)
  local h = self:headers(extra)
  h.Location = to
  return 303, "", "text/plain", h
end

--- The session a request's cookie names, or nil.
function Console:session(req)
  local id = cookies(req.cookie).rb_session
  local s = id and self.sessions[id]
  if s and s.expires < host.now() then self.sessions[id], self.nsessions, s = nil, self.nsessions - 1, nil end
  return s, id
end

function Console:open_session(user, role)
  if self.nsessions >= M.MAX_SESSIONS then
    local now = host.now()
    for id, s in pairs(self.sessions) do
      if s.expires < now then self.sessions[id], self.nsessions = nil, self.nsessions - 1 end
    end
    if self.nsessions >= M.MAX_SESSIONS then return nil end
  end
  local id = plan.random_hex(16)
  self.sessions[id] = { user = user, role = role, csrf = plan.random_hex(16), expires = host.now() + M.SESSION_TTL }
  self.nsessions = self.nsessions + 1
  return id
end

--- Who a login token is: name and role, or nil. The serve token is an approver who names themself.
function Console:who(token, name)
  local equal, found = require("runbook.httpd").equal, nil
  for _, u in ipairs(self.users) do   -- every one compared, in constant time each
    if equal(token, u.token) and not found then found = u end
  end
  if found then return found.name, found.role end
  if equal(token, self.server.token) then return name, "approver", true end
end

-- ---- pages ------------------------------------------------------------------------

local function page(title, session, body)
  local out = { '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">',
    '<meta name="viewport" content="width=device-width, initial-scale=1">',
    ("<title>%s · runbook</title>"):format(esc(title)),
    '<link rel="stylesheet" href="/static/console.css">',
    '<script src="/static/console.js" defer></script>\n</head>\n<body>',
    '<header><nav><a href="/" class="home">runbook</a>' }
  if session then
    out[#out + 1] = ('<span class="who">%s (%s)</span><form method="post" action="/logout" class="inline">'
      .. '<input type="hidden" name="csrf" value="%s"><button>Log out</button></form>'):format(esc(session.user),
      esc(session.role), esc(session.csrf))
  end
  out[#out + 1] = "</nav></header>\n<main>"
  out[#out + 1] = body
  out[#out + 1] = "</main>\n</body>\n</html>\n"
  return host.redact(table.concat(out, "\n"))
end

local function html(self, status, title, session, body, extra)
  return status, page(title, session, body), "text/html; charset=utf-8", self:headers(extra)
end

local function builder()
  local out = {}
  return out, function(fmt, ...) out[#out + 1] = select("#", ...) > 0 and fmt:format(...) or fmt end
end

function Console:login_page(status, message, csrf)
  local out, add = builder()
  add("<h1>Log in</h1>")
  if message then add('<p class="error">%s</p>', esc(message)) end
  add('<form method="post" action="/login" class="login">')
  add('<input type="hidden" name="csrf" value="%s">', esc(csrf))
  add('<label>Token <input type="password" name="token" autocomplete="current-password" required></label>')
  add('<label>Your name <input type="text" name="name" autocomplete="username"></label>')
  add('<p class="facts">Your own token (from the --users file) knows your name; with serve\'s token, give it.</p>')
  add("<button>Log in</button></form>")
  return html(self, status, "Log in", nil, table.concat(out, "\n"),
    { ["Set-Cookie"] = self:cookie("rb_login", csrf, 3600) })
end

--- POST /login: a token (and a name with serve's), with the login page's CSRF token.
function Console:login(req)
  local f, pre = form(req.body), cookies(req.cookie).rb_login
  local equal = require("runbook.httpd").equal
  if not (pre and f.csrf and equal(f.csrf, pre)) then
    return html(self, 403, "Log in", nil, '<p class="error">The login form expired: <a href="/login">log in</a> '
      .. "again.</p>")
  end
  local name, role, shared = self:who(f.token or "", f.name ~= "" and f.name or nil)
  if not role then return self:login_page(401, "A wrong token.", pre) end
  if shared and not (name and name:match(NAME)) then
    return self:login_page(400, "With serve's token, give your name (letters, digits, . _ @ -).", pre)
  end
  local id = self:open_session(name, role)
  if not id then return self:login_page(503, "Too many sessions open; try again later.", pre) end
  return redirect(self, "/", { ["Set-Cookie"] = self:cookie("rb_session", id, M.SESSION_TTL) })
end

-- ---- the runs list ----------------------------------------------------------------

--- Who or what started a run: its origin as serve noted it, else the journal's user.
local function started_by(row, origin)
  if origin and origin.alert then
    local labels = {}
    for k, v in pairs(origin.labels or {}) do
      if k ~= "alertname" then labels[#labels + 1] = ("%s=%s"):format(k, tostring(v)) end
    end
    table.sort(labels)
    return ('alert <b>%s</b> <span class="labels">{%s}</span>'):format(esc(origin.alert),
      esc(table.concat(labels, ", ")))
  end
  if origin and origin.plan then
    return ('%s, applying <a href="/plans/%s">plan</a>'):format(esc(origin.by), esc(origin.plan))
  end
  if origin and origin.by then return ("%s (API)"):format(esc(origin.by)) end
  local who = esc(("%s@%s"):format(row.user or "?", row.host or "?"))
  return row.unattended and ("cron or script, " .. who) or who
end

local function mode_text(mode)
  return mode == "dry-run" and '<span class="dry">dry run</span>' or esc(mode == "run" and "real" or mode)
end

--- The rows the filters keep (runbook, status, alert), newest first, at most M.PAGE_ROWS.
function Console:runs(q)
  local origins = self.server.origins
  local function given(k) return (q[k] or "") ~= "" and q[k] or nil end
  local alert = given "alert"
  local _, doc = self.server:list_runs({ runbook = given "runbook", status = given "status",
    limit = tostring(M.PAGE_ROWS) }, alert and function(id) return (origins[id] or {}).alert == alert end)
  local rows = {}
  for i, row in ipairs(doc.runs or {}) do rows[i] = { row = row, origin = origins[row.run_id] } end
  return rows
end

function Console:runs_table(q)
  local out, add = builder()
  local rows = self:runs(q)
  if #rows == 0 then add('<p class="none">No runs%s.</p>', next(q) and " match" or " yet"); return table.concat(out) end
  add('<table class="runs"><thead><tr><th>Run</th><th>Runbook</th><th>Status</th><th>Started by</th><th>Started</th>'
    .. "<th>Duration</th><th>Mode</th></tr></thead><tbody>")
  for _, r in ipairs(rows) do
    local row = r.row
    add('<tr><td><a href="/runs/%s">%s</a></td><td>%s</td><td>%s</td><td>%s</td><td>%s</td><td>%s</td><td>%s</td></tr>',
      esc(row.run_id), esc(row.run_id), esc(row.runbook), H.badge(row.status), started_by(row, r.origin),
      esc(stamp(row.started)), esc(dur(row.duration)), mode_text(row.mode))
  end
  add("</tbody></table>")
  return table.concat(out, "\n")
end

--- Plans that wait for approval, newest first.
function Console:pending()
  local lfs, out = require("lfs"), {}
  local dir = plan.dir()
  if lfs.attributes(dir, "mode") ~= "directory" then return out end
  for f in lfs.dir(dir) do
    local p = f:match("^(.+)%.json$") and plan.read(dir .. "/" .. f)
    if p and plan.pending(p) then out[#out + 1] = p end
  end
  table.sort(out, function(a, b) return a.id > b.id end)
  return out
end

local STATUSES = { "", "running", "ok", "failed", "interrupted", "aborted", "killed", "locked" }

function Console:runs_page(req, session)
  local q = req.query or {}
  local out, add = builder()
  local plans = self:pending()
  if #plans > 0 then
    add("<h2>Plans waiting for approval</h2><ul class=\"plans\">")
    for _, p in ipairs(plans) do
      add('<li><a href="/plans/%s">%s</a>: %s, requested by %s at %s</li>', esc(p.id), esc(p.id), esc(p.runbook.name),
        esc(p.requested_by.user), esc(stamp(p.created_at)))
    end
    add("</ul>")
  end
  add("<h1>Runs</h1>")
  add('<form method="get" action="/" class="filters">')
  add('<label>Runbook <input name="runbook" value="%s"></label>', esc(q.runbook))
  add('<label>Status <select name="status">')
  for _, s in ipairs(STATUSES) do
    add('<option value="%s"%s>%s</option>', s, q.status == s and " selected" or "", s == "" and "any" or s)
  end
  add("</select></label>")
  add('<label>Alert <input name="alert" value="%s"></label>', esc(q.alert))
  add("<button>Filter</button></form>")
  add('<div id="live" data-events="/live/runs/events" data-fragment="/live/runs">')
  add("%s", self:runs_table(q))
  add("</div>")
  return html(self, 200, "Runs", session, table.concat(out, "\n"))
end

--- A stream that says "changed" when the newest runs' journals do (a new run,
-- a line written): the list's script then fetches the table again.
function Console:runs_changes()
  local lfs, last, at = require("lfs"), nil, 0
  return function()
    if host.now() - at < 0.5 then return "" end
    at = host.now()
    local sig = { tostring(lfs.attributes(journal.runs_dir(), "modification")) }
    for i, id in ipairs(journal.list()) do
      if i > M.PAGE_ROWS then break end
      sig[#sig + 1] = tostring(lfs.attributes(journal.path(id), "size"))
    end
    sig = table.concat(sig, " ")
    if sig == last then return "" end
    local first = last == nil
    last = sig
    return first and ": watching\n\n" or "data: changed\n\n"
  end
end

-- ---- a run ----------------------------------------------------------------------

local RESUMABLE = { failed = true, interrupted = true, killed = true, aborted = true }

--- The live part of a run's page, as `session` sees it: summary, timeline, steps.
function Console:run_body(id, session)
  local out, add = builder()
  local doc = report.document(id)
  if not doc then
    add('<p>Run <code>%s</code> is starting: its journal is not written yet.</p>', esc(id))
    return table.concat(out, "\n"), true
  end
  local origin = self.server.origins[id]
  add('<table class="summary">')
  add("<tr><th>Status</th><td>%s%s</td></tr>", H.badge(doc.status),
    doc.exit_code and (" exit " .. esc(doc.exit_code)) or "")
  add("<tr><th>Mode</th><td>%s%s</td></tr>", mode_text(doc.mode),
    doc.mode == "dry-run" and ": nothing was changed" or "")
  add("<tr><th>Started by</th><td>%s</td></tr>", started_by({ user = doc.user, host = doc.host }, origin))
  add("<tr><th>Started</th><td>%s</td></tr><tr><th>Duration</th><td>%s</td></tr>", esc(stamp(doc.started)),
    esc(dur(doc.duration)))
  if RESUMABLE[doc.status] then
    add('<tr><th>Resume</th><td><code class="copy">runbook resume %s</code>', esc(id))
    if session.role == "approver" then
      add('<form method="post" action="/runs/%s/resume" class="inline"><input type="hidden" name="csrf" value="%s">'
        .. '<button class="approve">Resume</button></form>', esc(id), esc(session.csrf))
    end
    add("</td></tr>")
  end
  add("</table>")
  add("<h2>Timeline</h2>")
  if #doc.steps > 0 then H.timeline(doc, add) else add('<p class="none">No step has started.</p>') end
  add("<h2>Steps</h2>")
  for i, st in ipairs(doc.steps) do H.step(add, st, i) end
  return table.concat(out, "\n"), doc.status == "running"
end

function Console:run_page(id, session)
  local doc = journal.row(id)
  if not doc and not self.server.by_run[id] then
    return html(self, 404, "No run", session, ('<p class="error">No run %s.</p>'):format(esc(id)))
  end
  local body, live = self:run_body(id, session)
  local out, add = builder()
  add("<h1>Run <code>%s</code>%s</h1>", esc(id), doc and (": " .. esc(doc.start.runbook)) or "")
  if live then
    add('<div id="live" data-events="/runs/%s/events" data-fragment="/live/runs/%s">', esc(id), esc(id))
  else
    add('<div id="live">')
  end
  add("%s</div>", body)
  return html(self, 200, "Run " .. id, session, table.concat(out, "\n"))
end

-- ---- a plan ---------------------------------------------------------------------

local function plan_state(p)
  local valid = plan.valid_approvals(p)
  local denied = plan.denial(p)
  if denied then return "denied", valid end
  if #valid >= (p.approval.required or 0) then return "approved", valid end
  if not plan.pending(p) then return "cancelled", valid end
  return "pending", valid
end

local function verdict_row(add, p, a, valid)
  local counts = false
  for _, v in ipairs(valid) do counts = counts or (v.by == a.by and v.at == a.at) end
  local note = a.denied and "denied" or counts and ("approved, until " .. stamp(a.expires))
    or a.by == p.requested_by.user and "the requester's own: does not count"
    or (plan.parse_iso(a.expires) or 0) <= os.time() and "expired" or "does not count"
  add("<tr><td>%s</td><td>%s</td><td>%s</td><td>%s</td></tr>", esc(a.by), esc(stamp(a.at)), esc(note), esc(a.comment))
end

function Console:plan_page(id, session, message, status)
  local p, why = plan.read(id)
  if not p then
    return html(self, status or 404, "No plan", session, ('<p class="error">%s</p>'):format(esc(message or why)))
  end
  local state, valid = plan_state(p)
  local out, add = builder()
  add("<h1>Plan <code>%s</code>: %s</h1>", esc(p.id), esc(p.runbook.name))
  if message then add('<p class="error">%s</p>', esc(message)) end
  add('<table class="summary">')
  add('<tr><th>State</th><td><span class="status state-%s">%s</span></td></tr>', state, state)
  add("<tr><th>Requested</th><td>by <b>%s</b> on %s at %s</td></tr>", esc(p.requested_by.user),
    esc(p.requested_by.host), esc(stamp(p.created_at)))
  add("<tr><th>Runbook</th><td><code>%s</code> (sha256 <code>%s</code>)</td></tr>", esc(p.runbook.path),
    esc(p.runbook.sha256:sub(1, 12)))
  local t = p.target
  add("<tr><th>Kubernetes</th><td>%s</td></tr>", t and esc(("context %s, namespace %s (%s)"):format(t.context,
    t.namespace, t.server)) or "none")
  local keys = {}
  for k in pairs(p.params or {}) do keys[#keys + 1] = k end
  table.sort(keys)
  for i, k in ipairs(keys) do keys[i] = esc(k) .. "=<code>" .. esc(require("runbook.params").text(p.params[k])) .. "</code>" end
  add("<tr><th>Params</th><td>%s</td></tr>", #keys > 0 and table.concat(keys, ", ") or "none")
  add("<tr><th>Approvals</th><td>%d needed%s, %d valid</td></tr>", p.approval.required or 0,
    type(p.approval.by) == "table" and #p.approval.by > 0 and (" from " .. esc(table.concat(p.approval.by, ", ")))
    or "", #valid)
  add("<tr><th>Digest</th><td><code>%s</code></td></tr>", esc(p.digest))
  if p.alert then add("<tr><th>Alert</th><td><code>%s</code></td></tr>", esc(p.alert)) end
  add("</table>")
  add("<h2>Effects</h2>")
  if #p.effects == 0 then add('<p class="none">No effects: the run changes nothing.</p>') end
  local step
  for _, e in ipairs(p.effects) do
    if e.step ~= step then
      if step ~= nil then add("</ul></section>") end
      step = e.step
      add('<section class="step"><h3>%s</h3><ul class="effects">', esc(step or "outside any step"))
    end
    add("<li><b>would</b> %s <span class=\"facts\">(%s %s <code>%s</code>)</span>%s</li>", esc(e.outcome or e.summary),
      esc(e.module), esc(e.op), esc(e.target), e.result and ('<pre class="diff">' .. esc(e.result) .. "</pre>") or "")
  end
  if step ~= nil or #p.effects > 0 then add("</ul></section>") end
  add("<h2>Approvals</h2>")
  local verdicts = plan.verdicts(p)
  if #verdicts == 0 then add('<p class="none">None yet.</p>') else
    add('<table class="approvals"><tr><th>By</th><th>At</th><th></th><th>Comment</th></tr>')
    for _, a in ipairs(verdicts) do verdict_row(add, p, a, valid) end
    add("</table>")
  end
  if session.role == "approver" and state == "pending" then
    add('<form method="post" action="/plans/%s/approve" class="decide">', esc(p.id))
    add('<input type="hidden" name="csrf" value="%s">', esc(session.csrf))
    add('<label>Comment <textarea name="comment" rows="2"></textarea></label>')
    add('<button class="approve">Approve as %s</button> ', esc(session.user))
    add('<button class="deny" formaction="/plans/%s/deny">Deny</button></form>', esc(p.id))
    add('<p class="facts">Bound to the digest above; an approval holds for %s.</p>', esc(dur(plan.APPROVAL_TTL)))
  elseif session.role == "approver" and state == "approved" then
    add('<form method="post" action="/plans/%s/apply" class="decide">', esc(p.id))
    add('<input type="hidden" name="csrf" value="%s">', esc(session.csrf))
    add('<button class="approve">Apply</button></form>')
    add('<p class="facts">Or: <code class="copy">runbook apply %s</code> (a plan whose params hold secrets needs them '
      .. "given again there).</p>", esc(p.id))
  end
  return html(self, status or 200, "Plan " .. p.id, session, table.concat(out, "\n"))
end

--- POST /plans/ID/approve|deny: Server:decide as the session's person.
function Console:decide(id, verb, req, session)
  local f = form(req.body)
  local body = cjson.encode { by = session.user, comment = (f.comment or "") ~= "" and f.comment or nil }
  local status, doc = self.server:decide(id, verb, body)
  if status == 200 then return redirect(self, "/plans/" .. id) end
  if status == 404 then return self:plan_page(id, session) end
  return self:plan_page(id, session, doc.error, status)
end

--- POST /plans/ID/apply: `runbook apply ID --yes` in a child, as the session's person.
function Console:apply(id, session)
  local p, why = plan.read(id)
  if not p then return html(self, 404, "No plan", session, ('<p class="error">%s</p>'):format(esc(why))) end
  if plan_state(p) ~= "approved" then return self:plan_page(id, session, "The plan is not approved.", 409) end
  local s = self.server
  local started, err = s:spawn({ s.bin, "apply", id, "--yes" }, "apply-" .. p.runbook.name, p.runbook.path, "run",
    session.user)
  if not started then return self:plan_page(id, session, err, 429) end
  s:note_origin(started.run_id, { by = session.user, plan = id })
  return redirect(self, "/runs/" .. started.run_id)
end

--- POST /runs/ID/resume: `runbook resume ID --yes` in a child, as the session's person.
function Console:resume(id, session)
  local row = journal.row(id)
  local status = row and self.server:run_row(id).status
  if not RESUMABLE[status] or self.server.by_run[id] then
    return html(self, 409, "Not resumable", session, ('<p class="error">Run %s is %s: only a failed, aborted, '
      .. 'interrupted or killed run resumes.</p>'):format(esc(id), esc(status or "unknown")))
  end
  local started, err = self.server:spawn({ self.server.bin, "resume", id, "--yes" }, "resume-" .. row.start.runbook,
    row.start.runbook, "run", session.user, nil, id)
  if not started then return html(self, 429, "Refused", session, ('<p class="error">%s</p>'):format(esc(err))) end
  return redirect(self, "/runs/" .. id)
end

-- ---- routing --------------------------------------------------------------------

local RUN_ID = "[%w%-]+"

--- Every request outside /v1/, /healthz and /metrics.
function Console:handle(req)
  local m, p = req.method, req.path
  if m == "GET" and p == "/static/console.css" then
    return 200, report.CSS .. assets.css, "text/css; charset=utf-8", self:headers { ["Cache-Control"] = "max-age=300" }
  end
  if m == "GET" and p == "/static/console.js" then
    return 200, assets.js, "text/javascript; charset=utf-8", self:headers { ["Cache-Control"] = "max-age=300" }
  end
  if m == "GET" and p == "/login" then
    -- The token of a login page open in another tab (or before a redirect to it) stays valid.
    local pre = cookies(req.cookie).rb_login
    return self:login_page(200, nil, pre and #pre == 32 and pre or plan.random_hex(16))
  end
  if m == "POST" and p == "/login" then return self:login(req) end
  local session, sid = self:session(req)
  if not session then
    if m == "GET" and (p == "/" or p:match("^/runs/[^/]*$") or p:match("^/plans/[^/]*$")) then
      return redirect(self, "/login")
    end
    return 401, "log in first: /login\n", "text/plain; charset=utf-8", self:headers()
  end
  if m == "POST" then
    local f = form(req.body)
    if not (f.csrf and require("runbook.httpd").equal(f.csrf, session.csrf)) then
      return html(self, 403, "Refused", session, '<p class="error">Refused: the form did not carry this session\'s '
        .. 'CSRF token. <a href="/">Back</a></p>')
    end
    if p == "/logout" then
      self.sessions[sid], self.nsessions = nil, self.nsessions - 1
      return redirect(self, "/login", { ["Set-Cookie"] = self:cookie("rb_session", "x", 0) })
    end
    local id, verb = p:match("^/plans/(" .. RUN_ID .. ")/(%a+)$")
    local run = p:match("^/runs/(" .. RUN_ID .. ")/resume$")
    if not run and not (verb == "approve" or verb == "deny" or verb == "apply") then
      return html(self, 404, "Not found", session, '<p class="error">No such page.</p>')
    end
    if session.role ~= "approver" then
      return html(self, 403, "Refused", session, ('<p class="error">Refused: %s is a viewer; approvers approve, deny, '
        .. "apply and resume.</p>"):format(esc(session.user)))
    end
    if run then return self:resume(run, session) end
    if verb == "apply" then return self:apply(id, session) end
    return self:decide(id, verb, req, session)
  end
  if m ~= "GET" then return 405, "", "text/plain", self:headers() end
  if p == "/" then return self:runs_page(req, session) end
  if p == "/live/runs" then
    return 200, host.redact(self:runs_table(req.query or {})), "text/html; charset=utf-8", self:headers()
  end
  if p == "/live/runs/events" then return 200, self:runs_changes(), "text/event-stream", self:headers() end
  local id, rest = p:match("^/runs/(" .. RUN_ID .. ")(.*)$")
  if id and rest == "" then return self:run_page(id, session) end
  if id and rest == "/events" then
    local status, stream = self.server:route { method = "GET", path = "/v1/runs/" .. id .. "/events" }
    if type(stream) ~= "function" then return status, cjson.encode(stream), "application/json", self:headers() end
    return status, stream, "text/event-stream", self:headers()
  end
  id = p:match("^/live/runs/(" .. RUN_ID .. ")$")
  if id then return 200, host.redact((self:run_body(id, session))), "text/html; charset=utf-8", self:headers() end
  id = p:match("^/plans/(" .. RUN_ID .. ")$")
  if id then return self:plan_page(id, session) end
  return html(self, 404, "Not found", session, '<p class="error">No such page.</p>')
end

return M
