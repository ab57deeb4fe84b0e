-- rollback.lua: roll a deployment back to an earlier revision and check it serves.
--
-- Replaces seed 004 "Rollback Procedure" (kubectl rollout history / undo /
-- status, then curl /health). The difference from a bare `rollout undo`: the
-- default target is the revision before the deployment's last real change,
-- so a `rollout restart` done while firefighting does not make "undo" land on
-- the same broken image again.
--
--   runbook run rollback -p deployment=todo-chatbot-backend --step
--   runbook run rollback -p deployment=todo-chatbot-backend -p to_revision=3

name = "rollback"
description = "Roll a deployment back to the revision before its last change (or a given one), wait, verify /health and the error rate"
replaces = { "000-5", "004-9" }
version = "1.0.0"

params (steps.params) { "deployment", "namespace" }
param "to_revision" { type = "integer", default = 0,
  help = "revision to go back to (0: the one before the last change, looking past rollout restarts)" }
param "timeout" { type = "duration", default = "5m", help = "how long the rollback may take to roll out" }
param "health_path" (steps.params.health_path)
param "max_error_rate" { type = "number", default = 0.01, help = "after the rollback, its 5xx share must stay below this (Prometheus; skipped without PROMETHEUS_URL)" }
param "error_rate_window" (steps.params.error_rate_window)
param "error_rate_hold" { type = "duration", default = "2m", help = "how long the error rate must hold after the rollback" }
param "metrics_selector" { default = "", help = "PromQL labels of the deployment's requests (default: namespace and deployment)" }

local function target(ctx) return "deploy/" .. ctx.params.deployment end
local function ns(ctx) return { namespace = ctx.params.namespace } end

step "Show the rollout history" {
  description = "kubectl rollout history: each revision's images and change cause, and which change is current",
  run = function(ctx)
    local hist = k8s.rollout_history(target(ctx), ns(ctx))
    local change = k8s.last_change(target(ctx), ns(ctx))
    for _, h in ipairs(hist) do
      log.info("revision %d%s: %s  %s", h.revision, h.revision == change.revision and " (last change)" or "",
        table.concat(h.images, ", "), h.change_cause or "")
    end
    log.info("current template: revision %d, changed %s ago%s", change.revision, duration.format(change.age or 0),
      change.restarts > 0 and (", restarted %d times since"):format(change.restarts) or "")
    local revisions = {}
    for _, h in ipairs(hist) do revisions[#revisions + 1] = h.revision end
    return { revisions = revisions, current = change.revision, images = change.images,
      previous = change.previous and change.previous.revision or nil }
  end,
}

step "Pick the revision" {
  description = "The revision to return to: to_revision, or the one before the last change; it must exist and differ",
  needs = { "Show the rollout history" },
  run = function(ctx, h)
    local to = ctx.params.to_revision ~= 0 and ctx.params.to_revision or h.previous
    if not to then error(("%s has no revision before %d to roll back to"):format(ctx.params.deployment, h.current), 0) end
    local known = false
    for _, r in ipairs(h.revisions) do known = known or r == to end
    if not known then
      error(("%s has no revision %d (it has %s)"):format(ctx.params.deployment, to,
        table.concat(h.revisions, ", ")), 0)
    end
    if to == h.current then error(("revision %d is the current template already"):format(to), 0) end
    for _, r in ipairs(k8s.rollout_history(target(ctx), ns(ctx))) do
      if r.revision == to then
        log.info("rolling back to revision %d: %s", to, table.concat(r.images, ", "))
        return { revision = to, images = r.images }
      end
    end
  end,
}

step "Roll back" {
  description = "kubectl rollout undo --to-revision",
  needs = { "Pick the revision" },
  confirm = true,
  run = function(ctx, picked)
    local to = picked.revision
    k8s.rollout_undo(target(ctx), { namespace = ctx.params.namespace, to_revision = to })
    return { revision = to }
  end,
}

step "Wait for the rollout" (steps.rollout_status { target = target })

step "Verify health" (steps.verify_health {})

step "Verify the error rate" {
  description = "After one rate window, the deployment's 5xx share must stay under max_error_rate for error_rate_hold (Prometheus)",
  run = function(ctx)
    local sel = ctx.params.metrics_selector ~= "" and ctx.params.metrics_selector
      or ('namespace="%s",deployment="%s"'):format(ctx.params.namespace, ctx.params.deployment)
    checks.error_rate { name = ctx.params.deployment .. " error rate", selector = sel, below = ctx.params.max_error_rate,
      window = ctx.params.error_rate_window, hold = ctx.params.error_rate_hold, every = "5s", settle = true }
  end,
}
