--- dapr: the Dapr sidecar's HTTP API for runbooks, over the http module.
--
--   dapr.connect{endpoint=, app_id=, token=, timeout="10s", connect_timeout="10s"} -> client
--     endpoint: DAPR_HTTP_ENDPOINT, else http://127.0.0.1:$DAPR_HTTP_PORT (3500);
--     token: DAPR_API_TOKEN when set, sent as dapr-api-token (a secret).
--   Every function below exists on a client (c:healthz()) and on the module,
--   which uses a client made from the environment on first use.
--
--   healthz(), healthz_outbound()  -> true | false, err (not ready is an answer, not an error)
--   metadata()                     -> the sidecar's metadata document
--   publish(pubsub, topic, data, {raw=, cloudevent=, content_type=, metadata={}})
--                                  data: a table (JSON) or a string; wrapped as a CloudEvent
--                                  by Dapr unless raw or cloudevent
--   state.get(store, key, {consistency=, metadata=})  -> value, etag (nil when missing)
--   state.save(store, key, value, {etag=, concurrency=, consistency=, ttl=, metadata=})
--   state.save(store, {{key=, value=, etag=, ...}, ...})
--   state.delete(store, key, {etag=, concurrency=, consistency=})
--   state.bulk(store, keys) -> {{key=, value=, etag=, found=}, ...}
--   state.transaction(store, {{op="upsert"|"delete", key=, value=, etag=}, ...})
--   invoke(app_id, method, {verb=, json= or body=, headers=, query=}) -> {status, headers, body, json}
--                                  method: the app's path ("orders/42"), without a query
--                                  (give query=) or fragment
--   secret(store, name)  -> {key = value}; secret(store) -> every secret; values are secrets
--   check_app(app_id, {components=, topics=, test_publish=}) -> a summary (see below)
--   sidecar_status(namespace, {selector=}) -> pods that should have a daprd sidecar, and whether they do
--   consumer_groups(namespace) -> {{group, app_id, component}...}: the Kafka consumer groups the
--                                  namespace's pub/sub components give their apps
--
-- Writes (publish, state save/delete/transaction, invoke with any verb but
-- GET or HEAD) go through the effect gate: a dry run skips them and they
-- return {skipped=true}; otherwise {ok=true}. The http module decides what
-- is a write from the method alone, so every request here that is not a
-- GET or HEAD is one. Dapr's error bodies ({errorCode,
-- message}) raise structured errors: code is the errorCode, status the HTTP
-- status; an ETag mismatch (409) has code "conflict". A sidecar that cannot
-- be reached raises with curl's reason ("couldnt_connect").
local cjson = require("cjson")
local duration = require("duration")
local host = require("runbook.host")

local api = require("http.api").new("dapr", "sidecar")
local M, Client, raise = api.module, api.Client, api.raise

local function check_name(v, what, op)
  if type(v) ~= "string" or v == "" then
    error(("dapr.%s: %s must be a non-empty string, got %s"):format(op, what, type(v) == "string" and '""' or type(v)), 3)
  end
  return v
end

local function decode_json(body)
  local ok, v = pcall(cjson.decode, body)
  if ok then return v end
end

-- A response of 400 or more as a structured error, from Dapr's error body when it has one.
local function response_error(op, what, r)
  local doc = decode_json(r.body) or {}
  local dapr_code = type(doc) == "table" and doc.errorCode or nil
  local detail = dapr_code and ("%s: %s"):format(dapr_code, tostring(doc.message or "")) or
    (r.body ~= "" and r.body:sub(1, 200):gsub("%s+", " ") or "no body")
  raise {
    op = op, status = r.status, dapr_code = dapr_code,
    code = r.status == 409 and "conflict" or dapr_code or tostring(r.status),
    retryable = r.status >= 500 or r.status == 429 or r.status == 409,
    message = ("%s%s (HTTP %d)"):format(what ~= "" and what .. ": " or "", detail, r.status),
  }
end

--- One request to the sidecar. req: method, path (a list of segments, each
-- escaped by the http module), query, json|body, headers, effect (how a
-- write is named). Raises on failure.
function Client:call(op, what, req)
  local headers = { Accept = "application/json" }
  for k, v in pairs(req.headers or {}) do headers[k] = v end
  if self.token then headers["dapr-api-token"] = self.token end
  local body = req.body
  if req.json ~= nil then
    body = cjson.encode(req.json)
    headers["Content-Type"] = headers["Content-Type"] or "application/json"
  end
  local r = api:request(self, op, what, { method = req.method or "GET", path = req.path, query = req.query,
    headers = headers, body = body, effect = req.effect })
  if r.skipped then return r end
  if r.status >= 400 then response_error(op, what, r) end
  if (r.headers["content-type"] or ""):lower():match("json") and r.body ~= "" then r.json = decode_json(r.body) end
  return r
end

--- A client for one sidecar.
function M.connect(opts)
  opts = api:options(opts, "{endpoint=, app_id=, token=}")
  local endpoint = opts.endpoint or os.getenv("DAPR_HTTP_ENDPOINT")
  if not endpoint or endpoint == "" then
    local port = os.getenv("DAPR_HTTP_PORT")
    if port == nil or port == "" then port = "3500" end
    if not port:match("^%d+$") then error(("DAPR_HTTP_PORT is not a port number: %q"):format(port), 2) end
    endpoint = "http://127.0.0.1:" .. port
  end
  endpoint = api:url(endpoint, "endpoint")
  local token = opts.token or os.getenv("DAPR_API_TOKEN")
  if token == "" then token = nil end
  if token then host.secret(token) end
  local c = api:client(opts, { url = endpoint, endpoint = endpoint, app_id = opts.app_id, token = token }, "10s")
  c.state = setmetatable({}, { __index = function(_, k)
    local f = Client["state_" .. k]
    if f then return function(...) return f(c, ...) end end
  end })
  return c
end

-- ---- health and metadata --------------------------------------------------

local function probe(c, op, path)
  local ok, err = pcall(c.call, c, op, "", { path = path })
  if ok then return true end
  if type(err) ~= "table" or err.code == "interrupted" then error(err, 0) end
  return false, err
end

function Client:healthz() return probe(self, "healthz", { "v1.0", "healthz" }) end

function Client:healthz_outbound() return probe(self, "healthz_outbound", { "v1.0", "healthz", "outbound" }) end

function Client:metadata()
  local r = self:call("metadata", "", { path = { "v1.0", "metadata" } })
  if type(r.json) ~= "table" then
    raise { op = "metadata", code = "bad_response",
      message = "dapr metadata: the sidecar did not answer JSON" }
  end
  return r.json
end

-- ---- pub/sub ----------------------------------------------------------------

local function written(r) return r.skipped and r or { ok = true } end

function Client:publish(pubsub, topic, data, opts)
  check_name(pubsub, "pubsub", "publish")
  check_name(topic, "topic", "publish")
  opts = opts or {}
  local body, ctype
  if type(data) == "table" then
    body, ctype = cjson.encode(data), "application/json"
  elseif type(data) == "string" then
    body, ctype = data, "text/plain"
  else
    error(("dapr.publish: data must be a table or a string, got %s"):format(type(data)), 2)
  end
  if opts.cloudevent then ctype = "application/cloudevents+json" end
  ctype = opts.content_type or ctype
  local query = {}
  for k, v in pairs(opts.metadata or {}) do query["metadata." .. k] = tostring(v) end
  if opts.raw then query["metadata.rawPayload"] = "true" end
  local what = pubsub .. "/" .. topic
  return written(self:call("publish", what, {
    method = "POST", path = { "v1.0", "publish", pubsub, topic }, query = query,
    body = body, headers = { ["Content-Type"] = ctype },
    effect = { module = "dapr", op = "publish", target = what,
      summary = ("publish %d bytes to %s"):format(#body, what) },
  }))
end

-- ---- state ------------------------------------------------------------------

local function state_value(body)
  if body == "" then return nil end
  local v = decode_json(body)
  if v == nil then return body end
  return v
end

local function state_query(opts)
  local q = {}
  if opts.consistency then q.consistency = opts.consistency end
  for k, v in pairs(opts.metadata or {}) do q["metadata." .. k] = tostring(v) end
  return q
end

function Client:state_get(store, key, opts)
  check_name(store, "store", "state.get")
  check_name(key, "key", "state.get")
  local r = self:call("state.get", store .. "/" .. key, {
    path = { "v1.0", "state", store, key }, query = state_query(opts or {}) })
  if r.status == 204 then return nil, nil end
  return state_value(r.body), r.headers.etag
end

local CONCURRENCY = { ["first-write"] = true, ["last-write"] = true }
local CONSISTENCY = { strong = true, eventual = true }

local function state_item(item, op, needs_value)
  check_name(item.key, "key", op)
  if needs_value and item.value == nil then
    error(("dapr.%s: no value for key %s (state.delete removes a key)"):format(op, item.key), 4)
  end
  local o = {}
  if item.concurrency then
    if not CONCURRENCY[item.concurrency] then error(("dapr.%s: concurrency must be first-write or last-write"):format(op), 4) end
    o.concurrency = item.concurrency
  end
  if item.consistency then
    if not CONSISTENCY[item.consistency] then error(("dapr.%s: consistency must be strong or eventual"):format(op), 4) end
    o.consistency = item.consistency
  end
  local md = {}
  for k, v in pairs(item.metadata or {}) do md[k] = tostring(v) end
  if item.ttl then md.ttlInSeconds = tostring(math.ceil(duration.check(item.ttl, op .. " ttl"))) end
  return { key = item.key, value = item.value, etag = item.etag and tostring(item.etag),
    options = next(o) and o or nil, metadata = next(md) and md or nil }
end

function Client:state_save(store, key, value, opts)
  check_name(store, "store", "state.save")
  local items = {}
  if type(key) == "table" then
    for i, item in ipairs(key) do items[i] = state_item(item, "state.save", true) end
    if #items == 0 then error("dapr.state.save: no items to save", 2) end
  else
    local item = { key = key, value = value }
    for k, v in pairs(opts or {}) do item[k] = v end
    items[1] = state_item(item, "state.save", true)
  end
  local keys = {}
  for i, it in ipairs(items) do keys[i] = it.key end
  local body = cjson.encode(items)
  return written(self:call("state.save", store .. "/" .. table.concat(keys, ","), {
    method = "POST", path = { "v1.0", "state", store }, body = body,
    headers = { ["Content-Type"] = "application/json" },
    effect = { module = "dapr", op = "state.save", target = store .. "/" .. table.concat(keys, ","),
      summary = ("save %d key(s) in %s: %s"):format(#items, store, table.concat(keys, ", ")) },
  }))
end

function Client:state_delete(store, key, opts)
  check_name(store, "store", "state.delete")
  check_name(key, "key", "state.delete")
  opts = opts or {}
  local q = state_query(opts)
  if opts.concurrency then q.concurrency = opts.concurrency end
  return written(self:call("state.delete", store .. "/" .. key, {
    method = "DELETE", path = { "v1.0", "state", store, key }, query = q,
    headers = opts.etag and { ["If-Match"] = tostring(opts.etag) } or nil,
    effect = { module = "dapr", op = "state.delete", target = store .. "/" .. key,
      summary = ("delete %s from %s"):format(key, store) },
  }))
end

-- Dapr's bulk get is a POST, and every POST is a write to the gate (skipped
-- in a dry run): one GET per key keeps a read a read.
function Client:state_bulk(store, keys)
  check_name(store, "store", "state.bulk")
  if type(keys) ~= "table" then error("dapr.state.bulk: keys must be a list of keys", 2) end
  for _, k in ipairs(keys) do check_name(k, "each key", "state.bulk") end
  local out = {}
  for i, key in ipairs(keys) do
    local value, etag = self:state_get(store, key)
    out[i] = { key = key, value = value, etag = etag, found = value ~= nil }
  end
  return out
end

function Client:state_transaction(store, ops, opts)
  check_name(store, "store", "state.transaction")
  if type(ops) ~= "table" or #ops == 0 then error("dapr.state.transaction: ops must be a non-empty list", 2) end
  local list, names = {}, {}
  for i, o in ipairs(ops) do
    local op = o.op or o.operation
    if op ~= "upsert" and op ~= "delete" then
      error(("dapr.state.transaction: ops[%d].op must be \"upsert\" or \"delete\""):format(i), 2)
    end
    local req = state_item(o, "state.transaction", op == "upsert")
    if op == "delete" then req.value = nil end
    list[i] = { operation = op, request = req }
    names[i] = op .. " " .. o.key
  end
  local md = {}
  for k, v in pairs(opts and opts.metadata or {}) do md[k] = tostring(v) end
  return written(self:call("state.transaction", store, {
    method = "POST", path = { "v1.0", "state", store, "transaction" },
    body = cjson.encode { operations = list, metadata = next(md) and md or nil },
    headers = { ["Content-Type"] = "application/json" },
    effect = { module = "dapr", op = "state.transaction", target = store,
      summary = ("apply a transaction to %s: %s"):format(store, table.concat(names, ", ")) },
  }))
end

-- ---- invoke and secrets -------------------------------------------------------

function Client:invoke(app_id, method, opts)
  check_name(app_id, "app_id", "invoke")
  check_name(method, "method", "invoke")
  if method:find("[?#]") then
    error(("dapr.invoke: method %q carries a query or fragment; give query parameters as opts.query"):format(method), 2)
  end
  opts = opts or {}
  local verb = (opts.verb or ((opts.json ~= nil or opts.body ~= nil) and "POST" or "GET")):upper()
  if not verb:match("^%a+$") then error("dapr.invoke: verb must be a word such as \"POST\"", 2) end
  local body = opts.body
  local headers = {}
  for k, v in pairs(opts.headers or {}) do headers[k] = v end
  if opts.json ~= nil then
    body = cjson.encode(opts.json)
    headers["Content-Type"] = headers["Content-Type"] or "application/json"
  end
  local path = { "v1.0", "invoke", app_id, "method" }
  for seg in method:gmatch("[^/]+") do path[#path + 1] = seg end
  local what = app_id .. "/" .. table.concat(path, "/", 5)
  return self:call("invoke", what, {
    method = verb, path = path, query = opts.query, body = body, headers = headers,
    effect = { module = "dapr", op = "invoke", target = what,
      summary = ("invoke %s %s (%d bytes)"):format(verb, what, body and #body or 0) },
  })
end

local function register_all(t)
  for _, v in pairs(t) do
    if type(v) == "string" then host.secret(v) elseif type(v) == "table" then register_all(v) end
  end
  return t
end

function Client:secret(store, name)
  check_name(store, "store", "secret")
  if name ~= nil then check_name(name, "name", "secret") end
  local r = self:call("secret", store .. "/" .. (name or "bulk"), { path = { "v1.0", "secrets", store, name or "bulk" } })
  if type(r.json) ~= "table" then
    raise { op = "secret", code = "bad_response",
      message = ("dapr secret %s: the sidecar did not answer a JSON object"):format(store) }
  end
  return register_all(r.json)
end

-- ---- checks -------------------------------------------------------------------

--- One app's Dapr wiring, as seed 002's "Dapr Pub/Sub Not Working" checks it:
--   opts.components   {name = "pubsub.kafka", ...}: components that must be loaded, of those types
--   opts.topics       {"task-events", ...} or {"kafka-pubsub/task-events"}: subscriptions that must exist
--   opts.test_publish {pubsub=, topic=, confirm = function(event) -> true when seen}:
--                     publish a test event (through the gate; Kafka key = its check_id)
--                     and let confirm find it on the topic, e.g. with the kafka module;
--                     event = {check_id, pubsub, topic, data}
-- Returns {app_id, ok, healthy, outbound, components = {name = type},
--   subscriptions = {"pubsub/topic", ...}, publish = {...}, problems = {"...", ...}}.
-- Problems are reported, not raised; a sidecar that cannot be reached is a problem too.
function Client:check_app(app_id, opts)
  app_id = app_id or self.app_id
  check_name(app_id, "app_id", "check_app")
  opts = opts or {}
  local rep = { app_id = app_id, endpoint = self.endpoint, problems = {}, components = {}, subscriptions = {} }
  local function problem(fmt, ...) rep.problems[#rep.problems + 1] = fmt:format(...) end

  local err
  rep.healthy, err = self:healthz()
  if not rep.healthy then problem("sidecar not healthy: %s", tostring(err and err.message)) end
  rep.outbound, err = self:healthz_outbound()
  if not rep.outbound then problem("sidecar outbound not ready: %s", tostring(err and err.message)) end

  local ok, md = pcall(self.metadata, self)
  if not ok then
    if type(md) ~= "table" or md.code == "interrupted" then error(md, 0) end
    problem("metadata unavailable: %s", tostring(md.message))
    md = nil
  end
  if md then
    if md.id ~= app_id then problem("the sidecar at %s belongs to app %s, not %s", self.endpoint, tostring(md.id), app_id) end
    rep.runtime_version = md.runtimeVersion
    for _, c in ipairs(md.components or {}) do rep.components[c.name] = c.type end
    local subs = {}
    for _, s in ipairs(md.subscriptions or {}) do
      subs[#subs + 1] = s.pubsubname .. "/" .. s.topic
      subs[s.topic], subs[s.pubsubname .. "/" .. s.topic] = true, true
    end
    for name, ty in pairs(opts.components or {}) do
      if not rep.components[name] then problem("component %s (%s) is not loaded", name, ty)
      elseif rep.components[name] ~= ty then problem("component %s is %s, expected %s", name, rep.components[name], ty) end
    end
    for _, t in ipairs(opts.topics or {}) do
      if not subs[t] then problem("no subscription to %s", t) end
    end
    for _, s in ipairs(subs) do rep.subscriptions[#rep.subscriptions + 1] = s end
    table.sort(rep.subscriptions)
    rep.app_connection = md.appConnectionProperties
  end

  if opts.test_publish then self:check_publish(rep, opts.test_publish, problem) end
  rep.ok = #rep.problems == 0
  return rep
end

local function new_event_id()
  local f = io.open("/dev/urandom", "rb")
  local bytes = f and f:read(8) or tostring(host.now())
  if f then f:close() end
  return "runbook-check-" .. bytes:gsub(".", function(c) return ("%02x"):format(c:byte()) end)
end

function Client:check_publish(rep, tp, problem)
  local pubsub, topic = tp.pubsub, tp.topic
  check_name(pubsub, "test_publish.pubsub", "check_app")
  check_name(topic, "test_publish.topic", "check_app")
  local event = { check_id = new_event_id(), app_id = rep.app_id, source = "runbook dapr.check_app" }
  rep.publish = { pubsub = pubsub, topic = topic, check_id = event.check_id }
  -- keyed by the check id, so a reader of the topic can pick it out
  local ok, res = pcall(self.publish, self, pubsub, topic, event, { metadata = { partitionKey = event.check_id } })
  if not ok then
    if type(res) ~= "table" or res.code == "interrupted" then error(res, 0) end
    rep.publish.error = res.message
    return problem("test publish to %s/%s failed: %s", pubsub, topic, tostring(res.message))
  end
  if res.skipped then rep.publish.skipped = true; return end
  rep.publish.published = true
  if tp.confirm then
    local cok, seen = pcall(tp.confirm, { check_id = event.check_id, pubsub = pubsub, topic = topic, data = event })
    host.check_deadline() -- a confirm that ran out the step's time or was interrupted stops here
    rep.publish.confirmed = cok and seen and true or false
    if not rep.publish.confirmed then
      problem("test event %s published to %s/%s but not seen on the topic%s", event.check_id, pubsub, topic,
        cok and "" or (": " .. tostring(type(seen) == "table" and seen.message or seen)))
    end
  end
end

-- The daprd sidecar of `pod` (app `app_id`): {pod, app_id, injected, ready, restarts, problem}.
local function sidecar_row(pod, app_id)
  local row = { pod = pod.metadata.name, app_id = app_id, injected = false, ready = false, restarts = 0 }
  for _, list_name in ipairs { "containers", "initContainers" } do
    for _, c in ipairs((pod.spec or {})[list_name] or {}) do
      if c.name == "daprd" then row.injected = true end
    end
  end
  for _, list_name in ipairs { "containerStatuses", "initContainerStatuses" } do
    for _, cs in ipairs((pod.status or {})[list_name] or {}) do
      if cs.name == "daprd" then row.ready, row.restarts = cs.ready == true, cs.restartCount or 0 end
    end
  end
  if not row.injected then
    row.problem = "no daprd container: the sidecar was not injected (check the injector and the annotations)"
  elseif not row.ready then
    row.problem = "daprd is not ready"
  end
  return row
end

--- Pods in `namespace` that should run a daprd sidecar (annotation
-- dapr.io/enabled: "true"), with whether it is there and ready (seed 002
-- "Dapr Sidecar Not Injected"). Needs the k8s module; opts.selector narrows
-- the pods (a label selector).
-- Returns {ok, pods = {{pod, app_id, injected, ready, restarts, problem}, ...}}.
function M.sidecar_status(namespace, opts)
  check_name(namespace, "namespace", "sidecar_status")
  local items = require("k8s").list("pods", { namespace = namespace, selector = opts and opts.selector })
  table.sort(items, function(a, b) return a.metadata.name < b.metadata.name end)
  local out = { ok = true, pods = {} }
  for _, pod in ipairs(items) do
    local ann = pod.metadata.annotations or {}
    if ann["dapr.io/enabled"] == "true" then
      local row = sidecar_row(pod, ann["dapr.io/app-id"])
      out.ok = out.ok and not row.problem
      out.pods[#out.pods + 1] = row
    end
  end
  return out
end

--- The Kafka consumer groups the namespace's Dapr pub/sub components give the
-- apps they are scoped to (every Dapr-enabled deployment without scopes):
-- each component's consumerGroup, else its consumerID, else the app id, with
-- "{appID}" replaced as daprd replaces it. For brokers that cannot list their
-- groups (ListGroups; librdkafka's mock brokers). Needs the k8s module.
-- Returns {{group, app_id, component}, ...} sorted by group, each group once.
function M.consumer_groups(namespace)
  check_name(namespace, "namespace", "consumer_groups")
  local k8s = require("k8s")
  local apps = {}
  for _, d in ipairs(k8s.list("deployments", { namespace = namespace })) do
    local ann = d.spec.template.metadata and d.spec.template.metadata.annotations or {}
    if ann["dapr.io/enabled"] == "true" and ann["dapr.io/app-id"] then apps[#apps + 1] = ann["dapr.io/app-id"] end
  end
  local out, seen = {}, {}
  for _, c in ipairs(k8s.list("components.dapr.io", { namespace = namespace })) do
    if (c.spec or {}).type == "pubsub.kafka" then
      local md = {}
      for _, m in ipairs(c.spec.metadata or {}) do md[m.name] = m.value end
      local scoped = {}
      for _, app in ipairs(c.scopes or {}) do scoped[app] = true end
      for _, app in ipairs(apps) do
        if not c.scopes or scoped[app] then
          local group = tostring(md.consumerGroup or md.consumerID or app):gsub("{appID}", (app:gsub("%%", "%%%%")))
          if not seen[group] then
            seen[group] = true
            out[#out + 1] = { group = group, app_id = app, component = c.metadata.name }
          end
        end
      end
    end
  end
  table.sort(out, function(a, b) return a.group < b.group end)
  return out
end

-- ---- the module-level client ---------------------------------------------------

local client = api:export { "healthz", "healthz_outbound", "metadata", "publish", "invoke", "secret", "check_app" }

M.state = setmetatable({}, { __index = function(_, k)
  local f = Client["state_" .. k]
  if f then return function(...) return f(client(), ...) end end
end })

return M
