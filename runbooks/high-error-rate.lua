-- high-error-rate.lua: a service answering too many 5xx: find out whether it
-- began with the last change, roll back or restart, and verify the rate stays
-- down.
--
-- Replaces seed 000 "High Error Rate", seed 003 "High Error Rate Alert" and
-- seed 004 "High Error Rate" (the error rate from Prometheus, rollout history,
-- rollout undo when deployment-related, dependency checks, scale or restart).
-- The dependencies are checked from here and from inside the service's own
-- pod, with its env (seed 003's `kubectl exec ... health:db`, seed 004's
-- psql and redis-cli from a debug pod in the namespace): what the app reaches,
-- not only what this machine reaches. The scale-up (seed 003 and 004 "scale
-- up if needed") is the scale runbook's step, asked for with `replicas`.
-- The error rate is read per service and version; "began with the last
-- change" means the rate was under the threshold just before the current
-- template's revision appeared (or, without data from then, that the change is
-- younger than `recent`).
--
--   runbook run high-error-rate -p service=backend --step

name = "high-error-rate"
description = "Measure a service's 5xx rate per version, roll back if it began with the last change (else restart), verify it stays down"
replaces = { "000-11", "003-7", "004-1" }
version = "1.0.0"

params (steps.metric_params) { "service", "deployment", "namespace", "window", "hold", "every" }
param "max_error_rate" { type = "number", default = 0.01, help = "the 5xx share the service must stay under (seed 000: warning above 1%)" }
param "log_since" { type = "duration", default = "5m", help = "how far back the pods' logs are read for the top error messages (seed 000: kubectl logs --since=5m)" }
param "recent" { type = "duration", default = "1h", help = "without data from before the last change, a change this young is blamed" }
param "timeout" { type = "duration", default = "5m", help = "how long the rollback, restart or scale-up may take to roll out" }
param "replicas" { type = "integer", default = 0,
  help = "after the fix, scale up to this many replicas when it has fewer (seeds 003 and 004: when capacity is the issue); 0 does not scale" }

local deployment = steps.service_deployment
local function target(ctx) return "deploy/" .. deployment(ctx) end

local ERROR_RATE = steps.metric { name = "error rate", unit = "percent", max = "max_error_rate", by = "service, version",
  query = checks.error_rate_query }

step "Measure the error rate" (steps.measure_metric {
  description = "The 5xx share of every service and version in the namespace, and the service's own",
  metric = ERROR_RATE,
})

step "Top error messages" (steps.top_errors {
  description = "kubectl logs --since=<log_since> | jq select(.level == \"ERROR\") | sort | uniq -c: which error, in every pod of the deployment",
  needs = { "Measure the error rate" },
  when = function(ctx) return ctx.outputs["Measure the error rate"].high end,
  deployment = deployment,
  since = function(ctx) return ctx.params.log_since end,
})

step "Compare with the last change" {
  description = "Did the rate begin with the current template's revision (rollout history, and the rate just before it)?",
  needs = { "Measure the error rate" },
  when = function(ctx) return ctx.outputs["Measure the error rate"].high end,
  run = function(ctx)
    local change = k8s.last_change(target(ctx), { namespace = ctx.params.namespace })
    local before = change.created and prom.value(ERROR_RATE:promql(ctx), { time = change.created - 1, allow_empty = true })
    local began
    if before ~= nil then began = before < ctx.params.max_error_rate
    else began = (change.age or math.huge) < ctx.params.recent end
    log.info("last change: revision %d (%s), %s ago; error rate just before it: %s", change.revision,
      table.concat(change.images, ", "), duration.format(change.age or 0), ERROR_RATE:show(before))
    local decision = began and change.previous and "rollback" or "restart"
    if began and not change.previous then log.warn("it began with revision %d, but there is no revision before it", change.revision) end
    log.info(decision == "rollback" and "the errors began with the last change: roll back to revision %s"
      or "the errors did not begin with the last change: restart (%s)", change.previous and change.previous.revision or "-")
    return { decision = decision, to_revision = change.previous and change.previous.revision, began = began }
  end,
}

step "Check the dependencies" {
  description = "PostgreSQL, Redis, Kafka and the Dapr sidecars, as outage-recovery checks them, and PostgreSQL and Redis "
    .. "from inside the service's pod with its env: a fix in the service cannot mend a dependency",
  needs = { "Measure the error rate" },
  when = function(ctx) return ctx.outputs["Measure the error rate"].high end,
  run = function(ctx)
    local deps = checks.dependencies { namespace = ctx.params.namespace, from_pod = target(ctx) }
    if #deps.down > 0 then
      error(("dependencies down: %s (run outage-recovery; a rollback or restart of %s would not help)"):format(
        table.concat(deps.down, ", "), deployment(ctx)), 0)
    end
    return { down = deps.down }
  end,
}

step "Roll back" {
  description = "kubectl rollout undo to the revision before the last change, and wait for it",
  needs = { "Measure the error rate", "Compare with the last change" },
  confirm = true,
  when = function(ctx)
    local c = ctx.outputs["Compare with the last change"]
    return ctx.outputs["Measure the error rate"].high and c ~= nil and c.decision == "rollback"
  end,
  run = function(ctx)
    local to = ctx.outputs["Compare with the last change"].to_revision
    k8s.rollout_undo(target(ctx), { namespace = ctx.params.namespace, to_revision = to })
    k8s.rollout_status(target(ctx), { namespace = ctx.params.namespace, timeout = ctx.params.timeout, fail_fast = true })
    return { revision = to }
  end,
}

step "Restart" {
  description = "kubectl rollout restart, and wait for it",
  needs = { "Measure the error rate", "Compare with the last change" },
  confirm = true,
  when = function(ctx)
    local c = ctx.outputs["Compare with the last change"]
    return ctx.outputs["Measure the error rate"].high and c ~= nil and c.decision == "restart"
  end,
  run = function(ctx)
    k8s.rollout_restart(target(ctx), { namespace = ctx.params.namespace })
    k8s.rollout_status(target(ctx), { namespace = ctx.params.namespace, timeout = ctx.params.timeout, fail_fast = true })
  end,
}

step "Scale up" (steps.scale {
  description = "kubectl scale --replicas=<replicas> when the deployment has fewer (as the scale runbook does)",
  needs = { "Measure the error rate" },
  when = function(ctx) return ctx.outputs["Measure the error rate"].high and ctx.params.replicas > 0 end,
  deployments = function(ctx)
    local have = k8s.get(target(ctx), { namespace = ctx.params.namespace }).spec.replicas or 1
    if have >= ctx.params.replicas then
      log.info("%s has %d replicas already, not fewer than %d: not scaling", deployment(ctx), have, ctx.params.replicas)
      return {}
    end
    return { { name = deployment(ctx), replicas = have } }
  end,
})

step "Wait for the scale-up" (steps.wait_rollouts { of = "Scale up" })

step "Verify the replicas" (steps.verify_deployments { of = "Scale up", check = "scaled" })

step "Verify the error rate" (steps.verify_metric {
  description = "After one rate window (so only the time since the fix counts), the rate must stay under max_error_rate for `hold`",
  metric = ERROR_RATE, measured = "Measure the error rate",
})
