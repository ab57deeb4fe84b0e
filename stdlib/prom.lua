--- prom: Prometheus's HTTP API for runbooks (Prometheus, Thanos, Mimir,
-- VictoriaMetrics, managed services), over the http module: one connection,
-- reused, every request bounded by the step's deadline.
--
--   prom.connect{url=, token=, username=, password=, ca_file=, headers={}, timeout="30s",
--                connect_timeout="10s"} -> client
--     url: PROMETHEUS_URL by default; token is sent as a bearer token,
--     username/password as basic auth (both are secrets).
--   Every function below exists on a client (c:query(q)) and on the module,
--   which uses a client made from the environment on first use.
--
--   query(q, {time=, allow_empty=})       -> {{labels = {...}, value = n}, ...} (a scalar: one row, no labels)
--   query_range(q, {start=, stop=, step=, allow_empty=})
--                                         -> {{labels = {...}, values = {{t, v}, ...}}, ...}
--     time, start, stop: epoch seconds, or a duration meaning that long ago ("10m");
--     stop defaults to now, step to a 250th of the range (at least 1s).
--   value(q, {time=, allow_empty=})       -> one number
--   alerts()                              -> {{labels, annotations, state, active_at, value}, ...}
--   rules({type = "alert"|"record"})      -> Prometheus's rule groups
--   targets({state = "active"|"dropped"}) -> {{labels, health, last_error, scrape_url, job}, ...}
--   verify{...}                           a metric gate: see below
--   show(v, unit)                         a value as the gate shows it ("0.4%", "412ms")
--
-- No data is an error (code "no_data"): an empty result, or a NaN from
-- value(), never passes a check by accident. {allow_empty = true} returns
-- the empty vector, or nil from value(), instead. value() of more than one
-- series raises "ambiguous" (aggregate it: sum(...), max(...)).
-- Prometheus's own errors raise with its errorType as the code ("bad_data",
-- "timeout", "execution") and its error as the message; an endpoint that
-- cannot be reached raises with curl's reason ("couldnt_connect").
--
-- The metric gate: a condition that must hold for a while.
--
--   prom.verify{name = "error rate", query = 'sum(rate(...)) / sum(rate(...))',
--               below = 0.01, unit = "percent", hold = "2m", every = "15s"}
--   prom.verify{{name = "error rate", query = ..., below = 0.01, unit = "percent"},
--               {name = "p95 latency", query = ..., below = 0.5, unit = "seconds"},
--               hold = "1m", every = "5s", warmup = "20s"}
--     below / above: the value must stay strictly under / over it;
--     unit: "percent" (a ratio shown as 0.4%), "seconds" (shown as 412ms) or none.
--   Evaluates every `every`; passes once every condition has held for `hold`,
--   and fails (code "gate_failed") the first time one breaks, naming the value,
--   the threshold and the query. No data fails it ("no_data"), except during
--   `warmup` at the start, which waits for a first value (a new canary has no
--   series yet). Each evaluation is logged, so the terminal shows the values live.
--   In a dry run it evaluates once against the live data and reports
--   (`would wait 2m for error rate < 1%: now 0.4%`), never failing on the values.
--   -> {values = {name = value}, held = seconds, evaluations = n}
local cjson = require("cjson")
local duration = require("duration")
local host = require("runbook.host")

local api = require("http.api").new("prom", "Prometheus")
local M, Client, raise = api.module, api.Client, api.raise

local function number(v)
  if v == "NaN" then return 0 / 0 end
  if v == "+Inf" then return math.huge end
  if v == "-Inf" then return -math.huge end
  return tonumber(v)
end

local function is_nan(v) return v ~= v end

-- A time option: epoch seconds, or a duration meaning that long ago.
local function at(v, what)
  if type(v) == "number" then return v end
  return host.wallclock() - duration.check(v, "prom " .. what)
end

local function check_query(q, op)
  if type(q) ~= "string" or q:match("^%s*$") then
    error(("prom.%s: the query must be a non-empty string, got %s"):format(op, type(q) == "string" and '""' or type(q)), 3)
  end
end

--- One GET of the API (path: its segments, e.g. {"api", "v1", "query"});
-- returns the decoded `data`. Raises on any failure.
function Client:get(op, path, params, what)
  local r = api:request(self, op, what, { method = "GET", path = path, query = params or {}, headers = self.headers })
  local doc = (r.headers["content-type"] or ""):lower():match("json") and select(2, pcall(cjson.decode, r.body))
  if type(doc) == "table" and doc.status == "error" then
    raise { op = op, code = tostring(doc.errorType or r.status), status = r.status,
      retryable = r.status >= 500 or r.status == 429 or doc.errorType == "timeout" or doc.errorType == "unavailable",
      message = ("%s%s (HTTP %d)"):format(what and (what .. ": ") or "", tostring(doc.error), r.status) }
  end
  if r.status >= 400 or type(doc) ~= "table" or type(doc.data) ~= "table" then
    raise { op = op, code = r.status >= 400 and tostring(r.status) or "bad_response", status = r.status,
      retryable = r.status >= 500 or r.status == 429,
      message = ("%sPrometheus at %s answered HTTP %d%s"):format(what and (what .. ": ") or "", self.url, r.status,
        r.status < 400 and " without an API response" or (": " .. r.body:sub(1, 200):gsub("%s+", " "))) }
  end
  return doc.data
end

local function no_data(op, q)
  raise { op = op, code = "no_data", retryable = true,
    message = ("no data for %s (check the metric name and labels; {allow_empty = true} accepts an empty result)"):format(q) }
end

function Client:query(q, opts)
  check_query(q, "query")
  opts = opts or {}
  local params = { query = q }
  if opts.time ~= nil then params.time = ("%.3f"):format(at(opts.time, "query time")) end
  local data = self:get("query", { "api", "v1", "query" }, params, "query " .. q)
  local rows = {}
  if data.resultType == "scalar" or data.resultType == "string" then
    rows[1] = { labels = {}, value = number(data.result[2]) }
  else
    for i, s in ipairs(data.result) do rows[i] = { labels = s.metric, value = number(s.value[2]) } end
  end
  if #rows == 0 and not opts.allow_empty then no_data("query", q) end
  return rows
end

function Client:query_range(q, opts)
  check_query(q, "query_range")
  opts = opts or {}
  if opts.start == nil then error("prom.query_range: start is required (epoch seconds or a duration ago, e.g. \"10m\")", 2) end
  local start, stop = at(opts.start, "start"), opts.stop and at(opts.stop, "stop") or host.wallclock()
  if stop < start then error("prom.query_range: stop is before start", 2) end
  local step = opts.step and duration.check(opts.step, "prom query_range step") or math.max(1, (stop - start) / 250)
  local data = self:get("query_range", { "api", "v1", "query_range" }, { query = q, start = ("%.3f"):format(start),
    ["end"] = ("%.3f"):format(stop), step = ("%g"):format(step) }, "query_range " .. q)
  local series = {}
  for i, s in ipairs(data.result) do
    local values = {}
    for j, p in ipairs(s.values or {}) do values[j] = { p[1], number(p[2]) } end
    series[i] = { labels = s.metric, values = values }
  end
  if #series == 0 and not opts.allow_empty then no_data("query_range", q) end
  return series
end

function Client:value(q, opts)
  check_query(q, "value")
  opts = opts or {}
  local rows = self:query(q, { time = opts.time, allow_empty = true })
  if #rows > 1 then
    raise { op = "value", code = "ambiguous",
      message = ("%s returned %d series, not one (aggregate it, e.g. sum(...) or max(...))"):format(q, #rows) }
  end
  local v = rows[1] and rows[1].value
  if v == nil or is_nan(v) then
    if opts.allow_empty then return nil end
    no_data("value", q .. (v and " (the value is NaN: a ratio of zero rates?)" or ""))
  end
  return v
end

function Client:alerts()
  local out = {}
  for i, a in ipairs(self:get("alerts", { "api", "v1", "alerts" }).alerts or {}) do
    out[i] = { labels = a.labels, annotations = a.annotations, state = a.state, active_at = a.activeAt,
      value = number(a.value) }
  end
  return out
end

function Client:rules(opts)
  opts = opts or {}
  return self:get("rules", { "api", "v1", "rules" }, { type = opts.type }).groups
end

function Client:targets(opts)
  opts = opts or {}
  local data = self:get("targets", { "api", "v1", "targets" }, { state = opts.state })
  local out = {}
  for _, t in ipairs((opts.state == "dropped" and data.droppedTargets or data.activeTargets) or {}) do
    out[#out + 1] = { labels = t.labels or t.discoveredLabels, health = t.health, last_error = t.lastError,
      scrape_url = t.scrapeUrl, job = t.scrapePool }
  end
  return out
end

-- ---- the metric gate --------------------------------------------------------

--- A value as the gate shows it: show(0.004, "percent") -> "0.4%", "seconds" -> "412ms".
local function show(v, unit)
  if v == nil then return "no data" end
  if is_nan(v) then return "NaN" end
  if unit == "percent" then return (("%.2f"):format(v * 100):gsub("%.?0+$", "")) .. "%" end
  if unit == "seconds" then return duration.format(v) end
  return ("%.4g"):format(v)
end
M.show = show

local function conditions_of(opts)
  local list = #opts > 0 and opts or { opts }
  for i, c in ipairs(list) do
    if type(c) ~= "table" then error(("prom.verify: condition %d must be a table {name=, query=, below= or above=}"):format(i), 3) end
    check_query(c.query, "verify")
    if (c.below == nil) == (c.above == nil) then
      error(("prom.verify: %s needs exactly one of below= or above= (a number)"):format(c.name or c.query), 3)
    end
    if type(c.below or c.above) ~= "number" then
      error(("prom.verify: %s: the threshold must be a number"):format(c.name or c.query), 3)
    end
    if c.unit ~= nil and c.unit ~= "percent" and c.unit ~= "seconds" then
      error(("prom.verify: unit must be \"percent\" or \"seconds\", got %q"):format(tostring(c.unit)), 3)
    end
    c.name = c.name or c.query
  end
  return list
end

local function text(c)
  return ("%s %s %s"):format(c.name, c.below and "<" or ">", show(c.below or c.above, c.unit))
end

local function holds(c, v) if c.below then return v < c.below end return v > c.above end

function Client:verify(opts)
  if type(opts) ~= "table" then error("prom.verify expects a table {name=, query=, below= or above=, hold=, every=}", 2) end
  local conds = conditions_of(opts)
  local hold = duration.check(opts.hold or 0, "prom.verify hold")
  local every = duration.check(opts.every or "15s", "prom.verify every")
  local warmup = duration.check(opts.warmup or 0, "prom.verify warmup")
  if every <= 0 then error("prom.verify: every must be above 0", 2) end
  local log, gate, time = require("log"), require("gate"), require("time")
  local what = {}
  for i, c in ipairs(conds) do what[i] = text(c) end
  what = table.concat(what, " and ")
  if gate.dry_run() then
    local values, now = {}, {}
    for i, c in ipairs(conds) do
      values[c.name] = self:value(c.query, { allow_empty = true })
      local v = values[c.name]
      now[i] = ("%s%s%s"):format(#conds > 1 and (c.name .. " ") or "", show(v, c.unit),
        (v == nil or is_nan(v)) and "" or holds(c, v) and "" or " (would fail now)")
    end
    log.info("would wait %s for %s: now %s", duration.format(hold), what, table.concat(now, ", "))
    return { dry_run = true, values = values }
  end
  local started, since, n = host.now(), nil, 0
  local last_log = -math.huge
  while true do
    local values, shown, missing = {}, {}, nil
    for i, c in ipairs(conds) do
      local v = self:value(c.query, { allow_empty = true })
      if v == nil or is_nan(v) then missing = c; break end
      if not holds(c, v) then
        raise { op = "verify", code = "gate_failed", value = v, threshold = c.below or c.above,
          query = c.query,
          message = ("%s is %s, not %s %s (query: %s)"):format(c.name, show(v, c.unit), c.below and "below" or "above",
            show(c.below or c.above, c.unit), c.query) }
      end
      values[c.name], shown[i] = v, ("%s %s"):format(c.name, show(v, c.unit))
    end
    n = n + 1
    if missing then
      if host.now() - started >= warmup then no_data("verify", missing.query) end
      if host.now() - last_log >= 10 then
        log.info("%s: no data yet (waiting up to %s for a first value)", missing.name, duration.format(warmup))
        last_log = host.now()
      end
    else
      local first = since == nil
      since = since or host.now()
      local held = host.now() - since
      if held >= hold then
        log.info("%s held for %s: %s", what, duration.format(hold), table.concat(shown, ", "))
        return { values = values, held = held, evaluations = n }
      end
      if first or host.now() - last_log >= 10 then
        log.info("%s (held %s of %s)", table.concat(shown, ", "), duration.format(held), duration.format(hold))
        last_log = host.now()
      end
      time.sleep(math.min(every, hold - held))
    end
    if missing then time.sleep(every) end
  end
end

-- ---- connecting ----------------------------------------------------------------

function M.connect(opts)
  opts = api:options(opts, "{url=, token=, username=, password=, ca_file=, headers=}")
  local url = opts.url or os.getenv("PROMETHEUS_URL")
  if url == nil or url == "" then
    error("prom: no Prometheus endpoint: set PROMETHEUS_URL or pass prom.connect{url = ...}", 2)
  end
  url = api:url(url, "url")
  local headers = { Accept = "application/json" }
  for k, v in pairs(opts.headers or {}) do headers[k] = v end
  if opts.token then
    host.secret(opts.token)
    headers.Authorization = "Bearer " .. opts.token
  elseif opts.username or opts.password then
    if type(opts.username) ~= "string" or type(opts.password) ~= "string" then
      error("prom.connect: basic auth needs both username and password (strings)", 2)
    end
    host.secret(opts.password)
    headers.Authorization = "Basic " .. require("base64").encode(opts.username .. ":" .. opts.password)
    host.secret(headers.Authorization)
  end
  return api:client(opts, { url = url, headers = headers }, "30s")
end

api:export { "query", "query_range", "value", "alerts", "rules", "targets", "verify" }

return M
