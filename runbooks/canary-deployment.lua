-- canary-deployment.lua: a new image beside the stable one, traffic moved to it
-- by the Ingress canary weight 10 -> 25 -> 50 -> 100, each step gated on the
-- canary version's own error rate and p95 latency; then promoted.
--
-- Replaces seed 003 "Canary Deployment" ("error rate < 1%, p95 < 500ms at
-- 10% -> 25% -> 50% -> 100%"). A gate that breaks aborts the release: the
-- weight goes back to 0 at once, then every completed step is undone in
-- reverse (on_failure = "undo"): the canary Ingress, Service and Deployment are
-- removed, and the run fails naming the gate. Success sets the stable
-- deployment's image to the new tag and removes the canary.
--
--   runbook run canary-deployment -p deployment=todo-chatbot-backend -p tag=v1.5.0 --step
--
-- The canary is the stable deployment's pod template with the new tag, its
-- pods labelled apart (split_label gets "-canary"), so the stable Service never
-- selects them; its own Service gets the traffic through an nginx canary
-- Ingress (nginx.ingress.kubernetes.io/canary, canary-weight) copying the stable
-- Ingress's paths to the stable Service.

name = "canary-deployment"
description = "Deploy a canary of a new image, shift traffic 10/25/50/100% by Ingress weight, gated on its error rate and p95; promote or abort"
replaces = { "003-3" }
version = "1.0.0"
on_failure = "undo"

params (steps.params) { "deployment", "namespace" }
param "tag" { required = true, help = "the new image tag for the app container" }
param "ingress" { default = "todo-chatbot", help = "the Ingress that sends to the stable Service" }
param "service" { default = "", help = "the stable Service (default: the deployment's name)" }
param "split_label" { default = "app.kubernetes.io/instance", help = "pod label given a -canary suffix so the stable Service never selects the canary" }
param "max_error_rate" { type = "number", default = 0.01, help = "the canary's 5xx share must stay below this (seed 003: 1%)" }
param "max_p95" { type = "duration", default = "500ms", help = "the canary's p95 latency must stay below this (seed 003: 500ms)" }
param "interval" { type = "duration", default = "2m", help = "how long each weight must hold its gates" }
param "every" { type = "duration", default = "15s", help = "how often the gates are evaluated" }
param "window" { default = "1m", help = "PromQL rate window of the gate queries" }
param "warmup" { type = "duration", default = "1m", help = "how long a gate waits for the canary's first data" }
param "timeout" { type = "duration", default = "5m", help = "how long the canary and the promotion may take to roll out" }

local function ns(ctx) return { namespace = ctx.params.namespace } end
local function canary(ctx) return ctx.params.deployment .. "-canary" end
local function stable_service(ctx) return ctx.params.service ~= "" and ctx.params.service or ctx.params.deployment end
local function canary_ingress(ctx) return ctx.params.ingress .. "-canary" end
local CANARY, WEIGHT = "nginx.ingress.kubernetes.io/canary", "nginx.ingress.kubernetes.io/canary-weight"

-- The paths of the stable Ingress that send to the stable Service, pointed at the canary's.
local function canary_rules(ing, from, to)
  local rules = {}
  for _, rule in ipairs(ing.spec.rules or {}) do
    local paths = {}
    for _, p in ipairs((rule.http or {}).paths or {}) do
      local svc = p.backend and p.backend.service
      if svc and svc.name == from then
        paths[#paths + 1] = { path = p.path, pathType = p.pathType, backend = { service = { name = to, port = svc.port } } }
      end
    end
    if #paths > 0 then rules[#rules + 1] = { host = rule.host, http = { paths = paths } } end
  end
  return rules
end

local function gate(ctx)
  local o = ctx.outputs["Check the stable deployment"]
  local sel = ('namespace="%s",service="%s",version="%s"'):format(ctx.params.namespace, o.app, ctx.params.tag)
  local w = ctx.params.window
  return {
    { name = ("canary %s error rate"):format(ctx.params.tag), unit = "percent", below = ctx.params.max_error_rate,
      query = checks.error_rate_query(sel, w) },
    { name = ("canary %s p95 latency"):format(ctx.params.tag), unit = "seconds", below = ctx.params.max_p95,
      query = ('histogram_quantile(0.95, sum by (le) (rate(http_request_duration_seconds_bucket{%s}[%s])))'):format(sel, w) },
    hold = ctx.params.interval, every = ctx.params.every, warmup = ctx.params.warmup,
  }
end

local function set_weight(ctx, weight)
  k8s.patch("ingress/" .. canary_ingress(ctx), { metadata = { annotations = { [WEIGHT] = tostring(weight) } } },
    { namespace = ctx.params.namespace, type = "merge" })
end

step "Check the stable deployment" {
  description = "The stable deployment healthy, on another tag; its Service and the Ingress paths that send to it",
  run = function(ctx)
    local h = steps.healthy(ctx, ctx.params.deployment)
    local d = k8s.get("deploy/" .. ctx.params.deployment, ns(ctx))
    local app = d.spec.template.spec.containers[1]
    local current = app.image:match(":([^:/]+)$")
    if current == ctx.params.tag then error(("%s already runs %s"):format(ctx.params.deployment, ctx.params.tag), 0) end
    local svc = k8s.get("svc/" .. stable_service(ctx), ns(ctx))
    local rules = canary_rules(k8s.get("ingress/" .. ctx.params.ingress, ns(ctx)), stable_service(ctx), canary(ctx))
    if #rules == 0 then error(("ingress %s sends nothing to service %s"):format(ctx.params.ingress, stable_service(ctx)), 0) end
    log.info("%s: %d/%d ready on %s; the canary %s gets %s through ingress %s", ctx.params.deployment, h.ready, h.desired,
      current, canary(ctx), ctx.params.tag, canary_ingress(ctx))
    return { app = app.name, current = current, ports = svc.spec.ports, rules = rules }
  end,
}

step "Deploy the canary" {
  description = "One replica of the stable pod template with the new tag, its pods labelled apart",
  needs = { "Check the stable deployment" },
  run = function(ctx)
    local deployment, labels, image = steps.sibling_deployment { from = ctx.params.deployment, name = canary(ctx),
      namespace = ctx.params.namespace, tag = ctx.params.tag, split = ctx.params.split_label, what = "the canary",
      relabel = function(v) return v .. "-canary" end, replicas = 1,
      cause = ("canary-deployment of %s, tag %s"):format(ctx.params.deployment, ctx.params.tag) }
    k8s.create(deployment)
    return { name = canary(ctx), image = image, labels = labels }
  end,
  undo = function(ctx) k8s.delete("deploy/" .. canary(ctx), { namespace = ctx.params.namespace, missing_ok = true }) end,
}

step "Give it a Service" (steps.sibling_service { live = "Check the stable deployment", deployed = "Deploy the canary" })

step "Wait for the canary" (steps.rollout_status { deployed = "Deploy the canary" })

step "Create the canary Ingress" {
  description = "An nginx canary Ingress for the stable paths, to the canary's Service, at weight 0",
  needs = { "Check the stable deployment", "Give it a Service" },
  run = function(ctx)
    local stable = k8s.get("ingress/" .. ctx.params.ingress, ns(ctx))
    k8s.create { apiVersion = "networking.k8s.io/v1", kind = "Ingress",
      metadata = { name = canary_ingress(ctx), namespace = ctx.params.namespace,
        annotations = { [CANARY] = "true", [WEIGHT] = "0" } },
      spec = { ingressClassName = stable.spec.ingressClassName, rules = ctx.outputs["Check the stable deployment"].rules } }
  end,
  undo = function(ctx) k8s.delete("ingress/" .. canary_ingress(ctx), { namespace = ctx.params.namespace, missing_ok = true }) end,
}

-- One step per weight: set it, then hold the gates for `interval`. A broken
-- gate puts the weight back to 0 before the step fails, so no user waits on
-- the undo for the canary to stop getting traffic.
local previous = "Create the canary Ingress"
for _, weight in ipairs { 10, 25, 50, 100 } do
  local name = ("Shift %d%% to the canary"):format(weight)
  step(name) {
    description = ("Canary weight %d, then its error rate and p95 must hold for the interval"):format(weight),
    needs = { "Check the stable deployment", previous },
    confirm = weight == 100,
    run = function(ctx)
      if ctx.dry_run then -- the canary Ingress does not exist in a dry run: nothing to patch
        log.info("would set the canary weight of %s to %d", canary_ingress(ctx), weight)
      else
        set_weight(ctx, weight)
        log.info("%d%% of the traffic to %s now goes to %s", weight, stable_service(ctx), canary(ctx))
      end
      local ok, res = pcall(prom.verify, gate(ctx))
      if not ok then
        if not ctx.dry_run then
          set_weight(ctx, 0)
          log.warn("gate broken at %d%%: weight back to 0", weight)
        end
        error(res, 0)
      end
      return { weight = weight, values = res.values }
    end,
  }
  previous = name
end

step "Promote" {
  description = "Set the stable deployment's image to the new tag and wait for it to roll out",
  needs = { "Check the stable deployment", "Deploy the canary", "Shift 100% to the canary" },
  confirm = true,
  run = function(ctx)
    local image = ctx.outputs["Deploy the canary"].image
    local revision = k8s.last_change("deploy/" .. ctx.params.deployment, ns(ctx)).revision
    k8s.set_image("deploy/" .. ctx.params.deployment, { [ctx.outputs["Check the stable deployment"].app] = image }, ns(ctx))
    k8s.rollout_status("deploy/" .. ctx.params.deployment, { namespace = ctx.params.namespace, timeout = ctx.params.timeout, fail_fast = true })
    log.info("%s %s to %s", ctx.params.deployment, ctx.dry_run and "would be promoted" or "promoted", image)
    return { revision = revision }
  end,
  undo = function(ctx, out)
    k8s.rollout_undo("deploy/" .. ctx.params.deployment, { namespace = ctx.params.namespace, to_revision = out.revision })
  end,
}

step "Remove the canary" {
  description = "The canary Ingress, Service and Deployment deleted: the stable deployment serves everything",
  run = function(ctx)
    for _, target in ipairs { "ingress/" .. canary_ingress(ctx), "svc/" .. canary(ctx), "deploy/" .. canary(ctx) } do
      k8s.delete(target, { namespace = ctx.params.namespace, missing_ok = true })
    end
    log.info("%s serves all traffic on %s", ctx.params.deployment, ctx.params.tag)
  end,
}
