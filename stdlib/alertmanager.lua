--- alertmanager: Alertmanager's API v2 for runbooks, over the http module:
-- silences for maintenance (seed 000's Maintenance Windows: the work should
-- not page), and the alerts it holds.
--
--   alertmanager.connect{url=, token=, ca_file=, timeout="10s", connect_timeout="10s"} -> client
--     url: ALERTMANAGER_URL by default; token is sent as a bearer token (a secret).
--   Every function below exists on a client (c:silence{...}) and on the module,
--   which uses a client made from the environment on first use.
--
--   silence{matchers = {alertname = "HighErrorRate", namespace = "todo-chatbot", service = "=~backend.*"},
--           for_ = "2h", comment = "maintenance INC-812", created_by = nil}
--     -> {id = "...", matchers = "{...}", starts_at, ends_at}, or in a dry run the same with
--        skipped = true and no id
--     matchers: label -> "value" (=), "!=value", "=~regex" or "!~regex" (Alertmanager's RE2,
--     anchored); at least one. for_: how long it lasts (a duration). created_by: RUNBOOK_USER,
--     else the login name.
--   expire(id) -> {ok = true} | {skipped = true}; an id that is already expired or gone raises
--     code "404"
--   silences{active = true} -> {{id, state, matchers, comment, created_by, starts_at, ends_at}, ...}
--   alerts{filter = {alertname = "X"}, silenced = false} -> Alertmanager's alerts
--
-- Creating and expiring go through the effect gate: a dry run shows the
-- silence it would create ("would silence {alertname=\"X\"} for 2h: ...")
-- and creates nothing. Errors raise with the HTTP status as the code
-- ("400" for a matcher Alertmanager refuses) and its message; an endpoint
-- that cannot be reached raises with curl's reason ("couldnt_connect").
local native = require("runbook.http")
local cjson = require("cjson")
local duration = require("duration")
local host = require("runbook.host")

local M = {}
local Client = {}
Client.__index = Client

local raise = host.raiser "alertmanager"

local function iso(t)
  return os.date("!%Y-%m-%dT%H:%M:%S", math.floor(t)) .. (".%03dZ"):format(math.floor((t % 1) * 1000))
end

--- One request of the API; `effect` names a write for the gate. Returns the
-- response (skipped = true in a dry run); raises on any failure.
function Client:call(op, method, path, opts)
  opts = opts or {}
  local headers = { Accept = "application/json" }
  for k, v in pairs(self.headers) do headers[k] = v end
  local body
  if opts.json ~= nil then body, headers["Content-Type"] = cjson.encode(opts.json), "application/json" end
  local ok, r = pcall(native.request, { method = method, url = self.url, path = path, query = opts.query,
    headers = headers, body = body, timeout = self.timeout, connect_timeout = self.connect_timeout,
    cafile = self.ca_file, effect = opts.effect })
  if not ok then
    if type(r) ~= "table" or r.module ~= "http" then error(r, 0) end
    raise { op = op, code = r.code, retryable = r.retryable,
      message = ("Alertmanager at %s: %s"):format(self.url, tostring(r.message)) }
  end
  if r.skipped then return r end
  if r.status >= 400 then
    local okj, doc = pcall(cjson.decode, r.body)
    local why = okj and type(doc) == "string" and doc or okj and type(doc) == "table" and doc.message
      or r.body:sub(1, 200):gsub("%s+", " ")
    raise { op = op, code = tostring(r.status), status = r.status, retryable = r.status >= 500 or r.status == 429,
      message = ("Alertmanager at %s answered HTTP %d: %s"):format(self.url, r.status, tostring(why)) }
  end
  local okj, doc = pcall(cjson.decode, r.body ~= "" and r.body or "null")
  r.json = okj and doc or nil
  return r
end

local OPS = { { "!~", false, false }, { "=~", true, true }, { "!=", false, false } }

--- matchers = {label = "value" | "!=value" | "=~re" | "!~re"} -> Alertmanager's list, sorted by name,
-- and their text ({a="x",b=~"y"}).
local function matchers_of(t, op)
  if type(t) ~= "table" or next(t) == nil then
    error(("alertmanager.%s: matchers must be a table {label = \"value\" | \"!=value\" | \"=~regex\" | \"!~regex\"}, "
      .. "with at least one"):format(op), 3)
  end
  local names = {}
  for k, v in pairs(t) do
    if type(k) ~= "string" or type(v) ~= "string" then
      error(("alertmanager.%s: matcher %s = %s: label and value must be strings"):format(op, tostring(k),
        tostring(v)), 3)
    end
    names[#names + 1] = k
  end
  table.sort(names)
  local list, text = {}, {}
  for i, name in ipairs(names) do
    local spec, value, is_regex, is_equal, sign = t[name], t[name], false, true, "="
    for _, o in ipairs(OPS) do
      if spec:sub(1, 2) == o[1] then
        value, sign = spec:sub(3), o[1]
        is_regex = o[1]:sub(2) == "~"
        is_equal = o[1]:sub(1, 1) == "="
        break
      end
    end
    list[i] = { name = name, value = value, isRegex = is_regex, isEqual = is_equal }
    text[i] = name .. sign .. cjson.encode(value)
  end
  return list, "{" .. table.concat(text, ",") .. "}"
end

local function text_of(list)
  local text = {}
  for i, m in ipairs(list or {}) do
    local sign = (m.isEqual == false and "!" or "=") .. (m.isRegex and "~" or (m.isEqual == false and "=" or ""))
    text[i] = m.name .. sign .. cjson.encode(m.value)
  end
  return "{" .. table.concat(text, ",") .. "}"
end

function Client:silence(opts)
  if type(opts) ~= "table" then error("alertmanager.silence expects a table {matchers=, for_=, comment=}", 2) end
  local list, text = matchers_of(opts.matchers, "silence")
  local secs = duration.check(opts.for_, "alertmanager.silence for_")
  if secs <= 0 then error("alertmanager.silence: for_ must be longer than 0s", 2) end
  if type(opts.comment) ~= "string" or opts.comment == "" then
    error("alertmanager.silence: comment is required (why, and the ticket)", 2)
  end
  local user = os.getenv("RUNBOOK_USER")
  local by = opts.created_by or (user and user ~= "" and user) or host.identity().user
  local now = host.wallclock()
  local body = { matchers = list, startsAt = iso(now), endsAt = iso(now + secs), createdBy = by,
    comment = opts.comment }
  -- The summary holds the length, not the end time, so a plan's silence is the one its apply creates.
  local r = self:call("silence", "POST", { "api", "v2", "silences" }, { json = body,
    effect = { module = "alertmanager", op = "silence", target = self.url .. " " .. text,
      summary = ("silence %s for %s: %s"):format(text, duration.format(secs), opts.comment) } })
  local out = { matchers = text, starts_at = body.startsAt, ends_at = body.endsAt, skipped = r.skipped }
  if not r.skipped then
    out.id = type(r.json) == "table" and r.json.silenceID
    if type(out.id) ~= "string" then
      raise { op = "silence", code = "bad_response", message = "Alertmanager answered without a silenceID" }
    end
  end
  return out
end

function Client:expire(id)
  if type(id) ~= "string" or not id:match("^[%w%-]+$") then
    error(("alertmanager.expire: expected a silence id, got %s"):format(tostring(id)), 2)
  end
  -- Read first (a read runs in a dry run too), so the effect names what it ends.
  local s = self:call("expire", "GET", { "api", "v2", "silence", id }).json or {}
  local r = self:call("expire", "DELETE", { "api", "v2", "silence", id }, {
    effect = { module = "alertmanager", op = "expire", target = self.url .. " silence " .. id,
      summary = ("expire silence %s %s (%s)"):format(id, text_of(s.matchers), tostring(s.comment)) } })
  return r.skipped and { skipped = true } or { ok = true }
end

local function silence_row(s)
  return { id = s.id, state = s.status and s.status.state, matchers = text_of(s.matchers), comment = s.comment,
    created_by = s.createdBy, starts_at = s.startsAt, ends_at = s.endsAt }
end

function Client:silences(opts)
  opts = opts or {}
  local out = {}
  for _, s in ipairs(self:call("silences", "GET", { "api", "v2", "silences" }).json or {}) do
    if not opts.active or (s.status and s.status.state == "active") then out[#out + 1] = silence_row(s) end
  end
  return out
end

function Client:alerts(opts)
  opts = opts or {}
  local query = {}
  if opts.filter then
    local _, text = matchers_of(opts.filter, "alerts")
    query.filter = text:sub(2, -2)
  end
  if opts.silenced ~= nil then query.silenced = tostring(opts.silenced) end
  return self:call("alerts", "GET", { "api", "v2", "alerts" }, { query = query }).json or {}
end

function M.connect(opts)
  opts = opts or {}
  if type(opts) ~= "table" then error("alertmanager.connect expects a table {url=, token=, ca_file=}", 2) end
  local url = opts.url or os.getenv("ALERTMANAGER_URL")
  if url == nil or url == "" then
    error("alertmanager: no Alertmanager endpoint: set ALERTMANAGER_URL or pass alertmanager.connect{url = ...}", 2)
  end
  if type(url) ~= "string" or not url:match("^https?://[^/]") then
    error(("alertmanager.connect: url must be an http(s) URL, got %s"):format(tostring(url)), 2)
  end
  local headers = {}
  if opts.token then
    host.secret(opts.token)
    headers.Authorization = "Bearer " .. opts.token
  end
  return setmetatable({ url = url:gsub("/+$", ""), headers = headers, ca_file = opts.ca_file,
    timeout = duration.check(opts.timeout or "10s", "alertmanager timeout"),
    connect_timeout = opts.connect_timeout and duration.check(opts.connect_timeout, "alertmanager connect_timeout") },
    Client)
end

local default
for _, name in ipairs { "silence", "expire", "silences", "alerts" } do
  M[name] = function(...)
    default = default or M.connect()
    return default[name](default, ...)
  end
end

return M
