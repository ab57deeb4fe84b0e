--- redis: Redis for runbooks, over hiredis (modules/redis.c).
--
--   local r <close> = redis.connect(url, opts)  url defaults to $REDIS_URL
--       redis://[user:password@]host[:port][/db], or rediss:// for TLS;
--       opts: connect_timeout, timeout, ca_file (rediss://: the CA to verify the server with;
--       default the system's store)
--   r:command("HGET", key, field) -> reply      any command
--   r:pipeline(function(p) p:command(...) ... end) -> {replies}   one round trip
--   r:scan(pattern, opts) -> iterator over keys (SCAN, never KEYS); opts.count, opts.type
--   r:info(section) -> {field = value, ...}     numbers converted, dbN parsed
--   r:ping() -> "PONG"
--   r:is_write(name, args...) -> boolean       how the dry run classifies a command
--   r:dapr_keys(app, pattern) -> {keys}         Dapr state keys of an app ("<app>||<key>"), sorted, each once
--   r:dapr_get(app, key) -> {data, version} | nil   data JSON-decoded when it is JSON
--   redis.null                                  nil inside arrays (the same value as json.null)
--
-- The same functions exist as redis.command(...), redis.scan(...) etc., on one
-- shared connection to $REDIS_URL opened on first use.
--
-- Replies: bulk and status strings are strings, integers integers, arrays
-- tables, nil is nil (redis.null inside arrays). Error replies raise with the
-- error's first word as the code ("WRONGTYPE", "NOAUTH"); connection failures
-- raise "connection_refused", "timeout", "connection_closed"; TLS failures
-- "tls_verify" (the certificate or its name) and "tls_error".
--
-- r:is_write(name, args...) tells how the gate classifies a command: by the
-- server's own metadata (COMMAND INFO, per subcommand for containers such as
-- ACL, CLIENT, CONFIG), asked once per command name and connection. Commands
-- flagged readonly and a short list of introspection subcommands (CONFIG GET,
-- CLIENT LIST, SLOWLOG GET, ACL LOG with at most a count...) are reads;
-- everything else writes, including scripts (EVAL, FCALL; EVAL_RO and
-- FCALL_RO are reads), MULTI/EXEC and commands the server does not know. A dry
-- run reports writes without sending them and returns {skipped = true}.
local native = require("runbook.redis")
local json = require("json")
local duration = require("duration")

native.set_null(json.null)

local redis = { null = json.null }
local conn = native.methods

function redis.connect(url, opts)
  if url ~= nil and type(url) ~= "string" then error("redis.connect: the URL must be a string", 2) end
  url = url or os.getenv("REDIS_URL")
  if not url or url == "" then error("redis.connect: no URL given and REDIS_URL is not set", 2) end
  opts = opts or {}
  if opts.ca_file ~= nil and type(opts.ca_file) ~= "string" then error("redis.connect: ca_file must be a path", 2) end
  return native.connect(url, {
    connect_timeout = opts.connect_timeout and duration.check(opts.connect_timeout, "redis connect_timeout"),
    timeout = opts.timeout and duration.check(opts.timeout, "redis timeout"),
    ca_file = opts.ca_file,
  })
end

-- The native one from the module, not from `conn`: redis.lua replaces
-- conn.pipeline, and a second load (another environment) would wrap the wrapper.
local native_pipeline = native.pipeline

--- fn gets a pipe with :command(...) (and the same shortcuts); the commands
-- are sent together when fn returns and the replies come back in order.
function conn:pipeline(fn)
  if type(fn) ~= "function" then error("pipeline expects a function", 2) end
  local cmds = {}
  local pipe = {}
  function pipe:command(...)
    if select("#", ...) == 0 then error("pipeline: expected a command", 2) end
    cmds[#cmds + 1] = { ... }
  end
  fn(pipe)
  if #cmds == 0 then return {} end
  return native_pipeline(self, cmds)
end

function conn:ping() return self:command("PING") end

--- Iterates over the keys matching `pattern` with SCAN (a key may repeat if
-- the keyspace is resized meanwhile, as SCAN documents).
function conn:scan(pattern, opts)
  opts = opts or {}
  local args = { "MATCH", pattern or "*", "COUNT", opts.count or 1000 }
  if opts.type then args[#args + 1] = "TYPE"; args[#args + 1] = opts.type end
  local cursor, batch, i = "0", {}, 0
  local started = false
  return function()
    while true do
      i = i + 1
      if batch[i] then return batch[i] end
      if started and cursor == "0" then return nil end
      started = true
      local reply = self:command("SCAN", cursor, table.unpack(args))
      cursor, batch, i = reply[1], reply[2], 0
    end
  end
end

local function convert(v)
  return math.tointeger(tonumber(v)) or (v:match("^%-?%d+%.%d+$") and tonumber(v)) or v
end

--- INFO parsed: {redis_version = "7.0.15", connected_clients = 3,
-- db0 = {keys = 120, expires = 0, avg_ttl = 0}, ...}.
function conn:info(section)
  local text = section and self:command("INFO", section) or self:command("INFO")
  local out = {}
  for line in text:gmatch("[^\r\n]+") do
    local k, v = line:match("^([^#:][^:]*):(.*)$")
    if k then
      if k:match("^db%d+$") then
        local t = {}
        for fk, fv in v:gmatch("([%w_]+)=([^,]*)") do t[fk] = convert(fv) end
        out[k] = t
      else
        out[k] = convert(v)
      end
    end
  end
  return out
end

-- Dapr's Redis state store keeps <appid>||<key> hashes with data and version.
local function app_prefix(app)
  if type(app) ~= "string" or app == "" then error("dapr state: expected an app id", 3) end
  return app .. "||"
end

function conn:dapr_keys(app, pattern)
  local prefix = app_prefix(app)
  local keys, seen = {}, {}
  for k in self:scan(prefix .. (pattern or "*"), { type = "hash" }) do
    if not seen[k] then seen[k] = true; keys[#keys + 1] = k:sub(#prefix + 1) end
  end
  table.sort(keys)
  return keys
end

function conn:dapr_get(app, key)
  local fields = self:command("HGETALL", app_prefix(app) .. key)
  if #fields == 0 then return nil end
  local h = {}
  for i = 1, #fields, 2 do h[fields[i]] = fields[i + 1] end
  local ok, data = pcall(json.decode, h.data or "")
  return { data = ok and data or h.data, version = math.tointeger(tonumber(h.version)) or h.version, raw = h.data }
end

-- ---- the shared connection --------------------------------------------------

local shared
for _, name in ipairs { "command", "pipeline", "ping", "scan", "info", "dapr_keys", "dapr_get" } do
  redis[name] = function(...)
    shared = shared or redis.connect()
    return shared[name](shared, ...)
  end
end

return redis
