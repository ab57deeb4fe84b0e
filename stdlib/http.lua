--- http: HTTP requests from runbooks, over libcurl.
--
--   http.request{method="POST", url=..., path={segment, ...}, query={name = value},
--                headers={...}, body="..." or json={...},
--                timeout=..., connect_timeout=..., cafile=..., insecure=..., follow=...,
--                cert=, key= (client certificate files) or cert_pem=, key_pem= (PEM text)}
--     -> {status=200, headers={...}, body="...", json=<decoded when content-type is JSON>}
--   http.get(url, opts)  http.head  http.post  http.put  http.patch  http.delete
--   http.check(url, opts)  like curl -f: raises when the status is >= 400
--   http.check_all{urls = {url, ...} or {name = url, ...}, concurrency = 50, timeout = "10s",
--                  connect_timeout=, headers=, TLS options as for request, expect = {200, 204} or function(r)}
--     -> {ok = <every target ok>, failed = N, duration = seconds, slowest = seconds,
--         results = {{name, url, ok, status, latency, error, code, retryable, body, json}, ...},
--         by_name = {[name] = result}}
--     GETs every target at once (libcurl's multi interface): the whole takes
--     about as long as the slowest target, not the sum. A target is ok when
--     it answered with a status accepted by `expect` (default: below 400);
--     refused connections and timeouts are results with error and code
--     ("couldnt_connect", "timeout"), never raised.
--   http.websocket(url, {timeout = "10s", protocol = "chat", ping = true, send = "hello", expect = "^hello$",
--                       cafile=, insecure=, cert=, key=})
--     -> {ok = true, status = 101, protocol, connect = seconds, pong = seconds, reply, binary, latency, skipped}
--     A WebSocket endpoint probed, as seed 003's curl -H "Upgrade: websocket"
--     and more: the handshake, a ping answered by a pong (unless ping =
--     false), and with send a text message sent and the first message back
--     read as reply, which must match the Lua pattern expect when given.
--     The handshake and the ping are reads. The message is a write (the
--     endpoint may act on it): in a dry run it is not sent, and the result
--     has skipped = true and no reply. Failures raise, naming the URL:
--     code "couldnt_connect", the status ("503") when the upgrade is
--     refused, "timeout", "closed" (closed before the pong or the reply),
--     "unexpected_reply".
--
-- Non-2xx statuses are returned by request and the method helpers; only
-- check raises for them (code = the status, retryable for 5xx and 429).
-- Connection failures always raise, with curl's reason as the code
-- ("couldnt_connect", "timeout", "peer_failed_verification").
--
-- path segments are escaped whole and appended to the URL's path; query
-- parameters are escaped and appended to its query. A URL with a fragment
-- (#...) is refused.
--
-- GET and HEAD are reads; every other method (OPTIONS too) goes through the
-- effect gate: dry-run skips it and it returns {skipped=true}. A GET or HEAD
-- with a body, or with a header that asks for another method
-- (X-HTTP-Method-Override), is refused.
--
-- TLS is verified by default; insecure=true turns that off, with a warning.
-- A password in the URL and Authorization header values never print.
local native = require("runbook.http")
local cjson = require("cjson")
local duration = require("duration")
local host = require("runbook.host")

local raise = host.raiser "http"

local http = {}

local function warn(msg)
  local ok, log = pcall(require, "log")
  if ok and type(log) == "table" and log.warn then
    log.warn(msg)
  else
    io.stderr:write(host.redact("warning: " .. msg .. "\n"))
  end
end

local function has_header(headers, name)
  for k in pairs(headers) do
    if type(k) == "string" and k:lower() == name then return true end
  end
  return false
end

-- A json= body is encoded and labelled, unless the caller set a content type.
local function encode_body(opts, headers)
  if opts.json == nil then return opts.body end
  if opts.body ~= nil then error("give either body or json, not both", 3) end
  if not has_header(headers, "content-type") then headers["Content-Type"] = "application/json" end
  return cjson.encode(opts.json)
end

local function is_json(ctype)
  ctype = (ctype or ""):lower():match("^[^;]*")
  return ctype == "application/json" or ctype:match("%+json$") ~= nil
end

local function decode(r)
  if r.skipped or not is_json(r.headers["content-type"]) or r.body == "" then return r end
  local ok, doc = pcall(cjson.decode, r.body)
  if ok then r.json = doc end
  return r
end

function http.request(opts)
  if type(opts) ~= "table" then error("http.request expects a table", 2) end
  local headers = {}
  for k, v in pairs(opts.headers or {}) do headers[k] = v end
  local body = encode_body(opts, headers)
  if opts.insecure then warn("TLS verification disabled for " .. tostring(opts.url)) end
  return decode(native.request {
    method = opts.method, url = opts.url, path = opts.path, query = opts.query, headers = headers, body = body,
    timeout = opts.timeout and duration.check(opts.timeout, "http timeout"),
    connect_timeout = opts.connect_timeout and duration.check(opts.connect_timeout, "http connect_timeout"),
    cafile = opts.cafile, insecure = opts.insecure, follow = opts.follow,
    cert = opts.cert, key = opts.key, cert_pem = opts.cert_pem, key_pem = opts.key_pem,
  })
end

local function with(method, url, opts)
  local o = {}
  for k, v in pairs(opts or {}) do o[k] = v end
  o.method, o.url = o.method or method, url
  return o
end

for _, method in ipairs { "get", "head", "post", "put", "patch", "delete" } do
  http[method] = function(url, opts)
    return http.request(with(method:upper(), url, opts))
  end
end

local function option(opts, name, kind)
  local v = opts[name]
  if v ~= nil and type(v) ~= kind then error(("http.websocket: %s must be a %s"):format(name, kind), 3) end
  return v
end

function http.websocket(url, opts)
  if type(url) ~= "string" then error("http.websocket expects a URL (ws://host:port/path)", 2) end
  opts = opts or {}
  if type(opts) ~= "table" then error("http.websocket: options must be a table", 2) end
  local expect = option(opts, "expect", "string")
  if expect then
    local ok, err = pcall(string.find, "", expect)
    if not ok then error(("http.websocket: expect is not a valid Lua pattern: %s"):format(err), 2) end
  end
  if opts.insecure then warn("TLS verification disabled for " .. url) end
  local r = require("runbook.ws").probe {
    url = url, timeout = duration.check(opts.timeout or "10s", "http.websocket timeout"),
    protocol = option(opts, "protocol", "string"), ping = opts.ping ~= false, send = option(opts, "send", "string"),
    ca_file = opts.cafile, insecure = opts.insecure, cert_file = opts.cert, key_file = opts.key,
  }
  if expect and r.reply and not r.reply:find(expect) then
    raise { op = "websocket", code = "unexpected_reply", retryable = false,
      message = ("WebSocket %s: the reply %q does not match %q"):format(url, r.reply:sub(1, 200), expect) }
  end
  r.ok = true
  return r
end

function http.check(url, opts)
  local r = http.request(with("GET", url, opts))
  if r.status and r.status >= 400 then
    local method = (opts and opts.method or "GET"):upper()
    raise { op = method, code = tostring(r.status), retryable = r.status >= 500 or r.status == 429,
      message = ("%s %s: HTTP %d"):format(method, (url:gsub("//([^/@:]*):[^/@]*@", "//%1:***@")), r.status) }
  end
  return r
end

local function targets_of(urls)
  if type(urls) ~= "table" then error("http.check_all: urls must be a list of URLs or a table {name = url}", 3) end
  local list = {}
  if #urls > 0 or next(urls) == nil then
    for i, url in ipairs(urls) do list[i] = { name = url, url = url } end
  else
    for name, url in pairs(urls) do list[#list + 1] = { name = tostring(name), url = url } end
    table.sort(list, function(a, b) return a.name < b.name end)
  end
  for _, t in ipairs(list) do
    if type(t.url) ~= "string" then error(("http.check_all: the URL of %s is not a string"):format(t.name), 3) end
    t.name = t.name:gsub("//([^/@:]*):[^/@]*@", "//%1:***@")
  end
  return list
end

local function acceptor(expect)
  if expect == nil then return function(r) return r.status < 400 end end
  if type(expect) == "function" then return expect end
  if type(expect) ~= "table" then error("http.check_all: expect must be a list of statuses or a function", 3) end
  local set = {}
  for _, s in ipairs(expect) do set[s] = true end
  return function(r) return set[r.status] == true end
end

function http.check_all(opts)
  if type(opts) ~= "table" then error("http.check_all expects a table {urls = ...}", 2) end
  local targets, accept = targets_of(opts.urls), acceptor(opts.expect)
  if opts.insecure then warn("TLS verification disabled for check_all") end
  local urls = {}
  for i, t in ipairs(targets) do urls[i] = t.url end
  local t0 = require("runbook.host").now()
  local raw = native.check_all {
    urls = urls, concurrency = opts.concurrency, headers = opts.headers,
    timeout = duration.check(opts.timeout or "10s", "check_all timeout"),
    connect_timeout = opts.connect_timeout and duration.check(opts.connect_timeout, "check_all connect_timeout"),
    cafile = opts.cafile, insecure = opts.insecure,
    cert = opts.cert, key = opts.key, cert_pem = opts.cert_pem, key_pem = opts.key_pem,
  }
  local out = { ok = true, failed = 0, slowest = 0, results = {}, by_name = {},
    duration = require("runbook.host").now() - t0 }
  for i, t in ipairs(targets) do
    local r = raw[i]
    r.name, r.url = t.name, t.url
    if r.status then
      r.headers = { ["content-type"] = r.content_type }
      decode(r)
      r.headers = nil
      r.ok = accept(r) and true or false
      if not r.ok and not r.error then r.error = ("HTTP %d"):format(r.status) end
    else
      r.ok = false
    end
    if not r.ok then out.ok, out.failed = false, out.failed + 1 end
    out.slowest = math.max(out.slowest, r.latency)
    out.results[i], out.by_name[t.name] = r, r
  end
  return out
end

return http
