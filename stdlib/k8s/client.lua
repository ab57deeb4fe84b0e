--- The core of the k8s module: a client over one connection, API errors,
-- discovery, resource names, the generic verbs and the gated write.
-- stdlib/k8s.lua documents the public API; this file is its machinery.
local native = require("runbook.k8s")
local cjson = require("cjson")
local host = require("runbook.host")
local config = require("k8s.config")
local diff = require("k8s.diff")

local codec = cjson.new()
codec.encode_sparse_array(true)
codec.encode_invalid_numbers(false)

local M = {}
local Client = {}
Client.__index = Client
M.Client = Client

local raise = host.raiser "k8s"
M.raise = raise

-- JSON that keeps empty lists: lua-cjson 2.1 decodes [] and {} alike, so
-- empty arrays are marked on the way in (a table with ARRAY metatable) and
-- written back as [] on the way out. M.array(t) makes a list that stays one.
local ARRAY = { __name = "k8s.array" }
M.ARRAY = ARRAY
local MARK = "\0[]"

function M.array(t) return setmetatable(t or {}, ARRAY) end

-- Marks become empty lists, and whole numbers integers (cjson 2.1 reads every
-- number as a float: replicas would print as "2.0").
local function restore(v)
  local t = type(v)
  if t == "number" then return math.tointeger(v) or v end
  if t == "string" then return v == MARK and setmetatable({}, ARRAY) or v end
  if t == "table" then
    for k, x in pairs(v) do
      local tx = type(x)
      if tx == "table" or tx == "number" or (tx == "string" and x == MARK) then v[k] = restore(x) end
    end
  end
  return v
end

local function prepare(v)
  if type(v) ~= "table" then return v end
  if next(v) == nil then return getmetatable(v) == ARRAY and MARK or v end
  local out = {}
  for k, x in pairs(v) do out[k] = prepare(x) end
  return out
end

function M.encode(v)
  return (codec.encode(prepare(v)):gsub('"\\u0000%[%]"', "[]"))
end

-- A Secret's values are registered the moment they are read, decoded and as
-- sent, so whatever a runbook prints of them is redacted: get, list, watch
-- events and the objects writes answer with all pass M.decode.
local function register_secret(obj)
  for _, field in ipairs { "data", "stringData" } do
    for _, v in pairs(type(obj[field]) == "table" and obj[field] or {}) do
      if type(v) == "string" then
        host.secret(v)
        if field == "data" then host.secret(config.base64_decode(v) or v) end
      end
    end
  end
end

local function register_secrets(doc)
  if type(doc) ~= "table" then return end
  if doc.kind == "Secret" then
    register_secret(doc)
  elseif doc.kind == "SecretList" or doc.kind == "List" then
    for _, item in ipairs(type(doc.items) == "table" and doc.items or {}) do
      if type(item) == "table" and (doc.kind == "SecretList" or item.kind == "Secret") then register_secret(item) end
    end
  elseif type(doc.object) == "table" then
    register_secrets(doc.object)
  end
end

function M.decode(s)
  local text, n = native.mark_empty_arrays(s)
  local ok, v = pcall(codec.decode, text)
  if not ok then return nil end
  register_secrets(v)
  return restore(v)
end

-- ---- connecting ---------------------------------------------------------------

local function warn(msg)
  require("log").warn(msg)
end

local function open(c, cred)
  local cfg = c.cfg
  if c.conn then c.conn:close() end
  c.conn = native.connect {
    server = cfg.server, ca_data = cfg.ca_data, ca_file = cfg.ca_file, insecure = cfg.insecure,
    tls_server_name = cfg.tls_server_name,
    cert_data = cred.cert_data or cfg.cert_data,
    cert_file = cfg.cert_file,
    key_data = cred.key_data or cfg.key_data, key_file = cfg.key_file,
    token = cred.token, connect_timeout = c.connect_timeout,
  }
  c.cred = cred
end

-- The contexts a run connected to, for its journal: who ran it where.
local announced = setmetatable({}, { __mode = "k" })

--- Journal a kubernetes_context event the first time the current run connects to
-- this context, namespace and server.
local function announce(cfg)
  local events = require("runbook.events")
  local run = events.run
  if not run then return end
  local key = ("%s\0%s\0%s"):format(cfg.context, cfg.namespace, cfg.server)
  announced[run] = announced[run] or {}
  if announced[run][key] then return end
  announced[run][key] = true
  events.emit { event = "kubernetes_context", context = cfg.context, namespace = cfg.namespace, cluster = cfg.cluster,
    server = cfg.server, user = cfg.user }
end

--- A client for one context (see k8s.connect).
function M.new(opts)
  local cfg = config.resolve(opts)
  if cfg.insecure then warn(("k8s: TLS verification is disabled for %s (insecure-skip-tls-verify)"):format(cfg.server)) end
  local duration = require("duration")
  local c = setmetatable({ cfg = cfg, namespace = cfg.namespace, context = cfg.context, server = cfg.server,
    user = cfg.user, timeout = opts and opts.timeout and duration.check(opts.timeout, "k8s timeout"),
    connect_timeout = opts and opts.connect_timeout and duration.check(opts.connect_timeout, "k8s connect_timeout") },
    Client)
  open(c, config.credentials(cfg))
  announce(cfg)
  return c
end

function Client:close()
  if self.conn then self.conn:close() end
end

-- Credentials that expire or rotate are refreshed before a request when due.
function Client:refresh(force)
  local cfg = self.cfg
  if not (cfg.exec or cfg.token_file) then return false end
  local cred = config.credentials(cfg, force)
  if cred.cert_data ~= self.cred.cert_data or cred.key_data ~= self.cred.key_data then
    open(self, cred)
  elseif cred.token ~= self.cred.token then
    self.conn:set_token(cred.token)
    self.cred = cred
  end
  return true
end

-- ---- requests and errors ------------------------------------------------------

local RETRY_READ = { [429] = true, [500] = true, [502] = true, [503] = true, [504] = true }

local function status_error(c, op, status, body, what)
  local st = M.decode(body or "")
  local msg = type(st) == "table" and st.kind == "Status" and st.message or nil
  local reason = type(st) == "table" and st.reason or nil
  if not msg then
    msg = (body or ""):gsub("%s+$", "")
    if msg == "" or #msg > 300 then msg = ("HTTP %d"):format(status) end
  end
  if status == 401 or status == 403 then
    msg = ("%s: user %q (context %s) may not %s%s"):format(msg, c.user, c.context, op,
      what and (" " .. what) or "")
  elseif what and not msg:find(what, 1, true) then
    msg = ("%s %s: %s"):format(op, what, msg)
  end
  raise { op = op, code = tostring(status), reason = reason, status = status, message = msg,
    details = type(st) == "table" and st.details or nil,
    retryable = RETRY_READ[status] or status == 409 and reason == "Conflict" or false }
end
M.status_error = status_error

local function sleep(secs)
  local dl = host.deadline()
  if dl and host.now() + secs > dl then return false end
  host.sleep(secs)
  return true
end

--- One API call. req: {method, path, query ({name = value}), body (table or
-- string), content_type, accept, timeout, op, what, raw}. The path is
-- escaped segments without a query: runbook.k8s builds the URL and, for a
-- write in a dry run, adds dryRun=All itself. Decodes JSON replies; raises
-- a structured error for any status >= 400 unless req.allow[status]. Reads
-- (and any request answered 429) are retried with backoff.
function Client:call(req)
  local method = req.method or "GET"
  local body = req.body
  if type(body) == "table" then body = M.encode(body) end
  local op = req.op or method:lower()
  local delay, attempt, reauth = 0.2, 0, false
  while true do
    attempt = attempt + 1
    if self.cfg.exec and self.cred.expires and os.time() >= self.cred.expires - 10 then self:refresh() end
    local ok, status, rbody, ctype, retry_after = pcall(self.conn.request, self.conn, {
      method = method, path = req.path, query = req.query, body = body, content_type = req.content_type or (body and "application/json"),
      accept = req.accept, timeout = req.timeout or self.timeout,
    })
    if not ok then
      local err = status
      local readish = method == "GET"
      -- a read that timed out has had its whole deadline: retrying would multiply it
      if type(err) == "table" and err.retryable and err.code ~= "timeout" and readish and attempt < 5
        and sleep(delay) then
        delay = delay * 2
      else
        error(err, 0)
      end
    elseif status == 401 and not reauth and self:refresh(true) then
      reauth = true   -- an expired exec credential or a rotated token: once more with a fresh one
    elseif RETRY_READ[status] and (method == "GET" or status == 429) and attempt < 5 and
        not (req.allow and req.allow[status]) and
        sleep(math.min(tonumber(retry_after) or delay, 5)) then
      delay = delay * 2
    elseif status >= 400 and not (req.allow and req.allow[status]) then
      status_error(self, op, status, rbody, req.what)
    else
      if req.raw then return rbody, status, ctype end
      local doc = rbody ~= "" and (ctype or ""):find("json") and M.decode(rbody) or nil
      return doc or (rbody ~= "" and rbody or nil), status
    end
  end
end

-- A path segment may keep ':' (service "web:8080" for the proxy).
local function escape_segment(s)
  return (s:gsub("[^%w%-%._~:@]", function(ch) return ("%%%02X"):format(ch:byte()) end))
end

-- ---- discovery ---------------------------------------------------------------

local discovery_cache = {}   -- server -> resource list (one fetch per process)

local function add_group(list, doc, group, version)
  local subs = {}
  for _, r in ipairs(doc.resources or {}) do
    local base, sub = r.name:match("^([^/]+)/(.+)$")
    if base then subs[base] = subs[base] or {}; subs[base][sub] = r end
  end
  for _, r in ipairs(doc.resources or {}) do
    if not r.name:find("/") then
      list[#list + 1] = {
        group = group, version = version, name = r.name, kind = r.kind, namespaced = r.namespaced,
        singular = (r.singularName ~= "" and r.singularName) or r.kind:lower(), short = r.shortNames or {},
        verbs = r.verbs or {}, subresources = subs[r.name] or {},
      }
    end
  end
end

--- Every resource the server serves, core first, each group's preferred version
-- first (other versions follow for explicit lookups). Fetched once per server.
function Client:discover()
  local cached = discovery_cache[self.server]
  if cached then return cached end
  local list = {}
  add_group(list, self:call { path = "/api/v1", op = "discovery" }, "", "v1")
  local groups = self:call { path = "/apis", op = "discovery" }
  for _, g in ipairs(groups.groups or {}) do
    local pref = g.preferredVersion and g.preferredVersion.version
    local versions = { pref }
    for _, v in ipairs(g.versions or {}) do
      if v.version ~= pref then versions[#versions + 1] = v.version end
    end
    for _, v in ipairs(versions) do
      local ok, doc = pcall(self.call, self, { path = ("/apis/%s/%s"):format(g.name, v), op = "discovery" })
      if ok and type(doc) == "table" then add_group(list, doc, g.name, v) end
    end
  end
  discovery_cache[self.server] = list
  return list
end

function M.forget_discovery() discovery_cache = {} end

--- A resource from kubectl's ways of naming it: "deployments", "deployment",
-- "deploy", "Deployment", "deployments.apps", "deployments.v1.apps".
function Client:resource(name)
  if type(name) == "table" and name.name and name.kind then return name end
  if type(name) ~= "string" or name == "" then
    error(("k8s: expected a resource type such as \"deployments\", got %s"):format(tostring(name)), 3)
  end
  local lname = name:lower()
  local base, rest = lname:match("^([^.]+)%.?(.*)$")
  local cache = self._res_cache or {}
  self._res_cache = cache
  if cache[lname] then return cache[lname] end
  for _, r in ipairs(self:discover()) do
    local named = r.name == base or r.singular == base or r.kind:lower() == base
    if not named then
      for _, s in ipairs(r.short) do if s == base then named = true end end
    end
    if named and (rest == "" or rest == r.group or rest == r.version .. "." .. r.group
        or (r.group == "" and rest == r.version)) then
      cache[lname] = r
      return r
    end
  end
  raise { op = "resource", code = "unknown_resource",
    message = ("the server doesn't have a resource type %q"):format(name) }
end

--- The resource for an object's apiVersion and kind.
function Client:resource_of(obj)
  if type(obj) ~= "table" or type(obj.kind) ~= "string" or type(obj.apiVersion) ~= "string" then
    error("k8s: an object needs apiVersion and kind", 3)
  end
  local group, version = obj.apiVersion:match("^(.-)/?([^/]+)$")
  for _, r in ipairs(self:discover()) do
    if r.kind == obj.kind and r.group == group and r.version == version then return r end
  end
  raise { op = "resource", code = "unknown_resource",
    message = ("no resource for kind %s in %s"):format(obj.kind, obj.apiVersion) }
end

--- The URL path of a resource, a named object and a subresource.
function M.path(r, ns, name, sub)
  local p = r.group == "" and "/api/v1" or ("/apis/%s/%s"):format(r.group, r.version)
  if r.group == "" and r.version ~= "v1" then p = "/api/" .. r.version end
  if r.namespaced and ns then p = p .. "/namespaces/" .. escape_segment(ns) end
  p = p .. "/" .. r.name
  if name then p = p .. "/" .. escape_segment(name) end
  if sub then p = p .. "/" .. tostring(sub):gsub("[^/]+", escape_segment) end
  return p
end

--- "deployments.apps" for messages, as kubectl names them.
function M.qualified(r)
  return r.group == "" and r.name or (r.name .. "." .. r.group)
end

--- "todo-chatbot/deployment/backend": the target of an effect.
function M.target(r, ns, name)
  return (r.namespaced and ns and (ns .. "/") or "") .. r.singular .. "/" .. name
end

-- ---- the gated write ---------------------------------------------------------

-- A Secret's values never go into a record.
local function recordable(obj)
  if type(obj) ~= "table" or obj.kind ~= "Secret" then return obj end
  local o = {}
  for k, v in pairs(obj) do o[k] = v end
  o.data, o.stringData = nil, nil
  return o
end

--- Run one write through the effect gate. e: {op, target, summary, before
-- (the object now, for the diff; a function to fetch it in dry runs only),
-- send(dry) -> after, changes(before, after) -> list (default: diff.changes)}.
-- The gate says perform or simulate (Kubernetes dry-runs everything); in a
-- dry run runbook.k8s sends the request with dryRun=All, and the record
-- shows the would-be object and the diff. Returns the object the server
-- answered with.
function M.write(e)
  local decision = host.gate("k8s", e.op, e.target, e.summary, true, true)
  local dry = decision ~= "perform"
  local ok, after = pcall(function()
    local before = e.before
    if type(before) == "function" then before = dry and before() or nil end
    local result = e.send(dry)
    return { before = before, after = result }
  end)
  local record
  if ok then
    local before, res = after.before, after.after
    after = res
    local changes = before ~= nil and (e.changes or diff.changes)(before, res) or nil
    record = {
      summary = changes and diff.text(changes) or (dry and "accepted by the server (dry run)" or nil),
      diff = changes, dry_run = dry or nil,
      object = dry and recordable(res) or nil,
      resourceVersion = not dry and type(res) == "table" and res.metadata and res.metadata.resourceVersion or nil,
    }
    e.record = record
  end
  host.gate_done("k8s", e.op, e.target, e.summary, decision, ok, ok and record or tostring(after))
  if not ok then error(after, 0) end
  return after, record
end

-- ---- arguments ----------------------------------------------------------------

--- (type, name, opts) or ("type/name", opts): returns type, name, opts.
function M.target_args(a, b, c, need_name, verb)
  if type(a) == "table" and a.kind and a.name then return a, b, c end
  if type(a) ~= "string" then
    error(("k8s.%s: expected \"TYPE/NAME\" or TYPE, NAME; got %s"):format(verb, type(a)), 3)
  end
  local t, n = a:match("^([^/]+)/(.+)$")
  if t then return t, n, b end
  if type(b) == "string" then return a, b, c end
  if need_name then
    error(("k8s.%s: %q needs a name: \"%s/NAME\""):format(verb, a, a), 3)
  end
  return a, nil, b
end

function Client:ns(opts, obj)
  return (opts and opts.namespace) or (obj and obj.metadata and obj.metadata.namespace) or self.namespace
end

local function selector(v)
  if type(v) ~= "table" then return v end
  local parts = {}
  for k, val in pairs(v) do
    parts[#parts + 1] = val == true and k or (k .. "=" .. tostring(val))
  end
  table.sort(parts)
  return table.concat(parts, ",")
end
M.selector = selector

-- ---- generic verbs -------------------------------------------------------------

function Client:get(a, b, c)
  local t, name, opts = M.target_args(a, b, c, true, "get")
  opts = opts or {}
  local r = self:resource(t)
  local ns = self:ns(opts)
  local what = ('%s "%s"'):format(M.qualified(r), name) .. (r.namespaced and (" in namespace " .. ns) or "")
  local obj, status = self:call { path = M.path(r, ns, name, opts.subresource), op = "get", what = what,
    allow = opts.missing_ok and { [404] = true } or nil, timeout = opts.timeout }
  if status == 404 then return nil end
  return obj
end

--- Every item, page by page as kubectl pages (limit 500, then `continue`):
-- fn(item) for each; returns the last page's list metadata. Only one page is
-- held at a time. A list whose first revision the server no longer keeps
-- fails as kubectl's does (410 Expired).
function Client:each(t, opts, fn)
  opts = opts or {}
  local r = self:resource(t)
  local ns = not opts.all_namespaces and self:ns(opts) or nil
  local api_version = r.group == "" and r.version or (r.group .. "/" .. r.version)
  local meta, cont
  repeat
    local doc = self:call { path = M.path(r, r.namespaced and ns or nil), op = "list", what = M.qualified(r),
      timeout = opts.timeout, query = {
        labelSelector = selector(opts.label_selector or opts.labels or opts.selector),
        fieldSelector = selector(opts.field_selector or opts.fields),
        limit = opts.limit or 500, continue = cont,
      } }
    for _, it in ipairs(doc.items or {}) do
      it.kind = it.kind or r.kind
      it.apiVersion = it.apiVersion or api_version
      fn(it)
    end
    meta = doc.metadata or {}
    cont = meta.continue ~= "" and meta.continue or nil
  until not cont
  return meta
end

--- Every item, following `continue` until the list is complete.
function Client:list(t, opts)
  local items = {}
  local meta = self:each(t, opts, function(it) items[#items + 1] = it end)
  return M.array(items), meta
end

local function name_of(obj, verb)
  local md = type(obj) == "table" and obj.metadata
  if type(md) ~= "table" or type(md.name) ~= "string" then
    error(("k8s.%s: the object needs metadata.name"):format(verb), 3)
  end
  return md.name
end

function Client:create(obj, opts)
  opts = opts or {}
  local r = self:resource_of(obj)
  local ns = self:ns(opts, obj)
  local name = obj.metadata and (obj.metadata.name or obj.metadata.generateName) or "?"
  return (M.write {
    op = "create", target = M.target(r, ns, name),
    summary = ("create %s %s%s"):format(r.singular, name, r.namespaced and (" in " .. ns) or ""),
    before = {},
    send = function()
      return self:call { method = "POST", path = M.path(r, r.namespaced and ns or nil), body = obj, op = "create",
        what = ('%s "%s"'):format(M.qualified(r), name),
        query = { fieldManager = opts.field_manager or "runbook" } }
    end,
  })
end

function Client:replace(obj, opts)
  opts = opts or {}
  local r = self:resource_of(obj)
  local ns = self:ns(opts, obj)
  local name = name_of(obj, "replace")
  local path = M.path(r, r.namespaced and ns or nil, name)
  return (M.write {
    op = "replace", target = M.target(r, ns, name), summary = ("replace %s %s"):format(r.singular, name),
    before = opts.before or function() return self:call { path = path, op = "get" } end,
    send = function()
      return self:call { method = "PUT", path = path, body = obj, op = "replace",
        what = ('%s "%s"'):format(M.qualified(r), name),
        query = { fieldManager = opts.field_manager or "runbook" } }
    end,
  })
end

local PATCH_TYPES = {
  strategic = "application/strategic-merge-patch+json", merge = "application/merge-patch+json",
  json = "application/json-patch+json",
}

function Client:patch(a, b, c, d)
  local t, name, patch, opts
  if type(a) == "string" and a:find("/") then t, name = a:match("^([^/]+)/(.+)$"); patch, opts = b, c
  else t, name, patch, opts = a, b, c, d end
  if type(name) ~= "string" then error("k8s.patch: expected \"TYPE/NAME\", patch[, opts]", 2) end
  opts = opts or {}
  local ctype = PATCH_TYPES[opts.type or "strategic"]
  if not ctype then error(("k8s.patch: type must be strategic, merge or json, got %q"):format(tostring(opts.type)), 2) end
  if type(patch) ~= "table" and type(patch) ~= "string" then error("k8s.patch: the patch must be a table or JSON", 2) end
  local r = self:resource(t)
  local ns = self:ns(opts)
  local path = M.path(r, r.namespaced and ns or nil, name, opts.subresource)
  if opts.type == "json" and type(patch) == "table" then M.array(patch) end
  return (M.write {
    op = opts.verb or "patch", target = M.target(r, ns, name),
    summary = opts.summary or ("patch %s %s (%s)"):format(r.singular, name, opts.type or "strategic"),
    before = opts.before or function() return self:call { path = M.path(r, r.namespaced and ns or nil, name), op = "get" } end,
    changes = opts.changes,
    send = function()
      return self:call { method = "PATCH", path = path, body = patch, content_type = ctype, op = opts.verb or "patch",
        what = ('%s "%s"'):format(M.qualified(r), name),
        query = { fieldManager = opts.field_manager or "runbook" } }
    end,
  })
end

function Client:delete(a, b, c)
  local t, name, opts = M.target_args(a, b, c, true, "delete")
  opts = opts or {}
  local r = self:resource(t)
  local ns = self:ns(opts)
  local path = M.path(r, r.namespaced and ns or nil, name)
  local gone = false
  local out = M.write {
    op = "delete", target = M.target(r, ns, name), summary = ("delete %s %s"):format(r.singular, name),
    send = function()
      local body, status = self:call { method = "DELETE", path = path, op = "delete",
        what = ('%s "%s"'):format(M.qualified(r), name),
        allow = opts.missing_ok and { [404] = true } or nil,
        body = { kind = "DeleteOptions", apiVersion = "v1", propagationPolicy = opts.propagation or "Background",
          gracePeriodSeconds = opts.grace_period } }
      gone = status == 404
      return body
    end,
  }
  if gone then return nil end
  return out
end

-- ---- apply ---------------------------------------------------------------------

local function documents(manifest, verb)
  if type(manifest) == "table" and manifest.kind == nil and manifest.file then
    local text = config.read_file(manifest.file)
    if not text then error(("k8s.%s: cannot read %s"):format(verb, manifest.file), 3) end
    manifest = text
  end
  if type(manifest) == "string" then
    if not manifest:find("\n") and manifest:match("%.ya?ml$") or manifest:match("^[^\n]+%.json$") then
      local text = config.read_file(manifest)
      if not text then error(("k8s.%s: cannot read %s"):format(verb, manifest), 3) end
      manifest = text
    end
    local ok, docs = pcall(require("lyaml").load, manifest, { all = true })
    if not ok then
      raise { op = verb, code = "invalid_yaml", message = "manifest is not valid YAML: " .. tostring(docs) }
    end
    local out = {}
    for _, d in ipairs(docs) do
      if type(d) == "table" then
        if d.kind == "List" then for _, it in ipairs(d.items or {}) do out[#out + 1] = it end
        else out[#out + 1] = d end
      end
    end
    return out, false
  end
  if type(manifest) ~= "table" then error(("k8s.%s: expected an object, a list of objects or YAML"):format(verb), 3) end
  if manifest.kind then return { manifest }, true end
  return manifest, false
end

-- lyaml's null and empty tables to what the API expects.
local function clean(v)
  if type(v) ~= "table" then
    if v == require("lyaml").null then return cjson.null end
    return v
  end
  local out = {}
  for k, x in pairs(v) do out[k] = clean(x) end
  if #v > 0 or getmetatable(v) == ARRAY then M.array(out) end
  return out
end

--- Server-side apply of every document, with field manager "runbook".
function Client:apply(manifest, opts)
  opts = opts or {}
  local docs, single = documents(manifest, "apply")
  local out = {}
  for i, d in ipairs(docs) do
    d = clean(d)
    local r = self:resource_of(d)
    local ns = self:ns(opts, d)
    local name = name_of(d, "apply")
    if r.namespaced then d.metadata.namespace = d.metadata.namespace or ns end
    local path = M.path(r, r.namespaced and ns or nil, name)
    out[i] = M.write {
      op = "apply", target = M.target(r, ns, name), summary = ("apply %s %s"):format(r.singular, name),
      before = function()
        local cur, status = self:call { path = path, op = "get", allow = { [404] = true } }
        return status == 404 and {} or cur
      end,
      send = function()
        return self:call { method = "PATCH", path = path, body = d, content_type = "application/apply-patch+yaml",
          op = "apply", what = ('%s "%s"'):format(M.qualified(r), name),
          query = { fieldManager = opts.field_manager or "runbook", force = opts.force and "true" or nil } }
      end,
    }
  end
  if single then return out[1] end
  return out
end

-- ---- watch ---------------------------------------------------------------------

local Watch = {}
Watch.__index = Watch

--- An open watch: w:next(wait) -> type, object | nil when it ended.
-- Ends at its timeout; re-opens from the last resourceVersion when the server
-- closes it early; raises on an ERROR event (410 Expired: re-list and watch again).
function Client:watch_open(t, opts)
  opts = opts or {}
  local r = self:resource(t)
  local ns = not opts.all_namespaces and self:ns(opts) or nil
  local timeout = opts.timeout or 300
  local w = setmetatable({ client = self, r = r, ns = ns, opts = opts,
    deadline = host.now() + timeout, rv = opts.resource_version }, Watch)
  w:open()
  return w
end

function Watch:open()
  local left = self.deadline - host.now()
  if left <= 0 then self.ended = true; return end
  local o = self.opts
  local query = {
    watch = "true", allowWatchBookmarks = "true", resourceVersion = self.rv,
    labelSelector = selector(o.label_selector or o.labels or o.selector),
    fieldSelector = selector(o.field_selector or o.fields) or (o.name and ("metadata.name=" .. o.name)),
    timeoutSeconds = math.max(1, math.ceil(left)),
  }
  self.client:refresh()
  self.stream = self.client.conn:stream { path = M.path(self.r, self.r.namespaced and self.ns or nil),
    query = query, timeout = left + 5 }
end

function Watch:close()
  if self.stream then self.stream:close() end
  self.stream, self.ended = nil, true
end
Watch.__close = Watch.close
Watch.__gc = Watch.close

function Watch:next(wait)
  while not self.ended do
    local left = self.deadline - host.now()
    local line, why = self.stream:next(math.max(0.001, math.min(wait or left, left)))
    local status = self.stream:status()
    if status >= 400 then
      local rest = { line }
      while true do
        local l = self.stream:next(5)
        if not l then break end
        rest[#rest + 1] = l
      end
      self:close()
      status_error(self.client, "watch", status, table.concat(rest, "\n"), M.qualified(self.r))
    end
    if line and line ~= "" then
      local ev = M.decode(line)
      if type(ev) ~= "table" then
        raise { op = "watch", code = "bad_event", retryable = true, message = "watch: cannot decode event: " .. line:sub(1, 100) }
      end
      local obj = ev.object or {}
      if obj.metadata and obj.metadata.resourceVersion then self.rv = obj.metadata.resourceVersion end
      if ev.type == "ERROR" then
        self:close()
        raise { op = "watch", code = tostring(obj.code or "error"), reason = obj.reason, status = obj.code,
          retryable = obj.code == 410, message = "watch " .. M.qualified(self.r) .. ": " .. tostring(obj.message) }
      elseif ev.type ~= "BOOKMARK" then
        return ev.type, obj
      end
    elseif not line and why == "wait" then
      return nil, "wait"
    elseif not line then
      -- the server ended the watch (its timeoutSeconds) or the connection dropped: resume
      self.stream:close()
      self.stream = nil
      if host.now() >= self.deadline then self.ended = true else self:open() end
    end
  end
  return nil, "timeout"
end

--- watch(type, opts, fn): fn(type, object) for each event until it returns a
-- truthy value (returned) or the timeout passes (nil). Without fn: an
-- iterator for a generic for, closed when the loop ends.
function Client:watch(t, opts, fn)
  local w = self:watch_open(t, opts)
  if not fn then
    return function()
      local ty, obj = w:next()
      if ty then return ty, obj end
      w:close()
      return nil
    end, nil, nil, setmetatable({}, { __close = function() w:close() end })
  end
  local ok, res = pcall(function()
    while true do
      local ty, obj = w:next()
      if not ty then return nil end
      local v = fn(ty, obj)
      if v then return v end
    end
  end)
  w:close()
  if not ok then error(res, 0) end
  return res
end

return M
