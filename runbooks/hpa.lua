-- hpa.lua: create or adjust a deployment's HorizontalPodAutoscaler: its min and
-- max replicas, a CPU target, and optionally seed 002's consumer-lag metric.
--
-- Replaces seed 002 "Horizontal Pod Autoscaler" (kubectl autoscale --min --max
-- --cpu-percent, and the autoscaling/v2 manifest with the kafka_consumer_lag
-- Pods metric) and seed 004 "Adjust HPA" (kubectl edit hpa, get hpa, describe
-- hpa). The HPA is the one whose scaleTargetRef is the deployment, else a new
-- one named after it, as kubectl autoscale names it. A failure puts the old
-- spec back, or deletes the HPA it created (on_failure = "undo"). The sandbox's
-- API stand-in computes an HPA's desired replicas but serves no custom metrics:
-- that the lag metric drives scaling is the cluster's metrics adapter's part.
--
--   runbook run hpa -p deployment=todo-chatbot-backend -p min=2 -p max=10 -p cpu=70
--   runbook run hpa -p deployment=todo-chatbot-recurring-task -p max=12 -p lag_metric=kafka_consumer_lag

name = "hpa"
description = "Create or adjust a deployment's HPA: min and max replicas, a CPU target, a consumer-lag metric; verify; the old one back on failure"
replaces = { "002-5", "004-11" }
version = "1.0.0"
on_failure = "undo"

param "deployment" { required = true, help = "the deployment the HPA scales" }
param "min" { type = "integer", default = 1, help = "minReplicas" }
param "max" { type = "integer", required = true, help = "maxReplicas (seed 002: the topic's partitions for a consumer)" }
param "cpu" { type = "integer", default = 70, help = "target average CPU utilization, percent of the requests (0: none)" }
param "lag_metric" { default = "", help = "a Pods metric to scale on as well, e.g. kafka_consumer_lag (seed 002)" }
param "lag_target" { type = "integer", default = 100, help = "the lag metric's target average value per pod" }
param "namespace" (steps.params.namespace)
param "timeout" { type = "duration", default = "1m", help = "how long the HPA controller may take to observe the new spec" }

--- The spec's metrics from the params.
local function metrics(ctx)
  local m = {}
  if ctx.params.cpu > 0 then
    m[#m + 1] = { type = "Resource", resource = { name = "cpu",
      target = { type = "Utilization", averageUtilization = ctx.params.cpu } } }
  end
  if ctx.params.lag_metric ~= "" then
    m[#m + 1] = { type = "Pods", pods = { metric = { name = ctx.params.lag_metric },
      target = { type = "AverageValue", averageValue = tostring(ctx.params.lag_target) } } }
  end
  return m
end

step "Read the HPA" {
  description = "kubectl get hpa: the one that scales the deployment, and its spec now",
  run = function(ctx)
    local p = ctx.params
    if p.min < 1 or p.max < p.min then error(("min %d and max %d: expected 1 <= min <= max"):format(p.min, p.max), 0) end
    if #metrics(ctx) == 0 then error("no metric to scale on: set cpu above 0, or lag_metric", 0) end
    k8s.get("deploy/" .. p.deployment, { namespace = p.namespace })
    for _, h in ipairs(k8s.list("horizontalpodautoscalers", { namespace = p.namespace })) do
      local ref = h.spec.scaleTargetRef
      if ref.kind == "Deployment" and ref.name == p.deployment then
        log.info("%s scales %s: min %d, max %d, %d metrics", h.metadata.name, p.deployment, h.spec.minReplicas or 1,
          h.spec.maxReplicas, #(h.spec.metrics or {}))
        return { name = h.metadata.name, old = { minReplicas = h.spec.minReplicas or 1, maxReplicas = h.spec.maxReplicas,
          metrics = h.spec.metrics or k8s.array() } }
      end
    end
    log.info("no HPA scales %s: one named %s will be created", p.deployment, p.deployment)
    return { name = p.deployment }
  end,
}

step "Apply the HPA" {
  description = "kubectl patch the HPA's spec, or create it (undo: the old spec, or the new HPA deleted)",
  confirm = true,
  needs = { "Read the HPA" },
  run = function(ctx, found)
    local p = ctx.params
    local spec = { minReplicas = p.min, maxReplicas = p.max, metrics = metrics(ctx) }
    if found.old then
      k8s.patch("horizontalpodautoscalers/" .. found.name, { spec = spec }, { namespace = p.namespace, type = "merge" })
    else
      spec.scaleTargetRef = { apiVersion = "apps/v1", kind = "Deployment", name = p.deployment }
      k8s.create({ apiVersion = "autoscaling/v2", kind = "HorizontalPodAutoscaler",
        metadata = { name = found.name, namespace = p.namespace }, spec = spec }, { namespace = p.namespace })
    end
  end,
  undo = function(ctx)
    local found = ctx.outputs["Read the HPA"]
    if found.old then
      k8s.patch("horizontalpodautoscalers/" .. found.name, { spec = found.old }, { namespace = ctx.params.namespace, type = "merge" })
    else
      k8s.delete("horizontalpodautoscalers/" .. found.name, { namespace = ctx.params.namespace })
    end
  end,
}

step "Verify" {
  description = "kubectl describe hpa: the spec as set, and the controller's desired replicas within min and max",
  needs = { "Read the HPA", "Apply the HPA" },
  run = function(ctx)
    local p = ctx.params
    local h
    time.wait_until({ timeout = p.timeout, what = "the HPA controller to observe the new spec" }, function()
      h = k8s.get("horizontalpodautoscalers/" .. ctx.outputs["Read the HPA"].name, { namespace = p.namespace, missing_ok = true })
      local st = h and h.status or {}
      return h and h.spec.minReplicas == p.min and h.spec.maxReplicas == p.max and #(h.spec.metrics or {}) == #metrics(ctx)
        and st.desiredReplicas and st.desiredReplicas >= p.min and st.desiredReplicas <= p.max
    end)
    if h then
      log.info("%s: min %d, max %d, desired %s, current %s", h.metadata.name, h.spec.minReplicas or 1, h.spec.maxReplicas,
        tostring((h.status or {}).desiredReplicas), tostring((h.status or {}).currentReplicas))
    end
  end,
}
