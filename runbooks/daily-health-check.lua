-- daily-health-check.lua: the morning check, for cron.
--
-- Replaces seed 003 "Daily Health Check" (curl /api/health, database and Redis
-- health through the app, WebSocket, disk) and its "Key Metrics" table, seed
-- 002's "Health Check" (pods in all namespaces, `dapr status -k`, the brokers)
-- seed 001's "Resource Constraints" (top pods and nodes against limits and
-- allocatable, Failed and Evicted pods) and seed 002's "Monitor Consumer Lag"
-- (every group, and a mail when unhealthy), and seed 001's "Routine Checks"
-- (error logs, topics' partitions, leaders and retention, database performance). The WebSocket endpoint is websocket_url, else $WEBSOCKET_URL (the sandbox sets
-- it), else not checked. Read only: every check runs even when an earlier one
-- failed, the last step gives the verdict, and the run exits 1 when something is unhealthy, so cron and
-- CI see it. With --output json each check's result is in its step_end
-- event's outputs and the verdict's outputs hold the whole summary.
--
--   runbook run daily-health-check --yes --output json >> /var/log/runbook/daily.jsonl
--   runbook run daily-health-check -p lag_threshold=5000
--   runbook run daily-health-check -p namespaces=all
--   SMTP_URL=smtp://mail:25 ALERT_EMAIL=ops@example.com runbook run daily-health-check --yes

name = "daily-health-check"
description = "Read-only health check of the namespaces: deployments and nodes, failed and evicted pods, Dapr's control plane, service /health, PostgreSQL and its performance, Redis, Kafka, every group's lag and the topics, error logs, the WebSocket endpoint, resource use of pods and nodes"
replaces = { "000-1", "000-15", "001-1", "001-3", "001-11", "001-12", "002-1", "002-9", "003-5", "003-6" }
version = "1.0.0"

param "namespace" (steps.params.namespace)
param "namespaces" { type = "list", default = "", help = "the namespaces whose deployments, pods and resource use are checked: NS,NS... or all (kubectl get pods -A); default the namespace" }
param "dapr_namespace" { default = "dapr-system", help = "the namespace of Dapr's control plane (dapr status -k)" }
param "health_path" (steps.params.health_path)
param "groups" { type = "list", default = "all", help = "consumer groups whose lag is checked: comma-separated, or all (every group the brokers list; where they cannot, those of the namespace's Dapr Kafka components)" }
param "lag_threshold" { type = "integer", default = 1000, help = "a group's total lag above this is unhealthy (seed 002: >1000)" }
param "pg_connections_warn" { type = "number", default = 0.8, help = "PostgreSQL connections at this share of max_connections are unhealthy (seed 003: 80%)" }
param "memory_warn" { type = "number", default = 0.85, help = "warn for a container using this share of its memory limit (seed 003: 85%)" }
param "metrics_window" { default = "5m", help = "PromQL rate window of the key metrics" }
param "disk_warn" { type = "number", default = 0.8, help = "a pod's log volume at this share full is a warning, 10 points more a problem (seed 003: df -h)" }
param "websocket_url" { default = "", help = "the WebSocket endpoint whose handshake and ping are checked (ws:// or wss://); default $WEBSOCKET_URL, neither: not checked" }
param "log_since" { type = "duration", default = "1h", help = "how far back each deployment's logs are reviewed for errors and warnings" }
param "error_log_warn" { type = "number", default = 0.2, help = "warn for a deployment whose log records are ERROR at this share or more" }
param "slow_query" { type = "duration", default = "5m", help = "an active PostgreSQL query running this long is a warning" }
param "cache_hit_warn" { type = "number", default = 0.9, help = "warn when PostgreSQL's buffer cache serves less than this share of the database's block reads" }
param "stats_url" { default = "", secret = true, help = "PostgreSQL URL of the database where pg_stat_statements is installed (default $DATABASE_URL)" }
param "retention_warn" { type = "duration", default = "1d", help = "warn for a topic that keeps its messages less long than this (retention.ms)" }
param "cpu_warn" { type = "number", default = 0.8, help = "warn for a container using this share of its CPU limit (seed 003: 80%)" }

-- An unhealthy run is mailed (seed 002's `mail -s "KAFKA LAG ALERT"`) when SMTP_URL
-- and ALERT_EMAIL are set (from ALERT_EMAIL_FROM, default runbook@localhost), and
-- posted to Slack when SLACK_WEBHOOK is (channel SLACK_CHANNEL, default #incidents).
local function env(name) local v = os.getenv(name); return v ~= "" and v or nil end
if env("SMTP_URL") and env("ALERT_EMAIL") or env("SLACK_WEBHOOK") then
  notify = { on_failure = {
    email = env("SMTP_URL") and env("ALERT_EMAIL") and { smtp_url = env("SMTP_URL"), to = env("ALERT_EMAIL"),
      from = env("ALERT_EMAIL_FROM") or "runbook@localhost" },
    slack = env("SLACK_WEBHOOK") and { webhook = env("SLACK_WEBHOOK"), channel = env("SLACK_CHANNEL") or "#incidents" },
  } }
end

-- Each check returns {problems = {...}, warnings = {...}} in its outputs.
local function findings()
  local f = { problems = {}, warnings = {} }
  function f.problem(fmt, ...) local m = fmt:format(...); f.problems[#f.problems + 1] = m; log.warn("%s", m) end
  function f.warning(fmt, ...) local m = fmt:format(...); f.warnings[#f.warnings + 1] = m; log.warn("%s", m) end
  return f
end

-- A check step: check(ctx, f) records what it finds in f and returns its other outputs.
local function check_step(description, check)
  return { description = description, run = function(ctx)
    local f = findings()
    local out = check(ctx, f) or {}
    out.problems, out.warnings = f.problems, f.warnings
    return out
  end }
end

local CHECKS = { "Deployments and nodes", "Failed and evicted pods", "Dapr control plane", "Services answer health checks",
  "Dependencies", "Consumer lag", "Topics", "Database performance", "Error logs", "WebSocket", "Resource use",
  "Disk use in pods", "Key metrics" }

-- The namespaces param as a list (the namespace when empty; every namespace for "all").
local function namespaces(ctx)
  local list = ctx.params.namespaces
  if list[1] == "all" then
    list = {}
    for i, ns in ipairs(k8s.list("namespaces")) do list[i] = ns.metadata.name end
  end
  if #list == 0 then list[1] = ctx.params.namespace end
  return list
end

local function message_of(err) return tostring(type(err) == "table" and err.message or err) end

-- Seed 000's and seed 003's key-metric tables: above `warn` a warning, above `critical` a problem.
-- In each query $ns is the namespace and $w the rate window; each row is one service or pod.
local KEY_METRICS = {
  { what = "error rate", unit = "percent", warn = 0.01, critical = 0.05, by = "service",
    query = checks.error_rate_query('namespace="$ns"', "$w", "service") },
  { what = "p95 latency", unit = "seconds", warn = 0.5, critical = 2, by = "service",
    query = 'histogram_quantile(0.95, sum by (service, le) (rate(http_request_duration_seconds_bucket{namespace="$ns"}[$w])))' },
  { what = "restarts in the last hour", warn = 3, critical = 10, by = "pod",
    query = 'sum by (pod) (increase(kube_pod_container_status_restarts_total{namespace="$ns"}[1h]))' },
  { what = "WebSocket connections", warn = 400, critical = 480, by = "service",
    query = 'sum by (service) (websocket_connections{namespace="$ns"})' },
  { what = "database pool usage", unit = "percent", warn = 0.8, critical = 0.9, by = "service",
    query = 'sum by (service) (db_pool_connections_in_use{namespace="$ns"}) / sum by (service) (db_pool_connections_max{namespace="$ns"})' },
}

step "Deployments and nodes" (check_step("kubectl get deploy,nodes in each of the namespaces: every deployment has its replicas ready with no waiting reason, every node Ready",
  function(ctx, f)
    local list, healthy, total, nodes = namespaces(ctx), 0, 0, 0
    for _, ns in ipairs(list) do
      local h = k8s.namespace_health(ns)
      for _, p in ipairs(h.problems) do f.problem("%s%s", #list > 1 and (ns .. ": ") or "", p) end
      for _, d in ipairs(h.deployments) do if d.healthy then healthy = healthy + 1 end end
      total, nodes = total + #h.deployments, #h.nodes
    end
    log.info("%d of %d deployments healthy in %d namespace(s); %d nodes", healthy, total, #list, nodes)
    return { deployments = total, healthy = healthy, nodes = nodes, namespaces = list }
  end))

step "Failed and evicted pods" (check_step("kubectl get pods -A --field-selector=status.phase=Failed: pods that ended, evicted ones with the kubelet's reason (warnings: their workloads replaced them)",
  function(ctx, f)
    local wanted = {}
    for _, ns in ipairs(namespaces(ctx)) do wanted[ns] = true end
    local failed = {}
    for _, p in ipairs(k8s.list("pods", { all_namespaces = true, field_selector = "status.phase=Failed" })) do
      local ns = p.metadata.namespace
      if ctx.params.namespaces[1] == "all" or wanted[ns] then
        local st = p.status or {}
        failed[#failed + 1] = { namespace = ns, pod = p.metadata.name, reason = st.reason, message = st.message }
        f.warning("pod %s/%s %s%s: kubectl delete pod %s -n %s once understood", ns, p.metadata.name,
          st.reason == "Evicted" and "was evicted" or ("failed" .. (st.reason and (" (" .. st.reason .. ")") or "")),
          st.message and (": " .. st.message) or "", p.metadata.name, ns)
      end
    end
    log.info("%d failed or evicted pod(s)", #failed)
    return { failed = failed }
  end))

step "Dapr control plane" (check_step("dapr status -k: the deployments and statefulsets of Dapr's control plane (operator, placement, sentry, sidecar injector ...) in dapr_namespace are healthy, none scaled to 0",
  function(ctx, f)
    local ns = ctx.params.dapr_namespace
    local workloads = {}
    for _, d in ipairs(k8s.namespace_health(ns).deployments) do workloads[#workloads + 1] = { kind = "deployment", h = d } end
    for _, s in ipairs(k8s.list("statefulsets", { namespace = ns })) do
      workloads[#workloads + 1] = { kind = "statefulset", h = k8s.deployment_health(ns, "statefulset/" .. s.metadata.name) }
    end
    if #workloads == 0 then
      log.info("Dapr's control plane is not installed (no deployments or statefulsets in namespace %s): not checked", ns)
      return { checked = false }
    end
    local healthy = 0
    for _, w in ipairs(workloads) do
      local problems = w.h.problems
      if w.h.desired == 0 then problems = { "scaled to 0" } end
      for _, p in ipairs(problems) do f.problem("%s: %s %s: %s", ns, w.kind, w.h.name, p) end
      if #problems == 0 then healthy = healthy + 1 end
    end
    log.info("%d of %d control-plane workloads healthy in %s", healthy, #workloads, ns)
    return { checked = true, workloads = #workloads }
  end))

step "Services answer health checks" (check_step("curl /api/health for every service: GET health_path through each Service in front of a deployment",
  function(ctx, f)
    local n = 0
    for _, row in ipairs(k8s.services_health(ctx.params.namespace, { path = ctx.params.health_path }).services) do
      n = n + 1
      if not row.ok then f.problem("service %s %s: %s", row.service, ctx.params.health_path, row.error) end
    end
    log.info("%d services checked, %d failing", n, #f.problems)
    return { services = n }
  end))

step "Dependencies" (check_step("PostgreSQL connections against max_connections, Redis PING, Kafka brokers, Dapr sidecars and the local sidecar",
  function(ctx, f)
    local r = checks.dependencies { namespace = ctx.params.namespace, pg_connections_warn = ctx.params.pg_connections_warn }
    for _, name in ipairs(r.down) do f.problem("%s: %s", name, r.dependencies[name].error) end
    return { dependencies = r.dependencies }
  end))

-- The groups param as a list of names, and where they came from.
local function consumer_groups(ctx)
  if ctx.params.groups[1] ~= "all" then return ctx.params.groups, "named" end
  local ok, listed = pcall(kafka.list_groups)
  if ok then
    local list = {}
    for _, g in ipairs(listed) do list[#list + 1] = g.group end
    return list, "listed by the brokers"
  end
  if type(listed) ~= "table" or listed.code ~= "_UNSUPPORTED_FEATURE" then error(listed, 0) end
  local list = {}
  for _, g in ipairs(dapr.consumer_groups(ctx.params.namespace)) do list[#list + 1] = g.group end
  return list, "the brokers cannot list groups: those of the Dapr Kafka components' apps"
end

step "Consumer lag" (check_step("kafka-consumer-groups --all-groups --describe: each group's total lag against lag_threshold",
  function(ctx, f)
    if not os.getenv("KAFKA_BROKERS") then log.info("no brokers configured: lag not checked"); return end
    local ok, groups, source = pcall(consumer_groups, ctx)
    local r = groups
    if ok and #groups > 0 then ok, r = pcall(kafka.lag, { groups = groups, timeout = "10s" }) end
    if not ok then
      f.problem("consumer lag unreadable: %s", message_of(r))
      return
    end
    log.info("%d group(s), %s", #groups, source)
    local lags = {}
    for _, g in ipairs(r) do
      if #g.partitions == 0 then
        log.info("group %s: no committed offsets", g.group)
      elseif g.total > ctx.params.lag_threshold then
        lags[g.group] = g.total
        f.problem("group %s is %d messages behind (threshold %d): see kafka-lag-remediation", g.group, g.total,
          ctx.params.lag_threshold)
      else
        lags[g.group] = g.total
        log.info("group %s: lag %d", g.group, g.total)
      end
    end
    return { lag = lags, groups = groups }
  end))

-- How a topic's partitions spread over the brokers: {[broker id] = partitions it leads}, and a
-- complaint when a broker leads none (of a topic with as many partitions as brokers) or more than
-- twice its share.
local function spread(partitions, brokers)
  local leads = {}
  for _, b in ipairs(brokers) do leads[b.id] = 0 end
  for _, p in ipairs(partitions) do if p.leader >= 0 then leads[p.leader] = (leads[p.leader] or 0) + 1 end end
  if #partitions < #brokers then return leads end
  local share = #partitions / #brokers
  for _, b in ipairs(brokers) do
    local n = leads[b.id] or 0
    if n == 0 or n > 2 * share then
      return leads, ("broker %d leads %d of its %d partitions (an even spread is %.0f)"):format(b.id, n, #partitions, share)
    end
  end
  return leads
end

step "Topics" (check_step("kafka-topics --describe and kafka-configs --describe: every partition led and in sync, the leaders spread over the brokers, each topic's retention",
  function(ctx, f)
    if not os.getenv("KAFKA_BROKERS") then log.info("no brokers configured: topics not checked"); return { checked = false } end
    local brokers, out, configs = kafka.brokers { probe_timeout = "3s" }, {}, true
    for _, t in ipairs(kafka.topics()) do
      local d = kafka.describe_topic(t.name)
      local row = { topic = t.name, partitions = #d.partitions, messages = d.messages }
      for _, p in ipairs(d.partitions) do
        if p.leader < 0 then f.problem("topic %s partition %d has no leader", t.name, p.partition)
        elseif p.under_replicated then f.problem("topic %s partition %d is under-replicated (ISR %s of replicas %s)",
          t.name, p.partition, table.concat(p.isr, ","), table.concat(p.replicas, ",")) end
      end
      local why
      row.leaders, why = spread(d.partitions, brokers)
      if why then f.warning("topic %s: %s", t.name, why) end
      if configs then
        local ok, c = pcall(kafka.describe_configs, t.name, { timeout = "10s" })
        if ok then
          local ms = tonumber(c["retention.ms"] and c["retention.ms"].value)
          row.retention = ms and ms >= 0 and ms / 1000 or "unlimited"
          if ms and ms >= 0 and ms / 1000 < ctx.params.retention_warn then
            f.warning("topic %s keeps its messages %s (retention.ms), less than %s", t.name, duration.format(ms / 1000),
              duration.format(ctx.params.retention_warn))
          end
        else
          configs = false   -- the same answer for every topic: said once
          log.info("retention not read: %s", message_of(c))
        end
      end
      log.info("topic %s: %d partitions, %d messages%s", t.name, row.partitions, row.messages,
        type(row.retention) == "number" and (", retention " .. duration.format(row.retention)) or "")
      out[#out + 1] = row
    end
    return { checked = true, topics = out }
  end))

step "Database performance" (check_step("pg_stat_activity, pg_stat_statements, pg_stat_database, pg_stat_user_tables: queries running longer than slow_query, the slowest statements, the cache hit ratio, bloated tables",
  function(ctx, f)
    if (os.getenv("DATABASE_URL") or "") == "" then log.info("no DATABASE_URL: database performance not checked"); return { checked = false } end
    local db <close> = pg.connect(nil, { connect_timeout = "5s", timeout = "20s" })
    local long = db:activity { min_duration = ctx.params.slow_query }.long_running
    for _, q in ipairs(long) do
      f.warning("query %d (%s, %s) %s for %s: %s", q.pid, tostring(q.user), tostring(q.application_name), q.state,
        duration.format(q.seconds), q.query:gsub("%s+", " "):sub(1, 120))
    end
    local stats <close> = ctx.params.stats_url ~= "" and pg.connect(ctx.params.stats_url, { connect_timeout = "5s" }) or nil
    local slowest, why = (stats or db):slow_statements(5)
    for _, st in ipairs(slowest or {}) do log.info("%10.2f ms mean, %6d calls: %s", st.mean_ms, st.calls, st.query) end
    if not slowest then log.info("slowest statements unknown: %s (see stats_url)", why) end
    local hit = db:cache_hit_ratio()
    if hit and hit < ctx.params.cache_hit_warn then
      f.warning("the buffer cache serves %.1f%% of block reads (below %.0f%%): shared_buffers may be too small", 100 * hit,
        100 * ctx.params.cache_hit_warn)
    end
    local bloated = db:bloat()
    for _, t in ipairs(bloated) do
      f.warning("table %s: %d dead rows, %.0f%% of its rows (last vacuum %s): see db-maintenance", t.table, t.dead,
        100 * t.dead_share, tostring(t.last_vacuum or "never"))
    end
    log.info("%d long-running queries, cache hit %s, %d bloated tables", #long, hit and ("%.1f%%"):format(100 * hit) or "unknown", #bloated)
    return { checked = true, long_running = long, slowest = slowest, cache_hit_ratio = hit, bloated = bloated }
  end))

step "Error logs" (check_step("kubectl logs --since=log_since of every deployment's pods | jq select(.level == \"ERROR\" or .level == \"WARNING\"): counts and the top error; a high ERROR share is a warning",
  function(ctx, f)
    local out = {}
    for _, ns in ipairs(namespaces(ctx)) do
      for _, d in ipairs(k8s.list("deployments", { namespace = ns })) do
        local ok, r = pcall(k8s.log_query, { target = "deploy/" .. d.metadata.name, namespace = ns, since = ctx.params.log_since,
          where = { level = { "ERROR", "WARNING" } }, count_by = "level" })
        if ok then
          local by, top = {}, {}
          for _, b in ipairs(r.by) do by[b.value] = b.count end
          for _, rec in ipairs(r.records) do
            if rec.fields.level == "ERROR" then top[rec.fields.message or rec.line] = (top[rec.fields.message or rec.line] or 0) + 1 end
          end
          local worst, n = nil, 0
          for m, c in pairs(top) do if c > n or (c == n and m < worst) then worst, n = m, c end end
          local row = { namespace = ns, deployment = d.metadata.name, records = r.scanned, errors = by.ERROR or 0,
            warnings = by.WARNING or 0, top_error = worst }
          out[#out + 1] = row
          log.info("%s/%s: %d errors, %d warnings in %d records%s", ns, row.deployment, row.errors, row.warnings, row.records,
            worst and (("; most often (%d): %s"):format(n, worst)) or "")
          if r.scanned > 0 and row.errors / r.scanned >= ctx.params.error_log_warn then
            f.warning("%s/%s: %.0f%% of its log records are ERROR (%d of %d since %s), most often: %s", ns, row.deployment,
              100 * row.errors / r.scanned, row.errors, r.scanned, duration.format(ctx.params.log_since), worst)
          end
        else
          log.info("%s/%s: logs unreadable (%s)", ns, d.metadata.name, message_of(r))
        end
      end
    end
    return { deployments = out }
  end))

step "WebSocket" (check_step("curl -H 'Upgrade: websocket' URL: the endpoint completes the WebSocket handshake and answers a ping (seed 003)",
  function(ctx, f)
    local url = ctx.params.websocket_url ~= "" and ctx.params.websocket_url or os.getenv("WEBSOCKET_URL") or ""
    if url == "" then
      log.info("no websocket_url or WEBSOCKET_URL: WebSocket not checked")
      return { checked = false }
    end
    local ok, r = pcall(http.websocket, url, { timeout = "10s" })
    if not ok then
      f.problem("%s", tostring(type(r) == "table" and r.message or r))
      return { checked = true, url = url }
    end
    log.info("%s: handshake in %s, pong in %s", url, duration.format(r.connect), duration.format(r.pong))
    return { checked = true, url = url, connect = r.connect, pong = r.pong }
  end))

-- Warnings for what uses `warn` or more of its limit: usage and limit as {cpu_millicores, memory_bytes} and {cpu (cores), memory}.
local function near_limit(f, ctx, who, usage, limit, advice)
  if limit.memory and usage.memory_bytes >= ctx.params.memory_warn * limit.memory then
    f.warning("%s uses %.0f%% of its memory %s", who, 100 * usage.memory_bytes / limit.memory, advice.memory)
  end
  if limit.cpu and usage.cpu_millicores >= ctx.params.cpu_warn * limit.cpu * 1000 then
    f.warning("%s uses %.0f%% of its CPU %s", who, 100 * usage.cpu_millicores / (limit.cpu * 1000), advice.cpu)
  end
end

step "Resource use" (check_step("kubectl top pods and top nodes: containers near their memory (85%) or CPU (80%) limit, nodes near their allocatable memory or CPU, are warnings (seed 003's key metrics, seed 001's resource constraints)",
  function(ctx, f)
    local pods = 0
    for _, ns in ipairs(namespaces(ctx)) do
      local ok, usage = pcall(k8s.top, "pods", { namespace = ns })
      if not ok then
        f.warning("resource use in %s unknown (metrics API): %s", ns, message_of(usage))
      else
        local limits = {}
        for _, p in ipairs(k8s.list("pods", { namespace = ns })) do
          for _, c in ipairs(p.spec.containers) do
            local l = (c.resources or {}).limits or {}
            limits[p.metadata.name .. "/" .. c.name] = { memory = k8s.quantity(l.memory), cpu = k8s.quantity(l.cpu) }
          end
        end
        for _, p in ipairs(usage) do
          for _, c in ipairs(p.containers) do
            near_limit(f, ctx, p.name .. "/" .. c.name, c, limits[p.name .. "/" .. c.name] or {},
              { memory = "limit: check for a leak", cpu = "limit: consider scaling" })
          end
        end
        pods = pods + #usage
      end
    end
    local ok, usage = pcall(k8s.top, "nodes")
    if not ok then
      f.warning("node resource use unknown (metrics API): %s", message_of(usage))
      return { pods = pods }
    end
    local allocatable = {}
    for _, n in ipairs(k8s.list("nodes")) do
      local a = (n.status or {}).allocatable or {}
      allocatable[n.metadata.name] = { memory = k8s.quantity(a.memory), cpu = k8s.quantity(a.cpu) }
    end
    local nodes = {}
    for _, n in ipairs(usage) do
      local a = allocatable[n.name] or {}
      nodes[#nodes + 1] = { name = n.name, cpu_millicores = n.cpu_millicores, memory_bytes = n.memory_bytes,
        cpu_share = a.cpu and n.cpu_millicores / (a.cpu * 1000), memory_share = a.memory and n.memory_bytes / a.memory }
      log.info("node %s: cpu %dm (%s), memory %dMi (%s)", n.name, n.cpu_millicores,
        a.cpu and ("%.0f%%"):format(100 * nodes[#nodes].cpu_share) or "?", n.memory_bytes // 1048576,
        a.memory and ("%.0f%%"):format(100 * nodes[#nodes].memory_share) or "?")
      near_limit(f, ctx, "node " .. n.name, n, a, { memory = "allocatable: pods may be evicted", cpu = "allocatable" })
    end
    log.info("%d pods and %d nodes measured, %d warnings", pods, #nodes, #f.warnings)
    return { pods = pods, nodes = nodes }
  end))

step "Disk use in pods" (check_step("kubectl exec POD -- df -Pk /var/log in each running pod: a volume near full is a warning, nearer a problem (seed 003)",
  function(ctx, f)
    local n = 0
    for _, p in ipairs(k8s.list("pods", { namespace = ctx.params.namespace })) do
      if (p.status or {}).phase == "Running" then
        local ok, r = pcall(k8s.exec, "pod/" .. p.metadata.name, { "df", "-Pk", "/var/log" },
          { namespace = ctx.params.namespace, read = true, timeout = "10s" })
        local use = ok and tonumber(r.stdout:match("(%d+)%%%s+%S+%s*$"))
        if not use then
          log.info("%s: disk use unknown (%s)", p.metadata.name, ok and "no df output" or tostring(type(r) == "table" and r.message or r))
        else
          n = n + 1
          if use >= 100 * ctx.params.disk_warn + 10 then f.problem("%s: /var/log is %d%% full: run disk-cleanup", p.metadata.name, use)
          elseif use >= 100 * ctx.params.disk_warn then f.warning("%s: /var/log is %d%% full", p.metadata.name, use) end
        end
      end
    end
    log.info("%d pods measured, %d problems, %d warnings", n, #f.problems, #f.warnings)
    return { pods = n }
  end))

step "Key metrics" (check_step("Prometheus: error rate, p95, restarts per hour, WebSocket connections and pool usage against the seeds' warning and critical thresholds",
  function(ctx, f)
    if (os.getenv("PROMETHEUS_URL") or "") == "" then
      log.info("no PROMETHEUS_URL: key metrics not checked")
      return { checked = false }
    end
    local n = 0
    for _, m in ipairs(KEY_METRICS) do
      local q = m.query:gsub("%$ns", ctx.params.namespace):gsub("%$w", ctx.params.metrics_window)
      for _, r in ipairs(prom.query(q, { allow_empty = true })) do
        local v, who = r.value, r.labels[m.by] or "?"
        if v == v then
          n = n + 1
          if v > m.critical then f.problem("%s %s is %s (critical above %s)", who, m.what, prom.show(v, m.unit), prom.show(m.critical, m.unit))
          elseif v > m.warn then f.warning("%s %s is %s (warning above %s)", who, m.what, prom.show(v, m.unit), prom.show(m.warn, m.unit)) end
        end
      end
    end
    log.info("%d key-metric values read, %d critical, %d warnings", n, #f.problems, #f.warnings)
    return { checked = true, values = n }
  end))

step "Verdict" {
  description = "HEALTHY or UNHEALTHY with every problem and warning; exit 1 when unhealthy",
  uses = CHECKS,
  run = function(ctx)
    local problems, warnings, summary = {}, {}, {}
    for _, name in ipairs(CHECKS) do
      local o = ctx.skipped(name) and { problems = {}, warnings = { name .. " was not checked (skipped)" } }
        or ctx.outputs[name]
      summary[name] = ctx.skipped(name) and "skipped" or o.checked == false and "not checked"
        or #o.problems == 0 and "ok" or "failed"
      for _, p in ipairs(o.problems) do problems[#problems + 1] = p end
      for _, w in ipairs(o.warnings) do warnings[#warnings + 1] = w end
    end
    local MARK = { ok = "✅", failed = "❌", skipped = "➖", ["not checked"] = "➖" }
    for _, name in ipairs(CHECKS) do log.info("%s %s", MARK[summary[name]], name) end
    if #warnings > 0 then log.info("%d warnings (not failing the check)", #warnings) end
    if #problems > 0 then
      error(("UNHEALTHY: %d problem%s\n  %s"):format(#problems, #problems == 1 and "" or "s",
        table.concat(problems, "\n  ")), 0)
    end
    log.info("HEALTHY: %s", table.concat(CHECKS, ", "))
    return { healthy = true, checks = summary, warnings = warnings }
  end,
}
