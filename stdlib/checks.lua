--- checks: the dependency checks runbooks share (outage-recovery,
-- daily-health-check): PostgreSQL connections against max_connections, Redis
-- PING, every Kafka broker answering, the namespace's Dapr sidecars, and the
-- local Dapr sidecar. A backend not configured here (no DATABASE_URL,
-- REDIS_URL, KAFKA_BROKERS, DAPR_HTTP_ENDPOINT/PORT) is skipped and says so.
--
--   checks.dependencies{namespace = "todo-chatbot", pg_connections_warn = 0.8,
--                       from_pod = "deploy/todo-chatbot-backend"}
--     -> {dependencies = {[name] = {ok, skipped, error, ...}}, down = {name...}}
--
-- With from_pod, PostgreSQL and Redis are also checked from inside that pod
-- (checks.in_pod: a read k8s.exec of psql and redis-cli with the container's
-- own DATABASE_URL and REDIS_URL), so "it answers from here" is not taken for
-- "the app can reach it". A container without the tool or the variable is
-- skipped and says so.
--
-- And the error rate after a change (rollback, blue-green-switch,
-- outage-recovery): the 5xx share of http_requests_total must stay under
-- `below` for `hold` (a metric gate, prom.verify). With settle (a real run
-- right after a change), it first waits one rate window, so only the time
-- since the change counts. No data is waited for up to one rate window (new
-- pods have no series yet) before it fails. Without PROMETHEUS_URL it is
-- skipped and says so.
--
--   checks.error_rate{name = "backend error rate", selector = 'namespace="x",deployment="y"',
--                     below = 0.01, window = "1m", hold = "2m", every = "15s", settle = true}
--     -> {skipped = true} | prom.verify's result
local M = {}

--- The PromQL of the 5xx share of http_requests_total{selector} over `window`,
-- summed by `by` (labels, e.g. "service"; nil for one value); with `status`
-- (a regular expression, "429") the share of those statuses instead. A series
-- with requests but none of those statuses counts as 0, not as no data: a
-- service that never failed has no 5xx series at all.
function M.error_rate_query(selector, window, by, status)
  local sum = by and ("sum by (%s) "):format(by) or "sum "
  local all = ("%s(rate(http_requests_total{%s}[%s]))"):format(sum, selector, window)
  return ('(%s(rate(http_requests_total{%s,status=~"%s"}[%s])) or %s * 0) / %s'):format(sum, selector,
    status or "5..", window, all, all)
end

function M.error_rate(opts)
  local log = require("log")
  if (os.getenv("PROMETHEUS_URL") or "") == "" then
    log.info("%s: no PROMETHEUS_URL, not checked", opts.name)
    return { skipped = true }
  end
  if opts.settle and not require("gate").dry_run() then
    log.info("waiting %s (one rate window) so that only the time since the change counts", opts.window)
    require("time").sleep(opts.window)
  end
  return require("prom").verify { name = opts.name, query = M.error_rate_query(opts.selector, opts.window),
    unit = "percent", below = opts.below,
    hold = opts.hold, every = opts.every or "15s", warmup = opts.warmup or opts.window }
end

-- What each in-pod check runs (sh -c) with the container's own env; exit 127:
-- the container has no such tool or variable, so it cannot tell.
local IN_POD = {
  postgres = 'test -n "$DATABASE_URL" && command -v psql >/dev/null || { echo "no DATABASE_URL or psql" >&2; exit 127; }; '
    .. 'PGCONNECT_TIMEOUT=5 psql -X -q -At -d "$DATABASE_URL" -c "SELECT 1" >/dev/null',
  redis = 'test -n "$REDIS_URL" && command -v redis-cli >/dev/null || { echo "no REDIS_URL or redis-cli" >&2; exit 127; }; '
    .. 'out=$(redis-cli -u "$REDIS_URL" --no-auth-warning ping 2>&1); test "$out" = PONG || { echo "$out" >&2; exit 1; }',
}

--- PostgreSQL ("postgres": connects and runs SELECT 1 with psql) or Redis
-- ("redis": PING) from inside a pod of `target` (deploy/NAME, pod/NAME), with
-- its container's own DATABASE_URL or REDIS_URL (a read k8s.exec):
-- {ok = true} | {ok = true, skipped = true} (no such tool or variable) |
-- {ok = false, error = the client's last line}; opts.namespace, opts.container.
function M.in_pod(name, target, opts)
  local log = require("log")
  local what = ("%s from %s"):format(name, target)
  local r = require("k8s").exec(target, { "sh", "-c", IN_POD[name] or error("checks.in_pod: postgres or redis", 2) },
    { namespace = opts.namespace, container = opts.container, read = true, check = false, timeout = "20s" })
  local last = ((r.stderr .. r.stdout):gsub("%s+$", "")):match("([^\n]*)$")
  if r.status == 127 then
    log.info("%s: not checked (%s)", what, last)
    return { ok = true, skipped = true }
  end
  if r.status ~= 0 then return { ok = false, error = ("unreachable from %s: %s"):format(r.pod, last) } end
  log.info("%s: answers", what)
  return { ok = true, pod = r.pod }
end

function M.dependencies(opts)
  opts = opts or {}
  local warn_share = opts.pg_connections_warn or 0.8
  local log = require("log")
  local deps, down = {}, {}
  local function check(name, configured, fn)
    if not configured then
      deps[name] = { ok = true, skipped = true }
      log.info("%s: not configured here, not checked", name)
      return
    end
    local ok, res = pcall(fn)
    if ok then deps[name] = res else
      require("runbook.host").check_deadline() -- a timed-out step or Ctrl-C is not a failed check
      deps[name] = { ok = false, error = tostring(type(res) == "table" and res.message or res) }
    end
    if not deps[name].ok then down[#down + 1] = name; log.warn("%s: %s", name, deps[name].error) end
  end
  check("postgres", os.getenv("DATABASE_URL"), function()
    local db <close> = require("pg").connect(nil, { connect_timeout = "5s", timeout = "10s" })
    local a = db:activity()
    local share = a.total / a.max_connections
    log.info("postgres: %d of %d connections (%.0f%%)", a.total, a.max_connections, share * 100)
    if share >= warn_share then
      return { ok = false, connections = a.total, max = a.max_connections,
        error = ("%d of %d connections in use: see db-pool-exhausted"):format(a.total, a.max_connections) }
    end
    return { ok = true, connections = a.total, max = a.max_connections }
  end)
  check("redis", os.getenv("REDIS_URL"), function()
    local r <close> = require("redis").connect(nil, { connect_timeout = "5s", timeout = "5s" })
    log.info("redis: %s", tostring(r:ping()))
    return { ok = true }
  end)
  check("kafka", os.getenv("KAFKA_BROKERS"), function()
    local bs, up, bad = require("kafka").brokers { probe_timeout = "3s" }, {}, {}
    for _, b in ipairs(bs) do
      if b.reachable then up[#up + 1] = b.id else bad[#bad + 1] = ("%s:%d (%s)"):format(b.host, b.port, b.reason or "?") end
    end
    log.info("kafka: %d of %d brokers reachable", #up, #bs)
    if #bad > 0 then return { ok = false, reachable = #up, brokers = #bs, error = "unreachable: " .. table.concat(bad, ", ") } end
    return { ok = true, reachable = #up, brokers = #bs }
  end)
  local function from_pod(name)
    if not opts.from_pod then return end   -- the in-pod checks are asked for, not configured
    check(("%s from %s"):format(name, opts.from_pod), true, function()
      return M.in_pod(name, opts.from_pod, { namespace = opts.namespace })
    end)
  end
  from_pod("postgres")
  from_pod("redis")
  local dapr = require("dapr")
  check("dapr sidecars", opts.namespace, function()
    local s = dapr.sidecar_status(opts.namespace)
    local bad = {}
    for _, p in ipairs(s.pods) do if p.problem then bad[#bad + 1] = p.pod .. ": " .. p.problem end end
    log.info("dapr: %d of %d sidecars ready", #s.pods - #bad, #s.pods)
    if #bad > 0 then return { ok = false, error = table.concat(bad, "; ") } end
    return { ok = true, pods = #s.pods }
  end)
  check("dapr", os.getenv("DAPR_HTTP_ENDPOINT") or os.getenv("DAPR_HTTP_PORT"), function()
    local ok, err = dapr.healthz()
    if not ok then return { ok = false, error = "healthz: " .. tostring(err and err.message or err) } end
    local out, oerr = dapr.healthz_outbound()
    if not out then return { ok = false, error = "healthz/outbound: " .. tostring(oerr and oerr.message or oerr) } end
    log.info("dapr: the local sidecar is healthy")
    return { ok = true }
  end)
  return { dependencies = deps, down = down }
end

return M
