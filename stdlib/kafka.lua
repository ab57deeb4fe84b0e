--- kafka: topics, consumer lag, offset resets, produce and consume, topic
-- backup/restore and DLQ replay, over librdkafka (modules/kafka.c).
--
--   kafka.connect{brokers = "h:9092,...", ["security.protocol"] = "SASL_SSL", ...,
--                 timeout = "30s", connect_timeout = "10s"} -> client
--     connect_timeout: a broker connection's setup (TCP, TLS, SASL, ApiVersion);
--     librdkafka retries it within each call's timeout.
--     any other key is a librdkafka property; passwords never print.
--     kafka.xxx(...) is the default client's xxx (brokers from KAFKA_BROKERS).
--
-- Reads
--   topics()                     {{name, partitions, error}} (no internal topics)
--   describe_topic(name)         {name, partitions = {{partition, leader, replicas, isr,
--                                 low, high, messages, under_replicated}}, messages}
--   brokers{probe_timeout}       {{id, host, port, reachable, reason, leader_for}}
--   watermarks(topic)            {[partition] = {low, high}}
--   lag{group | groups, topics}  per partition committed/high/lag, totals per topic and group
--   consume{topic, from, from_offsets, partitions, max_messages, timeout, follow} -> iterator
--     {topic, partition, offset, key, value, headers = {{name, value}}, timestamp}
--   describe_group(name)  list_groups()  describe_configs(topic)
-- Writes (through the effect gate)
--   reset_offsets{group, topics, partitions, to = "earliest"|"latest"|{offset=N}|{shift=-N}
--                 |{datetime="2025-12-31T10:00:00Z"}} -> plan (only the plan in a dry run)
--   produce{topic, key, value, headers, partition, timestamp} or produce{topic, messages = {...}}
--   backup_topic{topic, file}  restore_topic{file, topic}
--   replay{from_topic, to_topic, max, filter, group}
--   create_topic{name, partitions, replication_factor, config}  create_partitions{topic, total}
--   alter_topic_config{topic, set = {...}, delete = {...}}
-- Pretty text: kafka.format_lag(result), kafka.format_plan(plan)
--
-- Errors are structured (module "kafka"); code is librdkafka's error name
-- ("UNKNOWN_TOPIC_OR_PART", "_UNSUPPORTED_FEATURE"), "timeout" for a
-- timeout (as in every module), or "bad_argument" for a call that cannot be right.
local native = require("runbook.kafka")
local host = require("runbook.host")
local library_effect = require("runbook.effect").library
local json = require("json")
local duration = require("duration")
local base64 = require("base64")

local M = { librdkafka_version = native.librdkafka_version }
local Client = {}
Client.__index = Client

local EARLIEST, LATEST = -2, -1
local API = { DescribeGroups = 15, ListGroups = 16, DescribeConfigs = 32 }

local raise = host.raiser "kafka"

local function bad(op, message) raise { op = op, code = "bad_argument", message = message } end

local function log()
  return require("log")
end

--- opts must be a table, and each field named after it a non-empty string.
local function check_opts(op, opts, ...)
  if type(opts) ~= "table" then bad(op, "expected a table of options, got " .. type(opts)) end
  for _, field in ipairs { ... } do
    if type(opts[field]) ~= "string" or opts[field] == "" then bad(op, field .. " is required") end
  end
  return opts
end

local function timeout_of(self, op, opts)
  if opts and opts.timeout ~= nil then
    local t, err = duration.parse(opts.timeout)
    if not t or t <= 0 then bad(op, "timeout: " .. (err or "must be positive")) end
    return t
  end
  return self.timeout
end

local function list_of(op, v, what)
  if type(v) == "string" then return { v } end
  if type(v) ~= "table" or #v == 0 then bad(op, what .. " must be a name or a list of names") end
  for _, x in ipairs(v) do
    if type(x) ~= "string" or x == "" then bad(op, what .. " must be names (strings)") end
  end
  return v
end

local function tp_key(topic, partition) return topic .. "\0" .. partition end

local function by_topic_partition(a, b)
  if a.topic ~= b.topic then return a.topic < b.topic end
  return a.partition < b.partition
end

local function raise_item_error(op, what, e)
  raise { op = op, code = e.code, message = ("%s: %s"):format(what, e.message),
    retryable = e.code == "timeout" or e.code == "_TRANSPORT" }
end

-- ---- connecting -----------------------------------------------------------

local clients = {}

--- A client for these settings; the same settings give the same client, so a
-- run keeps one connection per cluster however many steps use it.
function M.connect(opts)
  opts = check_opts("connect", opts or {})
  local props, keys = {}, {}
  for k, v in pairs(opts) do
    if type(k) ~= "string" then bad("connect", "option names must be strings") end
    if k == "brokers" then
      props["bootstrap.servers"] = type(v) == "table" and table.concat(v, ",") or tostring(v)
    elseif k ~= "timeout" and k ~= "connect_timeout" then
      if type(v) ~= "string" and type(v) ~= "number" and type(v) ~= "boolean" then
        bad("connect", ("property %s must be a string"):format(k))
      end
      props[k] = tostring(v)
    end
  end
  props["bootstrap.servers"] = props["bootstrap.servers"] or os.getenv("KAFKA_BROKERS")
  -- a broker connection (TCP, TLS, SASL, ApiVersion) that is not up in time is retried
  local connect = opts.connect_timeout or not props["socket.connection.setup.timeout.ms"] and "10s"
  if connect then
    local secs, err = duration.parse(connect)
    if not secs or secs <= 0 then bad("connect", "connect_timeout: " .. (err or "must be positive")) end
    props["socket.connection.setup.timeout.ms"] = tostring(math.ceil(secs * 1000))
  end
  if not props["bootstrap.servers"] or props["bootstrap.servers"] == "" then
    raise { op = "connect", code = "no_brokers",
      message = "no brokers: set KAFKA_BROKERS or call kafka.connect{brokers = \"host:9092\"}" }
  end
  for k in pairs(props) do keys[#keys + 1] = k end
  table.sort(keys)
  local id = {}
  for _, k in ipairs(keys) do id[#id + 1] = k .. "=" .. props[k] end
  id[#id + 1] = "timeout=" .. tostring(opts.timeout)
  id = table.concat(id, "\n")
  if clients[id] then return clients[id] end
  local self = setmetatable({
    native = native.new(props),
    bootstrap = props["bootstrap.servers"],
    plaintext = (props["security.protocol"] or "plaintext"):lower() == "plaintext",
    timeout = 30,
  }, Client)
  self.timeout = timeout_of(self, "connect", opts)
  clients[id] = self
  return self
end

local default
local function default_client()
  default = default or M.connect()
  return default
end

--- Closes every client (the engine's end of run; specs).
function M.close_all()
  for id, c in pairs(clients) do
    c.native:close()
    clients[id] = nil
  end
  default = nil
end

-- ---- metadata -------------------------------------------------------------

function Client:metadata(opts)
  return self.native:metadata(timeout_of(self, "metadata", opts))
end

local function find_topic(md, name)
  for _, t in ipairs(md.topics) do
    if t.name == name then return t end
  end
end

--- {{topic, partition}} of the named topics: all partitions, or those numbered
-- in the list `partitions`.
local function partitions_of(op, md, topics, partitions)
  local only
  if partitions then
    only = {}
    for _, p in ipairs(partitions) do only[p] = true end
  end
  local out = {}
  for _, name in ipairs(topics) do
    local t = find_topic(md, name)
    if not t or (t.error and t.error.code == "UNKNOWN_TOPIC_OR_PART") then
      raise { op = op, code = "UNKNOWN_TOPIC_OR_PART", message = ("topic %s does not exist"):format(name) }
    elseif t.error then
      raise_item_error(op, "topic " .. name, t.error)
    end
    for _, p in ipairs(t.partitions) do
      if not only or only[p.partition] then out[#out + 1] = { topic = name, partition = p.partition } end
    end
  end
  return out
end

function Client:topics(opts)
  local md = self:metadata(opts)
  local out = {}
  for _, t in ipairs(md.topics) do
    if not t.name:match("^__") or (opts and opts.internal) then
      out[#out + 1] = { name = t.name, partitions = #t.partitions, error = t.error }
    end
  end
  table.sort(out, function(a, b) return a.name < b.name end)
  return out
end

--- {[key(topic, partition)] = {low, high}} in two batched ListOffsets rounds
-- (one, for the high watermarks only, when high_only).
function Client:_watermarks(parts, timeout, op, high_only)
  local marks = {}
  for _, which in ipairs(high_only and { LATEST } or { EARLIEST, LATEST }) do
    local req = {}
    for i, p in ipairs(parts) do req[i] = { topic = p.topic, partition = p.partition, offset = which } end
    for _, r in ipairs(#req > 0 and self.native:offsets(req, timeout) or {}) do
      if r.error then raise_item_error(op, ("%s [%d]"):format(r.topic, r.partition), r.error) end
      local k = tp_key(r.topic, r.partition)
      marks[k] = marks[k] or {}
      marks[k][which == EARLIEST and "low" or "high"] = r.offset
    end
  end
  return marks
end

function Client:watermarks(topic, opts)
  local t = timeout_of(self, "watermarks", opts)
  local parts = partitions_of("watermarks", self.native:metadata(t), list_of("watermarks", topic, "topic"))
  local marks, out = self:_watermarks(parts, t, "watermarks"), {}
  for _, p in ipairs(parts) do out[p.partition] = marks[tp_key(p.topic, p.partition)] end
  return out
end

function Client:describe_topic(name, opts)
  if type(name) ~= "string" then bad("describe_topic", "expected a topic name") end
  local t = timeout_of(self, "describe_topic", opts)
  local md = self.native:metadata(t)
  local parts = partitions_of("describe_topic", md, { name })
  local marks = self:_watermarks(parts, t, "describe_topic")
  local out, total = {}, 0
  for i, p in ipairs(find_topic(md, name).partitions) do
    local m = marks[tp_key(name, p.partition)]
    out[i] = {
      partition = p.partition, leader = p.leader, replicas = p.replicas, isr = p.isr, error = p.error,
      low = m.low, high = m.high, messages = m.high - m.low, under_replicated = #p.isr < #p.replicas,
    }
    total = total + out[i].messages
  end
  table.sort(out, function(a, b) return a.partition < b.partition end)
  return { name = name, partitions = out, messages = total }
end

--- The request types a broker supports, from one ApiVersions exchange
-- (plaintext listeners only; elsewhere nil: assume a real broker).
function Client:_apis()
  if self.apis ~= nil or not self.plaintext then return self.apis or nil end
  for addr in self.bootstrap:gmatch("[^,%s]+") do
    local h, port = addr:match("^(.*):(%d+)$")
    if h then
      local ok, apis = native.probe(h:gsub("^%a+://", ""):gsub("^%[(.*)%]$", "%1"), tonumber(port), 5, true)
      if ok then
        self.apis = apis
        return apis
      end
    end
  end
  self.apis = false
  return nil
end

-- librdkafka 2.0.2 stops answering metadata and admin requests after it
-- sends a group request the broker does not support: ask the broker first.
function Client:_require_api(op, name)
  local apis = self:_apis()
  if apis and not apis[API[name]] then
    raise { op = op, code = "_UNSUPPORTED_FEATURE",
      message = ("the broker does not support %s requests (a mock or very old broker)"):format(name) }
  end
end

function Client:brokers(opts)
  opts = opts or {}
  local probe_timeout = opts.probe_timeout and duration.check(opts.probe_timeout, "kafka.brokers probe_timeout") or 2
  local ok, md = pcall(self.metadata, self, opts)
  local list, leads = {}, {}
  if ok then
    for _, t in ipairs(md.topics) do
      for _, p in ipairs(t.partitions) do leads[p.leader] = (leads[p.leader] or 0) + 1 end
    end
    for _, b in ipairs(md.brokers) do list[#list + 1] = { id = b.id, host = b.host, port = b.port } end
  else
    -- no broker answered: probe the bootstrap list so the outage is described
    for addr in self.bootstrap:gmatch("[^,%s]+") do
      local h, port = addr:match("^(.*):(%d+)$")
      if h then list[#list + 1] = { host = h, port = tonumber(port) } end
    end
  end
  for _, b in ipairs(list) do
    local up, why = native.probe(b.host, b.port, probe_timeout, self.plaintext)
    b.reachable, b.reason, b.leader_for = up, not up and why or nil, b.id and (leads[b.id] or 0) or nil
  end
  table.sort(list, function(a, b) return (a.id or 0) < (b.id or 0) end)
  return list
end

-- ---- lag ------------------------------------------------------------------

local function all_partitions(md)
  local out = {}
  for _, t in ipairs(md.topics) do
    if not t.name:match("^__") then
      for _, p in ipairs(t.partitions) do out[#out + 1] = { topic = t.name, partition = p.partition } end
    end
  end
  return out
end

--- Committed offsets per group: {[group] = {{topic, partition, offset}}}.
-- Without topics the broker is asked for every committed partition; where it
-- returns none (older brokers and the mock ignore the empty request) every
-- topic partition is asked for explicitly and those without an offset dropped.
-- While a group's coordinator moves, OffsetFetch answers NOT_COORDINATOR or
-- COORDINATOR_NOT_AVAILABLE / _LOAD_IN_PROGRESS, or its coordinator cannot be
-- reached (_TRANSPORT); the next request looks the coordinator up again, so
-- those groups (or the whole call) are asked again, a few times, within `t`.
local COORDINATOR_MOVING = { NOT_COORDINATOR = true, COORDINATOR_NOT_AVAILABLE = true,
  COORDINATOR_LOAD_IN_PROGRESS = true, _TRANSPORT = true }

function Client:_group_offsets(req, t)
  local deadline, delay, out = host.now() + t, 0.1, {}
  while true do
    local ok, res = pcall(self.native.group_offsets, self.native, req, math.max(deadline - host.now(), 0.001))
    local again = {}
    if ok then
      for _, r in ipairs(req) do
        local g = res[r.group]
        out[r.group] = g
        if g and g.error and COORDINATOR_MOVING[g.error.code] then again[#again + 1] = r end
      end
    elseif type(res) == "table" and COORDINATOR_MOVING[res.code] then
      again = req
    else
      error(res, 0)
    end
    if #again == 0 then return out end
    if host.now() + delay >= deadline then
      if not ok then error(res, 0) end
      return out
    end
    host.sleep(delay)
    delay = math.min(delay * 2, 1)
    req = again
  end
end

function Client:_committed(groups, parts, md, t, op)
  local req = {}
  for i, g in ipairs(groups) do req[i] = { group = g, partitions = parts } end
  local res = self:_group_offsets(req, t)
  if not parts then
    local again = {}
    for _, g in ipairs(groups) do
      if res[g] and not res[g].error and #res[g].partitions == 0 then
        again[#again + 1] = { group = g, partitions = all_partitions(md) }
      end
    end
    if #again > 0 then
      for g, r in pairs(self:_group_offsets(again, t)) do
        local kept = {}
        for _, p in ipairs(r.partitions) do
          if p.offset >= 0 then kept[#kept + 1] = p end
        end
        r.partitions = kept
        res[g] = r
      end
    end
  end
  for _, g in ipairs(groups) do
    if not res[g] then raise { op = op, code = "_BAD_MSG", message = ("no answer for group %s"):format(g) } end
    if res[g].error then raise_item_error(op, "group " .. g, res[g].error) end
    for _, p in ipairs(res[g].partitions) do
      if p.error then raise_item_error(op, ("group %s %s [%d]"):format(g, p.topic, p.partition), p.error) end
    end
  end
  return res
end

local function group_lag(group, committed, marks)
  local r = { group = group, partitions = {}, topics = {}, total = 0, no_offset = 0 }
  for _, p in ipairs(committed) do
    local m = marks[tp_key(p.topic, p.partition)]
    local c = p.offset >= 0 and p.offset or nil
    local row = { topic = p.topic, partition = p.partition, committed = c, high = m.high }
    local t = r.topics[p.topic] or { lag = 0, partitions = 0, no_offset = 0 }
    r.topics[p.topic] = t
    t.partitions = t.partitions + 1
    if c then
      row.lag = math.max(m.high - c, 0)
      t.lag, r.total = t.lag + row.lag, r.total + row.lag
      if not r.max or row.lag > r.max.lag then r.max = row end
    else
      t.no_offset, r.no_offset = t.no_offset + 1, r.no_offset + 1
    end
    r.partitions[#r.partitions + 1] = row
  end
  table.sort(r.partitions, by_topic_partition)
  return r
end

--- Consumer lag: lag{group = "g", topics = {...}} -> result, or
-- lag{groups = {...}} -> {results..., total = n}. One OffsetFetch per group
-- (all in flight at once) and one ListOffsets per leader broker.
function Client:lag(opts)
  check_opts("lag", opts)
  if (opts.group == nil) == (opts.groups == nil) then bad("lag", "give group = \"name\" or groups = {...}") end
  local groups = opts.groups and list_of("lag", opts.groups, "groups") or list_of("lag", opts.group, "group")
  local t = timeout_of(self, "lag", opts)
  local md = self.native:metadata(t)
  local parts = opts.topics and partitions_of("lag", md, list_of("lag", opts.topics, "topics"))
  local committed = self:_committed(groups, parts, md, t, "lag")
  local seen, union = {}, {}
  for _, g in ipairs(groups) do
    for _, p in ipairs(committed[g].partitions) do
      local k = tp_key(p.topic, p.partition)
      if not seen[k] then seen[k], union[#union + 1] = true, p end
    end
  end
  local marks = self:_watermarks(union, t, "lag", true)
  if opts.group then return group_lag(groups[1], committed[groups[1]].partitions, marks) end
  local out = { total = 0 }
  for i, g in ipairs(groups) do
    out[i] = group_lag(g, committed[g].partitions, marks)
    out.total = out.total + out[i].total
  end
  return out
end

local function pad(s, n) s = tostring(s); return s .. string.rep(" ", n - #s) end

--- kafka-consumer-groups --describe style text for a lag result.
function M.format_lag(r)
  local rows = { { "GROUP", "TOPIC", "PARTITION", "CURRENT-OFFSET", "LOG-END-OFFSET", "LAG" } }
  for _, g in ipairs(r.group and { r } or r) do
    for _, p in ipairs(g.partitions) do
      rows[#rows + 1] = { g.group, p.topic, p.partition, p.committed or "-", p.high, p.lag or "-" }
    end
  end
  local w = {}
  for _, row in ipairs(rows) do
    for i, v in ipairs(row) do w[i] = math.max(w[i] or 0, #tostring(v)) end
  end
  local lines = {}
  for _, row in ipairs(rows) do
    local cells = {}
    for i, v in ipairs(row) do cells[i] = pad(v, w[i] + 2) end
    lines[#lines + 1] = table.concat(cells):gsub("%s+$", "")
  end
  local total = r.group and r.total or r.total
  lines[#lines + 1] = ("total lag %d"):format(total)
  return table.concat(lines, "\n")
end

-- ---- offset resets --------------------------------------------------------

local function days_from_civil(y, m, d)
  y = m <= 2 and y - 1 or y
  local era = (y >= 0 and y or y - 399) // 400
  local yoe = y - era * 400
  local doy = (153 * (m + (m > 2 and -3 or 9)) + 2) // 5 + d - 1
  local doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
  return era * 146097 + doe - 719468
end

--- Milliseconds since the epoch for "2025-12-31T10:00:00Z" (also with
-- fractions, a "+02:00" offset, or no zone, read as UTC), or a number of ms.
function M.parse_datetime(v)
  if math.type(v) == "integer" then return v end
  if type(v) ~= "string" then return nil, "expected a datetime such as \"2025-12-31T10:00:00Z\"" end
  local y, mo, d, h, mi, s, rest = v:match("^(%d%d%d%d)%-(%d%d)%-(%d%d)[T ](%d%d):(%d%d):(%d%d)(.*)$")
  if not y then return nil, ("expected a datetime such as \"2025-12-31T10:00:00Z\", got %q"):format(v) end
  local frac, zone = rest:match("^%.(%d+)(.*)$")
  zone = zone or rest
  local offset = 0
  if zone ~= "" and zone ~= "Z" then
    local sign, zh, zm = zone:match("^([+-])(%d%d):?(%d%d)$")
    if not sign then return nil, ("bad time zone in %q (use Z or +HH:MM)"):format(v) end
    offset = (tonumber(zh) * 60 + tonumber(zm)) * 60 * (sign == "+" and 1 or -1)
  end
  y, mo, d, h, mi, s = tonumber(y), tonumber(mo), tonumber(d), tonumber(h), tonumber(mi), tonumber(s)
  if mo < 1 or mo > 12 or d < 1 or d > 31 or h > 23 or mi > 59 or s > 60 then
    return nil, ("not a valid date and time: %q"):format(v)
  end
  local secs = days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + s - offset
  local ms = frac and tonumber((frac .. "00"):sub(1, 3)) or 0
  return secs * 1000 + ms
end

--- Normalises `to` into {kind, value, text}.
local function check_to(op, to)
  if to == "earliest" or to == "latest" then return { kind = to, text = to } end
  if type(to) == "table" then
    if math.type(to.offset) == "integer" and to.offset >= 0 then
      return { kind = "offset", value = to.offset, text = "offset " .. to.offset }
    elseif math.type(to.shift) == "integer" then
      return { kind = "shift", value = to.shift, text = ("shift %+d"):format(to.shift) }
    elseif to.datetime ~= nil then
      local ms, err = M.parse_datetime(to.datetime)
      if not ms then bad(op, "to.datetime: " .. err) end
      return { kind = "datetime", value = ms, text = "datetime " .. tostring(to.datetime) }
    end
  end
  bad(op, "to must be \"earliest\", \"latest\", {offset = N}, {shift = N} or {datetime = \"2025-12-31T10:00:00Z\"}")
end

local function clamp(v, lo, hi) return math.max(lo, math.min(hi, v)) end

-- Real Kafka refuses offset commits from outside for a group with members.
function Client:_check_inactive(group, t)
  local ok, err = pcall(self._require_api, self, "reset_offsets", "DescribeGroups")
  if not ok then
    if not self.warned_members then   -- once per client: the broker will not change its mind
      log().warn("kafka: cannot check that consumer groups have no active members: %s", err.message)
      self.warned_members = true
    end
    return false
  end
  local d = self.native:describe_groups({ group }, t)[1]
  if d.error then raise_item_error("reset_offsets", "group " .. group, d.error) end
  if #d.members > 0 or (d.state ~= "Empty" and d.state ~= "Dead" and d.state ~= "Unknown") then
    raise { op = "reset_offsets", code = "NON_EMPTY_GROUP", message = ("group %s has %d active member(s) (state %s): "
      .. "offsets can only be reset while no consumer is running; scale its consumers to zero first"):format(
        group, #d.members, d.state) }
  end
  return true
end

local function target_offset(op, to, p, committed, m, times)
  if to.kind == "earliest" then return m.low end
  if to.kind == "latest" then return m.high end
  if to.kind == "offset" then return clamp(to.value, m.low, m.high) end
  if to.kind == "shift" then
    if not committed then
      bad(op, ("%s [%d] has no committed offset to shift from: reset it to earliest, latest or an offset"):format(
        p.topic, p.partition))
    end
    return clamp(committed + to.value, m.low, m.high)
  end
  -- no message at or after that time: the end of the log, as Kafka does
  local o = times[tp_key(p.topic, p.partition)]
  return (o and o >= 0) and clamp(o, m.low, m.high) or m.high
end

function Client:_offsets_for_times(parts, ms, t, op)
  local req = {}
  for i, p in ipairs(parts) do req[i] = { topic = p.topic, partition = p.partition, offset = ms } end
  local out = {}
  for _, r in ipairs(self.native:offsets(req, t)) do
    if r.error then raise_item_error(op, ("%s [%d] offsets for time"):format(r.topic, r.partition), r.error) end
    out[tp_key(r.topic, r.partition)] = r.offset
  end
  return out
end

--- Plans and (through the gate) applies an offset reset; returns the plan:
-- {group, to, partitions = {{topic, partition, current, target, low, high,
-- replay, skip}}, replay, skip, applied, members_checked}.
function Client:reset_offsets(opts)
  local op = "reset_offsets"
  check_opts(op, opts, "group")
  local topics = list_of(op, opts.topics or opts.topic, "topics")
  local to = check_to(op, opts.to)
  local t = timeout_of(self, op, opts)
  local md = self.native:metadata(t)
  local parts = partitions_of(op, md, topics, opts.partitions)
  if #parts == 0 then bad(op, "no partitions selected") end
  local checked = self:_check_inactive(opts.group, t)
  local current = {}
  for _, p in ipairs(self:_committed({ opts.group }, parts, md, t, op)[opts.group].partitions) do
    current[tp_key(p.topic, p.partition)] = p.offset >= 0 and p.offset or nil
  end
  local marks = self:_watermarks(parts, t, op)
  local times = to.kind == "datetime" and self:_offsets_for_times(parts, to.value, t, op) or {}
  local plan = { group = opts.group, to = to.text, partitions = {}, replay = 0, skip = 0, members_checked = checked }
  local commit = {}
  for i, p in ipairs(parts) do
    local k = tp_key(p.topic, p.partition)
    local m, cur = marks[k], current[k]
    local target = target_offset(op, to, p, cur, m, times)
    local from = cur or m.high
    local row = { topic = p.topic, partition = p.partition, current = cur, target = target, low = m.low, high = m.high,
                  replay = math.max(from - target, 0), skip = math.max(target - from, 0) }
    plan.partitions[i] = row
    plan.replay, plan.skip = plan.replay + row.replay, plan.skip + row.skip
    commit[i] = { topic = p.topic, partition = p.partition, offset = target }
  end
  table.sort(plan.partitions, by_topic_partition)
  local summary = ("reset group %s on %s to %s (%d partitions, %d messages to replay, %d to skip)"):format(
    opts.group, table.concat(topics, ","), to.text, #parts, plan.replay, plan.skip)
  local r = self.native:alter_group_offsets(opts.group, commit, t, summary)
  plan.applied = r.decision == "performed"
  if r.result then self:_check_alter(opts.group, r.result) end
  return plan
end

local MEMBER_ERRORS = { UNKNOWN_MEMBER_ID = true, ILLEGAL_GENERATION = true, REBALANCE_IN_PROGRESS = true }

function Client:_check_alter(group, result)
  local errs = {}
  if result.error then errs[1] = result.error end
  for _, p in ipairs(result.partitions or {}) do
    if p.error then errs[#errs + 1] = p.error end
  end
  local e = errs[1]
  if not e then return end
  if MEMBER_ERRORS[e.code] then
    raise { op = "reset_offsets", code = "NON_EMPTY_GROUP", message = ("the broker refused to reset group %s (%s): "
      .. "it has or had active members; scale its consumers to zero first"):format(group, e.code) }
  end
  raise_item_error("reset_offsets", "group " .. group, e)
end

--- Text of a plan, one line per partition: current -> target.
function M.format_plan(plan)
  local lines = { ("%s group %s to %s:"):format(plan.applied and "reset" or "plan: reset", plan.group, plan.to) }
  for _, p in ipairs(plan.partitions) do
    local change = p.replay > 0 and ("replay %d"):format(p.replay) or p.skip > 0 and ("skip %d"):format(p.skip) or "no change"
    lines[#lines + 1] = ("  %s [%d] %s -> %d (%s)"):format(p.topic, p.partition, tostring(p.current or "none"), p.target, change)
  end
  lines[#lines + 1] = ("  total: replay %d, skip %d%s"):format(plan.replay, plan.skip,
    plan.applied and "" or " (not applied)")
  return table.concat(lines, "\n")
end

-- ---- produce --------------------------------------------------------------

local function check_headers(op, h)
  if h == nil then return nil end
  if type(h) ~= "table" then bad(op, "headers must be a table") end
  local out = {}
  for k, v in pairs(h) do
    if type(k) == "string" then
      if type(v) ~= "string" then bad(op, ("header %s must be a string"):format(k)) end
      out[#out + 1] = { k, v }
    end
  end
  table.sort(out, function(a, b) return a[1] < b[1] end)
  for _, pair in ipairs(h) do   -- {{name, value}} keeps order and repeats
    if type(pair) ~= "table" or type(pair[1]) ~= "string" or (pair[2] ~= nil and type(pair[2]) ~= "string") then
      bad(op, "headers must be {name = \"value\"} or a list of {name, value} pairs")
    end
    out[#out + 1] = { pair[1], pair[2] }
  end
  return out
end

local function check_message(op, m, topic)
  if type(m) ~= "table" then bad(op, "each message must be a table") end
  local key, value = m.key, m.value
  if key ~= nil and type(key) ~= "string" then key = tostring(key) end
  if value ~= nil and type(value) ~= "string" then
    if type(value) == "table" then value = json.encode(value) else value = tostring(value) end
  end
  if m.partition ~= nil and (math.type(m.partition) ~= "integer" or m.partition < 0) then
    bad(op, "partition must be an integer >= 0")
  end
  return { topic = topic, key = key, value = value, partition = m.partition, timestamp = m.timestamp,
           headers = check_headers(op, m.headers) }
end

--- produce{topic, key, value, headers, partition} or produce{topic, messages = {...}}:
-- waits for every delivery report; raises on any failure. A table value is
-- sent as JSON. Returns {delivered, partitions, offsets} ({skipped} in a dry run).
function Client:produce(opts)
  local op = "produce"
  check_opts(op, opts, "topic")
  local msgs = {}
  for i, m in ipairs(opts.messages or { opts }) do msgs[i] = check_message(op, m, opts.topic) end
  if #msgs == 0 then bad(op, "no messages") end
  local summary = #msgs == 1 and ("produce 1 message to %s%s"):format(opts.topic,
    msgs[1].key and (" with key " .. msgs[1].key) or "") or ("produce %d messages to %s"):format(#msgs, opts.topic)
  return self.native:produce(msgs, timeout_of(self, op, opts), opts.summary or summary, opts.topic, opts.progress)
end

-- ---- consume --------------------------------------------------------------

--- Start offsets per partition for `from`.
function Client:_start_offsets(op, parts, from, marks, t)
  local times
  if type(from) == "string" and from ~= "earliest" and from ~= "latest" or type(from) == "table" then
    local ms, err = M.parse_datetime(type(from) == "table" and from.datetime or from)
    if not ms then bad(op, "from: " .. err .. " (or \"earliest\", \"latest\", an offset)") end
    times = self:_offsets_for_times(parts, ms, t, op)
  elseif from ~= "earliest" and from ~= "latest" and (math.type(from) ~= "integer" or from < 0) then
    bad(op, "from must be \"earliest\", \"latest\", an offset >= 0 or a datetime")
  end
  local starts = {}
  for _, p in ipairs(parts) do
    local k = tp_key(p.topic, p.partition)
    local m = marks[k]
    local s
    if from == "earliest" then s = m.low
    elseif from == "latest" then s = m.high
    elseif times then s = (times[k] and times[k] >= 0) and times[k] or m.high
    else s = clamp(from, m.low, m.high) end
    starts[k] = s
  end
  return starts
end

--- An iterator over messages, without joining a group or committing:
--   for m in kafka.consume{topic = "reminders-dlq", from = "earliest", max_messages = 10} do ... end
-- It ends when every partition reaches the end it had when the call began
-- (or, with follow = true, when the timeout passes), or after max_messages;
-- when the timeout passes before the end is reached it raises "timeout".
function Client:consume(opts)
  local op = "consume"
  check_opts(op, opts, "topic")
  local max = opts.max_messages
  if max ~= nil and (math.type(max) ~= "integer" or max < 0) then bad(op, "max_messages must be an integer >= 0") end
  local t = timeout_of(self, op, opts)
  local parts = partitions_of(op, self.native:metadata(t), { opts.topic }, opts.partitions)
  local marks = self:_watermarks(parts, t, op)
  local starts = self:_start_offsets(op, parts, opts.from or "earliest", marks, t)
  for _, p in ipairs(parts) do   -- from_offsets = {[partition] = offset} overrides from
    local o, k = opts.from_offsets and opts.from_offsets[p.partition], tp_key(p.topic, p.partition)
    if o then starts[k] = clamp(o, marks[k].low, marks[k].high) end
  end
  local assign, left = {}, 0
  local ends = {}
  for _, p in ipairs(parts) do
    local k = tp_key(p.topic, p.partition)
    ends[k] = marks[k].high
    if opts.follow or starts[k] < ends[k] then
      assign[#assign + 1] = { topic = p.topic, partition = p.partition, offset = starts[k] }
      left = left + 1
    end
  end
  self.consuming = (self.consuming or 0) + 1
  local mine, count = self.consuming, 0
  local finished = #assign == 0 or max == 0
  if not finished then self.native:consume_start(assign) end
  local clock = host.now
  local t0 = clock()
  local function finish()
    finished = true
    if self.consuming == mine then self.native:consume_stop() end
  end
  return function()
    if finished then return nil end
    if self.consuming ~= mine then bad(op, "another consume on this client started; this one ended") end
    while true do
      local remaining = t - (clock() - t0)
      if remaining <= 0 then
        finish()
        if opts.follow then return nil end
        raise { op = op, code = "timeout",
          message = ("%s: timed out after %d message(s) before reaching the end"):format(
          opts.topic, count), retryable = true }
      end
      local m = self.native:consume_poll(math.min(remaining, 0.5))
      if m then
        local k = tp_key(m.topic, m.partition)
        if opts.follow or m.offset < ends[k] then
          count = count + 1
          if not opts.follow and m.offset + 1 >= ends[k] then left = left - 1 end
          if (max and count >= max) or (not opts.follow and left == 0) then finish() end
          return m
        end
      end
    end
  end
end

--- All messages consume would give, as a list.
function Client:messages(opts)
  local out = {}
  for m in self:consume(opts) do out[#out + 1] = m end
  return out
end

-- ---- backup and restore ---------------------------------------------------

local b64encode, b64decode = base64.encode, base64.decode

-- A string field as {name = s} when it is UTF-8, else {name_base64 = ...}.
local function put(t, name, s)
  if s == nil then return end
  if utf8.len(s) then t[name] = s else t[name .. "_base64"] = b64encode(s) end
end

local function get(t, name)
  if t[name .. "_base64"] then return b64decode(t[name .. "_base64"]) end
  if t[name] == json.null then return nil end
  return t[name]
end

local function encode_message(m)
  local line = { partition = m.partition, offset = m.offset, timestamp = m.timestamp }
  put(line, "key", m.key)
  put(line, "value", m.value)
  local hs = {}
  for i, h in ipairs(m.headers or {}) do
    hs[i] = { name = h[1] }
    put(hs[i], "value", h[2])
  end
  line.headers = json.array(hs)
  return json.encode(line)
end

local function progress_logger(what)
  local clock = host.now
  local next_at = clock() + 2
  return function(done, total)
    if clock() >= next_at then
      log().info("%s: %d/%d messages", what, done, total)
      next_at = clock() + 2
    end
  end
end

--- backup_topic{topic, file}: every message as JSON Lines, then
-- FILE.manifest.json with the counts per partition and the file's sha256.
function Client:backup_topic(opts)
  local op = "backup_topic"
  check_opts(op, opts, "topic", "file")
  local t = timeout_of(self, op, opts)
  local parts = partitions_of(op, self.native:metadata(t), { opts.topic })
  local marks = self:_watermarks(parts, t, op)
  local expected, per = 0, {}
  for _, p in ipairs(parts) do
    local m = marks[tp_key(p.topic, p.partition)]
    per[tostring(p.partition)] = { low = m.low, high = m.high, count = m.high - m.low }
    expected = expected + m.high - m.low
  end
  local manifest_path = opts.file .. ".manifest.json"
  return library_effect {
    module = "kafka", op = op, target = opts.file,
    summary = ("back up %d messages of %s to %s"):format(expected, opts.topic, opts.file),
    simulate = function() return { topic = opts.topic, messages = expected, partitions = per, written = false } end,
    perform = function()
      local tmp = opts.file .. ".tmp"
      local f, err = io.open(tmp, "wb")
      if not f then raise { op = op, code = "io", message = tostring(err) } end
      local n, report = 0, progress_logger("backup " .. opts.topic)
      local counts = {}
      local ok, e = pcall(function()
        for m in self:consume { topic = opts.topic, from = "earliest", timeout = t } do
          f:write(encode_message(m), "\n")
          n = n + 1
          counts[m.partition] = (counts[m.partition] or 0) + 1
          report(n, expected)
        end
      end)
      f:close()
      if not ok then os.remove(tmp); error(e, 0) end
      os.rename(tmp, opts.file)
      for _, p in pairs(per) do p.count = 0 end
      for p, c in pairs(counts) do per[tostring(p)].count = c end
      local sha = host.sha256_file(opts.file)
      local manifest = { topic = opts.topic, messages = n, partitions = per, sha256 = sha, file = opts.file:match("[^/]*$"),
                         created = os.date("!%Y-%m-%dT%H:%M:%SZ") }
      local mf = assert(io.open(manifest_path, "wb"))
      mf:write(json.encode(manifest), "\n")
      mf:close()
      return { topic = opts.topic, messages = n, partitions = per, sha256 = sha, file = opts.file,
               manifest = manifest_path, written = true }
    end,
  }
end

local function read_manifest(op, file)
  local f = io.open(file .. ".manifest.json", "rb")
  if not f then return nil end
  local m = json.decode(f:read("a"))
  f:close()
  local sha = host.sha256_file(file)
  if sha ~= m.sha256 then
    raise { op = op, code = "checksum_mismatch",
      message = ("%s does not match its manifest (sha256 %s, expected %s)"):format(
      file, tostring(sha), tostring(m.sha256)) }
  end
  return m
end

--- restore_topic{file, topic}: produces a backup's messages back (keys,
-- headers, timestamps; partitions where the target has that partition).
function Client:restore_topic(opts)
  local op = "restore_topic"
  check_opts(op, opts, "file")
  local f, err = io.open(opts.file, "rb")
  if not f then raise { op = op, code = "io", message = tostring(err) } end
  f:close()
  local manifest = read_manifest(op, opts.file)
  local topic = opts.topic or manifest and manifest.topic
  if type(topic) ~= "string" then bad(op, "topic is required (the backup has no manifest naming it)") end
  local t = timeout_of(self, op, opts)
  local md = self.native:metadata(t, topic)
  local count = #partitions_of(op, md, { topic })
  local msgs, n = {}, 0
  for line in io.lines(opts.file) do
    n = n + 1
    local ok, rec = pcall(json.decode, line)
    if not ok or type(rec) ~= "table" then bad(op, ("%s line %d is not a message"):format(opts.file, n)) end
    local headers = {}
    for i, h in ipairs(rec.headers or {}) do headers[i] = { h.name, get(h, "value") } end
    local p = math.tointeger(rec.partition)
    msgs[#msgs + 1] = { topic = topic, key = get(rec, "key"), value = get(rec, "value"), headers = headers,
                        partition = (p and p < count) and p or nil, timestamp = math.tointeger(rec.timestamp) }
  end
  if manifest and manifest.messages ~= #msgs then
    raise { op = op, code = "checksum_mismatch", message = ("%s has %d messages, its manifest says %d"):format(
      opts.file, #msgs, manifest.messages) }
  end
  if #msgs == 0 then return { topic = topic, restored = 0 } end
  local r = self.native:produce(msgs, t, ("restore %d messages from %s to %s"):format(#msgs, opts.file, topic), topic,
    progress_logger("restore " .. topic))
  return { topic = topic, restored = r.skipped and 0 or r.delivered, messages = #msgs, skipped = r.skipped }
end

-- ---- DLQ replay -----------------------------------------------------------

--- replay{from_topic, to_topic, max, filter, group}: copies messages (keys,
-- headers) from a dead-letter topic back to a topic. With group, it starts at
-- the group's committed offsets and commits past what it moved, so a second
-- replay does not repeat the first. Returns {moved, scanned, matched}.
function Client:replay(opts)
  local op = "replay"
  check_opts(op, opts, "from_topic", "to_topic")
  if opts.filter ~= nil and type(opts.filter) ~= "function" then bad(op, "filter must be a function(message) -> boolean") end
  if opts.max ~= nil and (math.type(opts.max) ~= "integer" or opts.max < 0) then bad(op, "max must be an integer >= 0") end
  local t = timeout_of(self, op, opts)
  local starts
  if opts.group then
    local md = self.native:metadata(t)
    local parts = partitions_of(op, md, { opts.from_topic })
    starts = {}
    for _, p in ipairs(self:_committed({ opts.group }, parts, md, t, op)[opts.group].partitions) do
      if p.offset >= 0 then starts[p.partition] = p.offset end
    end
  end
  local picked, scanned, next_offsets = {}, 0, {}
  local max = opts.max
  local function consider(m)
    scanned = scanned + 1
    if max and #picked >= max then return true end
    if not opts.filter or opts.filter(m) then
      picked[#picked + 1] = { key = m.key, value = m.value, headers = m.headers, timestamp = nil }
    end
    next_offsets[m.partition] = m.offset + 1
  end
  for m in self:consume { topic = opts.from_topic, from = "earliest", from_offsets = starts, timeout = t } do
    if consider(m) then break end
  end
  local result = { scanned = scanned, matched = #picked, moved = 0 }
  if #picked == 0 then return result end
  local r = self:produce { topic = opts.to_topic, messages = picked, timeout = t,
    summary = ("replay %d messages from %s to %s"):format(#picked, opts.from_topic, opts.to_topic) }
  result.moved = r.skipped and 0 or r.delivered
  result.skipped = r.skipped
  if opts.group and not r.skipped then
    local commit = {}
    for p, o in pairs(next_offsets) do commit[#commit + 1] = { topic = opts.from_topic, partition = p, offset = o } end
    local a = self.native:alter_group_offsets(opts.group, commit, t,
      ("commit replay progress of group %s on %s"):format(opts.group, opts.from_topic))
    if a.result then self:_check_alter(opts.group, a.result) end
  end
  return result
end

-- ---- groups and topic administration --------------------------------------

function Client:describe_group(name, opts)
  if type(name) ~= "string" then bad("describe_group", "expected a group name") end
  self:_require_api("describe_group", "DescribeGroups")
  local d = self.native:describe_groups({ name }, timeout_of(self, "describe_group", opts))[1]
  if d.error then raise_item_error("describe_group", "group " .. name, d.error) end
  return d
end

function Client:list_groups(opts)
  self:_require_api("list_groups", "ListGroups")
  local groups = self.native:list_groups(timeout_of(self, "list_groups", opts))
  table.sort(groups, function(a, b) return a.group < b.group end)
  return groups
end

function Client:describe_configs(topic, opts)
  if type(topic) ~= "string" then bad("describe_configs", "expected a topic name") end
  self:_require_api("describe_configs", "DescribeConfigs")
  return self.native:describe_configs(topic, timeout_of(self, "describe_configs", opts))
end

local function check_configs(op, cfg)
  local out = {}
  if cfg == nil then return out end
  if type(cfg) ~= "table" then bad(op, "config must be a table of name = value") end
  for k, v in pairs(cfg) do
    if type(k) ~= "string" or (type(v) ~= "string" and type(v) ~= "number" and type(v) ~= "boolean") then
      bad(op, "config must map names to strings or numbers")
    end
    out[k] = math.type(v) == "float" and ("%.0f"):format(v) or tostring(v)
  end
  return out
end

--- In a dry run the broker validates the request without applying it.
function Client:create_topic(opts)
  local op = "create_topic"
  check_opts(op, opts, "name")
  if math.type(opts.partitions) ~= "integer" or opts.partitions < 1 then bad(op, "partitions must be an integer >= 1") end
  local rf = opts.replication_factor or -1
  if math.type(rf) ~= "integer" or (rf < 1 and rf ~= -1) then bad(op, "replication_factor must be an integer >= 1") end
  local cfg = check_configs(op, opts.config)
  return self.native:create_topic(opts.name, opts.partitions, rf, cfg, timeout_of(self, op, opts),
    ("create topic %s with %d partitions"):format(opts.name, opts.partitions))
end

--- Partitions can only be added, as in Kafka.
function Client:create_partitions(opts)
  local op = "create_partitions"
  check_opts(op, opts, "topic")
  if math.type(opts.total) ~= "integer" or opts.total < 1 then bad(op, "total must be the new partition count") end
  local t = timeout_of(self, op, opts)
  local current = #partitions_of(op, self.native:metadata(t), { opts.topic })
  if opts.total <= current then
    raise { op = op, code = "INVALID_PARTITIONS",
      message = ("%s has %d partitions; the count can only grow (asked for %d)"):format(
      opts.topic, current, opts.total) }
  end
  return self.native:create_partitions(opts.topic, opts.total, t,
    ("grow %s from %d to %d partitions"):format(opts.topic, current, opts.total))
end

--- AlterConfigs replaces a topic's whole dynamic configuration, so the
-- current dynamic settings are read first and kept unless changed.
function Client:alter_topic_config(opts)
  local op = "alter_topic_config"
  check_opts(op, opts, "topic")
  local set = check_configs(op, opts.set)
  local delete = opts.delete or {}
  if next(set) == nil and #delete == 0 then bad(op, "nothing to change: give set = {...} or delete = {...}") end
  local t = timeout_of(self, op, opts)
  local merged = {}
  for name, e in pairs(self.native:describe_configs(opts.topic, t)) do
    if e.source == "DYNAMIC_TOPIC_CONFIG" and e.value then merged[name] = e.value end
  end
  for _, name in ipairs(delete) do merged[name] = nil end
  local parts = {}
  for k, v in pairs(set) do merged[k] = v; parts[#parts + 1] = k .. "=" .. v end
  table.sort(parts)
  return self.native:alter_configs(opts.topic, merged, t,
    ("set %s on topic %s"):format(#parts > 0 and table.concat(parts, ", ") or "defaults", opts.topic))
end

-- ---- the default client ---------------------------------------------------

for name, fn in pairs(Client) do
  if type(fn) == "function" and not name:match("^_") then
    M[name] = function(...) return fn(default_client(), ...) end
  end
end
M.Client = Client

return M
