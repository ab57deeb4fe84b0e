-- high-latency.lua: a service answering slowly: p95 per service, CPU and
-- memory per pod, the slowest SQL statements, then scale out and verify.
--
-- Replaces seed 004 "High Latency" (request latency from the metrics, kubectl
-- top pods, pg_stat_statements ordered by mean_exec_time, then resources or
-- scale) and seed 000's "API latency p95 > 500ms: scale, check DB".
--
--   runbook run high-latency -p service=backend --step

name = "high-latency"
description = "Measure p95 latency per service, CPU and memory saturation and the slowest SQL; scale out, verify p95 stays down"
replaces = { "004-2" }
version = "1.0.0"

params (steps.metric_params) { "service", "deployment", "namespace", "window", "hold", "every" }
param "max_p95" { type = "duration", default = "500ms", help = "the p95 the service must stay under (seed 000: warning above 500ms)" }
param "stats_url" { default = "", secret = true, help = "PostgreSQL URL of the database where pg_stat_statements is installed (default $DATABASE_URL)" }
param "max_replicas" { type = "integer", default = 10, help = "scale out to twice the replicas, at most this many" }
param "timeout" { type = "duration", default = "5m", help = "how long the scale-out may take to roll out" }

local deployment = steps.service_deployment

local P95 = steps.metric { name = "p95 latency", unit = "seconds", max = "max_p95", by = "service",
  query = function(selector, window, by)
    return ('histogram_quantile(0.95, sum by (%sle) (rate(http_request_duration_seconds_bucket{%s}[%s])))'):format(
      by and by .. ", " or "", selector, window)
  end }

step "Measure the p95 latency" (steps.measure_metric {
  description = "p95 request latency of every service in the namespace, and the service's own",
  metric = P95,
})

step "Check saturation" (steps.resource_use {
  description = "kubectl top pods of the deployment: CPU and memory against their limits",
  deployment = deployment,
})

step "Find the slowest statements" {
  description = "pg_stat_statements: the 10 statements with the highest mean execution time (skipped without a database URL)",
  when = function(ctx) return ctx.params.stats_url ~= "" or (os.getenv("DATABASE_URL") or "") ~= "" end,
  run = function(ctx)
    local db <close> = pg.connect(ctx.params.stats_url ~= "" and ctx.params.stats_url or nil, { connect_timeout = "5s" })
    local rows, why = db:slow_statements(10)
    if not rows then
      log.warn("%s (see stats_url): slowest statements unknown", why)
      return { statements = 0 }
    end
    for _, r in ipairs(rows) do log.info("%8s ms  %6s calls  %s", tostring(r.mean_ms), tostring(r.calls), r.query) end
    return { statements = #rows }
  end,
}

step "Scale out" {
  description = "kubectl scale to twice the replicas (at most max_replicas), and wait for the new pods",
  needs = { "Measure the p95 latency", "Check saturation" },
  confirm = true,
  when = function(ctx) return ctx.outputs["Measure the p95 latency"].high end,
  run = function(ctx)
    local from = ctx.outputs["Check saturation"].replicas
    local to = math.min(ctx.params.max_replicas, math.max(1, from * 2))
    if to <= from then error(("%s already has %d replicas (max_replicas %d)"):format(deployment(ctx), from, ctx.params.max_replicas), 0) end
    k8s.scale("deploy/" .. deployment(ctx), to, { namespace = ctx.params.namespace })
    k8s.rollout_status("deploy/" .. deployment(ctx), { namespace = ctx.params.namespace, timeout = ctx.params.timeout, fail_fast = true })
    return { from = from, to = to }
  end,
}

step "Verify the latency" (steps.verify_metric {
  description = "After one rate window (so only the time since scaling counts), p95 must stay under max_p95 for `hold`",
  metric = P95, measured = "Measure the p95 latency",
})
