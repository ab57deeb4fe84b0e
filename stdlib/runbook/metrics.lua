--- The run metrics, in Prometheus's text format: what `serve` exposes on
-- /metrics for the runs it started, and what a run pushes to a Pushgateway
-- when it ends (`--push-metrics URL` or RUNBOOK_PUSHGATEWAY), so a cron job
-- that stopped running or succeeding is itself an alert:
--
--   runbook_runs_total{runbook, status}            counter (status: ok, failed, locked, ...)
--   runbook_run_duration_seconds{runbook}          histogram
--   runbook_last_success_timestamp_seconds{runbook} gauge
--
-- A pushed run adds itself to the counts of earlier runs of the same runbook
-- kept in $RUNBOOK_STATE_DIR/metrics/NAME.json (the runs of one runbook share
-- its lock, so one at a time updates them) and PUTs the whole group
-- job="runbook", runbook=NAME: the Pushgateway keeps the last push of each
-- runbook.
local host = require("runbook.host")
local cjson = require("cjson")
local EXIT = require("runbook.exit")

local M = {}

-- Upper bounds (seconds) of the run-duration histogram's buckets.
M.BUCKETS = { 1, 5, 15, 60, 300, 900, 3600 }

M.PUSH_TIMEOUT = 5   -- seconds the push may take, connecting included

local STATUS = {}
for name, code in pairs(EXIT) do
  if type(code) == "number" then STATUS[code] = name end
end
STATUS[EXIT.interrupted(2)], STATUS[EXIT.interrupted(15)] = "interrupted", "interrupted"

--- The status label of exit status `code`: "ok", "failed", "locked", ...
function M.status(code) return STATUS[code] or ("exit " .. tostring(code)) end

--- Empty metrics: {runs = {["rb\0status"] = n}, durations = {rb = {count, sum, buckets}}, last_success = {rb = t}}.
function M.new() return { runs = {}, durations = {}, last_success = {} } end

--- Count a run of `rb` that ended with exit status `code` after `took` seconds.
function M.account(m, rb, code, took)
  local key = rb .. "\0" .. M.status(code)
  m.runs[key] = (m.runs[key] or 0) + 1
  local h = m.durations[rb] or { count = 0, sum = 0, buckets = {} }
  m.durations[rb] = h
  h.count, h.sum = h.count + 1, h.sum + took
  for i, le in ipairs(M.BUCKETS) do
    if took <= le then h.buckets[i] = (h.buckets[i] or 0) + 1 end
  end
  if code == EXIT.ok then m.last_success[rb] = host.wallclock() end
end

--- A label value escaped for the text format.
function M.label(v) return (tostring(v):gsub("[\\\"\n]", { ["\\"] = "\\\\", ['"'] = '\\"', ["\n"] = "\\n" })) end

local function sorted_keys(t)
  local keys = {}
  for k in pairs(t) do keys[#keys + 1] = k end
  table.sort(keys)
  return keys
end
M.sorted_keys = sorted_keys

--- The three families of `m`, through family(name, kind, help) and sample(name, labels, value).
function M.write(m, family, sample)
  local label = M.label
  family("runbook_runs_total", "counter", "Runs that ended, by runbook and exit status.")
  for _, k in ipairs(sorted_keys(m.runs)) do
    local rb, status = k:match("^(.-)%z(.*)$")
    sample("runbook_runs_total", ('{runbook="%s",status="%s"}'):format(label(rb), label(status)), m.runs[k])
  end
  family("runbook_run_duration_seconds", "histogram", "How long runs took, by runbook.")
  for _, rb in ipairs(sorted_keys(m.durations)) do
    local h, l = m.durations[rb], label(rb)
    for i, le in ipairs(M.BUCKETS) do
      sample("runbook_run_duration_seconds_bucket", ('{runbook="%s",le="%s"}'):format(l, le), h.buckets[i] or 0)
    end
    sample("runbook_run_duration_seconds_bucket", ('{runbook="%s",le="+Inf"}'):format(l), h.count)
    sample("runbook_run_duration_seconds_sum", ('{runbook="%s"}'):format(l), ("%.3f"):format(h.sum))
    sample("runbook_run_duration_seconds_count", ('{runbook="%s"}'):format(l), h.count)
  end
  family("runbook_last_success_timestamp_seconds", "gauge", "When a run of the runbook last succeeded.")
  for _, rb in ipairs(sorted_keys(m.last_success)) do
    sample("runbook_last_success_timestamp_seconds", ('{runbook="%s"}'):format(label(rb)),
      ("%.3f"):format(m.last_success[rb]))
  end
end

--- The text of `m`.
function M.text(m)
  local out = {}
  M.write(m, function(name, kind, help)
    out[#out + 1] = ("# HELP %s %s\n# TYPE %s %s"):format(name, help, name, kind)
  end, function(name, labels, v) out[#out + 1] = ("%s%s %s"):format(name, labels, v) end)
  return table.concat(out, "\n") .. "\n"
end

-- ---- the push ----------------------------------------------------------------------

local function state_path(rb)
  return require("runbook.journal").state_dir() .. "/metrics/" .. rb:gsub("[^%w%.%-_]", "_") .. ".json"
end

--- The earlier runs' metrics of `rb` (empty when none or unreadable).
local function load(rb)
  local m = M.new()
  local f = io.open(state_path(rb), "rb")
  if not f then return m end
  local ok, saved = pcall(cjson.decode, f:read("a"))
  f:close()
  if not (ok and type(saved) == "table") then return m end
  for status, n in pairs(type(saved.runs) == "table" and saved.runs or {}) do
    m.runs[rb .. "\0" .. status] = tonumber(n)
  end
  local h = saved.duration
  if type(h) == "table" and tonumber(h.count) and tonumber(h.sum) and type(h.buckets) == "table" then
    m.durations[rb] = { count = tonumber(h.count), sum = tonumber(h.sum), buckets = {} }
    for i in ipairs(M.BUCKETS) do m.durations[rb].buckets[i] = tonumber(h.buckets[i]) or 0 end
  end
  m.last_success[rb] = tonumber(saved.last_success)
  return m
end

local function save(rb, m)
  local runs = {}
  for k, n in pairs(m.runs) do runs[k:match("%z(.*)$")] = n end
  local h = m.durations[rb]
  local buckets = {}
  for i in ipairs(M.BUCKETS) do buckets[i] = h.buckets[i] or 0 end
  local journal = require("runbook.journal")
  journal.mkdirs(journal.state_dir() .. "/metrics")
  local ok, err = host.plan_write(state_path(rb), cjson.encode { runs = runs, last_success = m.last_success[rb],
    duration = { count = h.count, sum = h.sum, buckets = buckets } })
  if not ok then error(err, 0) end
end

--- Push the metrics of `rb`, with this run's (exit status `code`, `took`
-- seconds) added, to the Pushgateway at `url`. Returns true, or nil and why;
-- a failed push never changes how the run ended.
function M.push(url, rb, code, took)
  local ok, err = pcall(function()
    local m = load(rb)
    M.account(m, rb, code, took)
    save(rb, m)
    local r = require("runbook.http").report { method = "PUT", url = url:gsub("/+$", ""),
      path = { "metrics", "job", "runbook", "runbook", rb }, body = M.text(m),
      headers = { ["Content-Type"] = "text/plain; version=0.0.4" },
      timeout = M.PUSH_TIMEOUT, connect_timeout = M.PUSH_TIMEOUT }
    if r.status >= 400 then
      error(("the Pushgateway answered HTTP %d: %s"):format(r.status, r.body:sub(1, 200):gsub("%s+", " ")), 0)
    end
  end)
  if ok then return true end
  return nil, type(err) == "table" and err.message or tostring(err)
end

return M
