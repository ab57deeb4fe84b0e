--- Logs as data, as methods of the client (stdlib/k8s.lua documents them):
-- logs, log_query, and target_pods, the pods a target names (exec and cp
-- share it).
local cjson = require("cjson")
local client = require("k8s.client")
local duration = require("duration")
local host = require("runbook.host")

local Client = client.Client
local raise, path_of = client.raise, client.path

local M = {}

function M.default_container(pod)
  local ann = pod.metadata.annotations or {}
  return ann["kubectl.kubernetes.io/default-container"] or pod.spec.containers[1].name
end

--- The pods a target names, with the namespace and the options: "pod/x" that
-- pod; a workload ("deploy/x") its pods, ready ones first, then newest first
-- (kubectl picks the first), and true; {selector = ...} every matching pod.
function Client:target_pods(a, b, op)
  local t, name, opts
  if type(a) == "table" and not a.kind then t, name, opts = "pods", nil, a
  else t, name, opts = client.target_args(a, b, nil, false, op) end
  opts = opts or {}
  local ns = self:ns(opts)
  if not name then
    if not opts.selector then error(("k8s.%s: give \"pod/NAME\", \"deploy/NAME\" or {selector = ...}"):format(op), 3) end
    return self:list("pods", { namespace = ns, label_selector = client.selector(opts.selector) }), ns, opts
  end
  local r = self:resource(t)
  if r.kind == "Pod" then return { self:get(r, name, { namespace = ns }) }, ns, opts, false end
  local all = self:pods_of(self:get(r, name, { namespace = ns }), ns)
  local ready = require("k8s.verbs").pod_ready
  table.sort(all, function(x, y)
    if ready(x) ~= ready(y) then return ready(x) end
    return (x.metadata.creationTimestamp or "") > (y.metadata.creationTimestamp or "")
  end)
  if #all == 0 then raise { op = op, code = "404", message = ("no pods found for %s %s"):format(r.singular, name) } end
  return all, ns, opts, true
end

-- "2024-05-01T10:00:00.123456789Z" -> seconds since the epoch, with the fraction.
local function stamp_time(stamp)
  return (require("k8s.config").parse_time(stamp) or 0) + (tonumber("0" .. (stamp:match("^[^.]*(%.%d+)") or "")) or 0)
end

local function log_query(opts, cname, follow)
  local since = opts.since and math.ceil(duration.check(opts.since, "k8s.logs since")) or nil
  return { container = cname, tailLines = opts.tail, sinceSeconds = since, sinceTime = opts.since_time,
    previous = opts.previous and "true" or nil, timestamps = "true", limitBytes = opts.limit_bytes,
    follow = follow and "true" or nil }
end

local function record(l, pod, cname)
  local stamp, line = l:match("^(%S+) (.*)$")
  if not stamp then stamp, line = l, "" end
  return { time = stamp_time(stamp), stamp = stamp, pod = pod, container = cname, line = line }
end

-- One container's log as {time, stamp, pod, container, line} records, oldest first.
local function read_log(self, ns, pod, opts)
  local cname = opts.container or M.default_container(pod)
  local text = self:call { path = path_of(self:resource("pods"), ns, pod.metadata.name, "log"), op = "logs", raw = true,
    accept = "*/*", what = ('pod "%s"'):format(pod.metadata.name), query = log_query(opts, cname) }
  local out = {}
  for l in (text or ""):gmatch("[^\n]+") do out[#out + 1] = record(l, pod.metadata.name, cname) end
  return out
end

-- kubectl logs -f of each pod, as one iterator of records, until opts.timeout
-- (default 5m) or the step's deadline, whichever comes first, or every stream
-- ends. Its fourth value closes every stream, so a generic for that ends early
-- (a break, an error, Ctrl-C) leaves none open.
local function follow(self, pods, ns, opts)
  local stop = host.now() + (opts.timeout and duration.check(opts.timeout, "k8s.logs timeout") or 300)
  local dl = host.deadline()
  if dl and dl < stop then stop = dl end
  local streams = {}
  local function close_all()
    for _, st in ipairs(streams) do st.s:close() end
    streams = {}
  end
  self:refresh()
  for _, pod in ipairs(pods) do
    local cname = opts.container or M.default_container(pod)
    streams[#streams + 1] = { pod = pod.metadata.name, container = cname, s = self.conn:stream {
      path = path_of(self:resource("pods"), ns, pod.metadata.name, "log"), query = log_query(opts, cname, true),
      accept = "*/*", timeout = math.max(1, stop - host.now()) } }
  end
  local i = 0
  local function next_record()
    while #streams > 0 and host.now() < stop do
      i = i % #streams + 1
      local st = streams[i]
      local line, why = st.s:next(math.max(0.001, math.min(0.05, stop - host.now())))
      if line and st.s:status() >= 400 then
        client.status_error(self, "logs", st.s:status(), line, ('pod "%s"'):format(st.pod))
      elseif line then
        return record(line, st.pod, st.container)
      elseif why ~= "wait" then
        st.s:close()
        table.remove(streams, i)
      end
    end
    close_all()
    return nil
  end
  return next_record, nil, nil, setmetatable({}, { __close = close_all })
end

-- Every pod's records merged in timestamp order (a pod's own order kept on ties).
local function read_logs(self, pods, ns, opts)
  local all = {}
  for _, pod in ipairs(pods) do
    for i, rec in ipairs(read_log(self, ns, pod, opts)) do
      rec.seq = i
      all[#all + 1] = rec
    end
  end
  if #pods > 1 then
    table.sort(all, function(x, y)
      if x.time ~= y.time then return x.time < y.time end
      if x.pod ~= y.pod then return x.pod < y.pod end
      return x.seq < y.seq
    end)
  end
  return all
end

--- Logs as a list of lines. Target "pod/x", or "deploy/x" (one pod, as kubectl
-- picks it), or opts.selector for every matching pod, merged in timestamp
-- order. Also returns { [pod] = lines }. With opts.follow, an iterator of
-- records instead.
function Client:logs(a, b)
  local pods, ns, opts, workload = self:target_pods(a, b, "logs")
  if workload then pods = { pods[1] } end
  if opts.follow then return follow(self, pods, ns, opts) end
  local lines, by_pod = {}, {}
  for _, pod in ipairs(pods) do by_pod[pod.metadata.name] = {} end
  for _, rec in ipairs(read_logs(self, pods, ns, opts)) do
    local l = opts.timestamps and (rec.stamp .. " " .. rec.line) or rec.line
    table.insert(by_pod[rec.pod], l)
    lines[#lines + 1] = opts.prefix and ("[pod/%s/%s] %s"):format(rec.pod, rec.container, l) or l
  end
  return lines, by_pod
end

-- A field's value as text: a JSON number that is whole prints as an integer
-- (cjson decodes 42 as 42.0), so user_id=42 matches it.
local function text(v)
  if math.type(v) == "float" and v == math.floor(v) and math.abs(v) < 2^53 then return ("%d"):format(v) end
  return tostring(v)
end

-- Does a record's field satisfy a `where` condition: equal (as text), one of
-- a list, or a function's verdict?
local function satisfies(v, want)
  if type(want) == "function" then return want(v) and true or false end
  if type(want) == "table" then
    for _, w in ipairs(want) do if v ~= nil and text(v) == text(w) then return true end end
    return false
  end
  return v ~= nil and text(v) == text(want)
end

local function check_query(q)
  if type(q) ~= "table" then error("k8s.log_query expects a table", 3) end
  if q.where ~= nil and type(q.where) ~= "table" then error("k8s.log_query: where must be a table of field = value", 3) end
  if q.match ~= nil and type(q.match) ~= "string" then error("k8s.log_query: match must be a string (a Lua pattern)", 3) end
  if q.count_by ~= nil and type(q.count_by) ~= "string" then error("k8s.log_query: count_by must be a field name", 3) end
  if q.each ~= nil and type(q.each) ~= "function" then error("k8s.log_query: each must be a function", 3) end
  if q.max ~= nil and math.type(q.max) ~= "integer" then error("k8s.log_query: max must be an integer", 3) end
  if q.follow ~= nil and q.follow ~= false then duration.check(q.follow, "k8s.log_query follow") end
end

-- Decodes a record's JSON into rec.fields (other lines stay text) and says
-- whether the query's `match` and `where` keep it.
local function keeps(q, rec)
  if q.json ~= false and rec.line:match("^%s*{") then
    local ok, v = pcall(cjson.decode, rec.line)
    if ok and type(v) == "table" then rec.fields = v end
  end
  if q.match then
    local ok, found = pcall(string.find, rec.line, q.match)
    if not ok then error(("k8s.log_query: match %q is not a valid Lua pattern: %s"):format(q.match, found:gsub("^.-:%d+: ", "")), 0) end
    if not found then return false end
  end
  for k, want in pairs(q.where or {}) do
    if not satisfies(rec.fields and rec.fields[k], want) then return false end
  end
  return true
end

-- The records a query reads: every pod's log merged in time order, or with
-- q.follow each pod's stream from now on (history first as since/tail ask).
local function source(self, pods, ns, q)
  if q.follow then
    return follow(self, pods, ns, { container = q.container, since = q.since, since_time = q.since_time,
      tail = q.tail, timeout = q.follow })
  end
  local all, i = read_logs(self, pods, ns, q), 0
  return function()
    i = i + 1
    if all[i] then all[i].seq = nil end
    return all[i]
  end
end

--- Logs as records: a target's pods (every pod of a workload) or a selector's,
-- merged in timestamp order; JSON lines decoded into rec.fields (other lines
-- kept as text), filtered by `where` and `match`, counted by a field. With
-- `follow` (a duration) the pods' logs as they write them, for that long;
-- `each(rec)` sees each match as it comes; `max` stops at that many matches.
function Client:log_query(q)
  check_query(q)
  local pods, ns = self:target_pods(q.target or q, q.target and q or nil, "log_query")
  local res = { records = {}, scanned = 0, pods = {} }
  for _, pod in ipairs(pods) do res.pods[#res.pods + 1] = pod.metadata.name end
  local counts = {}
  for rec in source(self, pods, ns, q) do
    res.scanned = res.scanned + 1
    if keeps(q, rec) then
      res.records[#res.records + 1] = rec
      if q.count_by then
        local v = rec.fields and rec.fields[q.count_by]
        v = v == nil and "(none)" or text(v)
        counts[v] = (counts[v] or 0) + 1
      end
      if q.each then q.each(rec) end
      if q.max and #res.records >= q.max then break end
    end
  end
  res.count, res.first, res.last = #res.records, res.records[1], res.records[#res.records]
  if q.count_by then
    res.by = {}
    for v, n in pairs(counts) do res.by[#res.by + 1] = { value = v, count = n } end
    table.sort(res.by, function(x, y) if x.count ~= y.count then return x.count > y.count end return x.value < y.value end)
    for i = #res.by, (q.top or #res.by) + 1, -1 do res.by[i] = nil end
  end
  return res
end

return M
