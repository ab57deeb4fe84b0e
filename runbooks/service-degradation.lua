-- service-degradation.lua: one service degrading (restarts, OOM kills, slow
-- or failing pods): isolate it, give it more resources, look closer with
-- debug logging, bring it back and watch it.
--
-- Replaces seed 001 "Emergency Procedures: Service Degradation": kubectl
-- scale --replicas=0 to isolate it; kubectl top pods; kubectl rollout
-- history; kubectl patch of the container's requests and limits; debug
-- logging enabled for a while. The resources stay raised (the fix); debug
-- logging is turned back after debug_for, its records summarized.
--
--   runbook run service-degradation -p deployment=todo-chatbot-backend --step
--   runbook run service-degradation -p deployment=todo-chatbot-backend -p memory_limit=1Gi -p isolate=false

name = "service-degradation"
description = "A degrading service: its pods, top, rollout history; isolate it (scale to 0), raise its requests and limits, enable debug logging, bring it back, watch it, summarize the debug logs, turn debug logging back"
replaces = { "001-17" }
version = "1.0.0"

params (steps.params) { "deployment", "namespace", "container", "health_path" }
param "isolate" { type = "boolean", default = true, help = "scale the deployment to 0 while it is changed (seed 001's first step), and back after" }
param "factor" { type = "number", default = 2, help = "the app container's requests and limits are multiplied by this (those not given below)" }
param "cpu_request" { default = "", help = "the new CPU request (e.g. 1000m; default: factor times the current)" }
param "cpu_limit" { default = "", help = "the new CPU limit (e.g. 2000m)" }
param "memory_request" { default = "", help = "the new memory request (e.g. 1Gi)" }
param "memory_limit" { default = "", help = "the new memory limit (e.g. 2Gi)" }
param "debug_env" { default = "LOG_LEVEL", help = "the environment variable that sets the app's log level" }
param "debug_value" { default = "DEBUG", help = "its value for debug logging" }
param "debug_for" { type = "duration", default = "5m", help = "how long debug logging stays on before it is turned back" }
param "observe" { type = "duration", default = "1m", help = "after it is back, how long its pods must stay up without a restart" }
param "timeout" { type = "duration", default = "5m", help = "how long each rollout may take" }

local function target(ctx) return "deploy/" .. ctx.params.deployment end
local function ns(ctx) return { namespace = ctx.params.namespace } end

--- The app container of the deployment's template (param container, else the first).
local function app_container(ctx)
  local d = k8s.get(target(ctx), ns(ctx))
  for _, c in ipairs(d.spec.template.spec.containers) do
    if ctx.params.container == "" or c.name == ctx.params.container then return c, d end
  end
  error(("%s has no container %s"):format(ctx.params.deployment, ctx.params.container), 0)
end

step "Check the pods" {
  description = "kubectl get pods / describe: readiness, restarts and each container's last termination",
  run = function(ctx)
    local h = k8s.deployment_health(ctx.params.namespace, ctx.params.deployment)
    local restarts = 0
    for _, p in ipairs(h.pods) do
      restarts = restarts + p.restarts
      log.info("%s: %s, %d restarts%s", p.name, p.ready and "ready" or "not ready", p.restarts,
        p.reason and (", " .. p.reason) or "")
    end
    for _, p in ipairs(h.problems) do log.warn("%s", p) end
    return { healthy = h.healthy, replicas = h.desired, restarts = restarts }
  end,
}

step "Check resource use" (steps.resource_use {})

step "Review recent changes" {
  description = "kubectl rollout history: each revision's images and change cause, and how long ago the template last changed",
  run = function(ctx)
    for _, r in ipairs(k8s.rollout_history(target(ctx), ns(ctx))) do
      log.info("revision %d: %s%s", r.revision, table.concat(r.images, ", "), r.change_cause and ("  (" .. r.change_cause .. ")") or "")
    end
    local change = k8s.last_change(target(ctx), ns(ctx))
    log.info("the current template is revision %d, %s old: if the degradation began then, see the rollback runbook",
      change.revision, duration.format(change.age or 0))
    return { revision = change.revision, age = change.age }
  end,
}

step "Isolate the service" {
  description = "kubectl scale --replicas=0 and wait until its pods are gone (the replicas are remembered)",
  when = function(ctx) return ctx.params.isolate end,
  confirm = true,
  run = function(ctx)
    local saved = k8s.stop_workloads({ target(ctx) }, { namespace = ctx.params.namespace, timeout = ctx.params.timeout })
    log.info("%s isolated (was %d replicas)", ctx.params.deployment, saved[1].replicas)
    return { saved = saved }
  end,
}

step "Raise the resources" {
  description = "kubectl patch of the app container's requests and limits: each given one, the others times factor",
  confirm = true,
  run = function(ctx)
    local c = app_container(ctx)
    local now = c.resources or {}
    local new, changes = { requests = {}, limits = {} }, {}
    for _, kind in ipairs { "requests", "limits" } do
      for _, res in ipairs { "cpu", "memory" } do
        local given = ctx.params[res .. "_" .. kind:gsub("s$", "")]
        local old = (now[kind] or {})[res]
        local v = given ~= "" and given or old and k8s.scale_quantity(old, ctx.params.factor)
        if v then
          if not k8s.quantity(v) then error(("%s %s: %s is not a quantity"):format(res, kind, v), 0) end
          new[kind][res] = v
          changes[#changes + 1] = ("%s %s %s -> %s"):format(res, kind:gsub("s$", ""), old or "none", v)
        end
      end
    end
    if #changes == 0 then error(c.name .. " has no requests or limits to raise: give cpu_limit, memory_limit ...", 0) end
    k8s.patch(target(ctx), { spec = { template = { spec = { containers = { { name = c.name, resources = new } } } } } }, ns(ctx))
    log.info("%s: %s", c.name, table.concat(changes, ", "))
    return { container = c.name, changes = changes }
  end,
}

step "Enable debug logging" {
  description = "kubectl set env debug_env=debug_value on the app container (the value it had is remembered)",
  confirm = true,
  run = function(ctx)
    local c, was = app_container(ctx), false
    for _, e in ipairs(c.env or {}) do
      if e.name == ctx.params.debug_env and e.value then was = e.value end
    end
    k8s.set_env(target(ctx), { [ctx.params.debug_env] = ctx.params.debug_value }, { namespace = ctx.params.namespace, container = c.name })
    return { container = c.name, was = was, since = os.time() }
  end,
}

step "Bring the service back" {
  description = "kubectl scale back to its replicas (or, not isolated, the rollout of the changes) and wait for it",
  uses = { "Isolate the service" },
  run = function(ctx)
    if ctx.skipped("Isolate the service") then
      k8s.rollout_status(target(ctx), { namespace = ctx.params.namespace, timeout = ctx.params.timeout, fail_fast = true })
    else
      k8s.start_workloads(ctx.outputs["Isolate the service"].saved, { timeout = ctx.params.timeout })
    end
  end,
}

step "Verify" (steps.verify_health {})

step "Watch for restarts" {
  description = "For observe, no pod of the deployment restarts (an OOM kill or a crash would), and it stays healthy",
  run = function(ctx)
    if ctx.dry_run then
      log.info("would watch %s's pods for %s", ctx.params.deployment, duration.format(ctx.params.observe))
      return
    end
    return steps.watch_restarts(ctx, ctx.params.deployment)
  end,
}

step "Summarize the debug logs" {
  description = "After debug_for with debug logging on, the app's records since it was enabled, by level, and the top errors and warnings",
  needs = { "Enable debug logging" },
  run = function(ctx, enabled)
    if not ctx.dry_run then time.sleep(math.max(0, ctx.params.debug_for - (os.time() - enabled.since))) end
    return steps.log_levels(ctx, { deployment = ctx.params.deployment, since = math.max(1, os.time() - enabled.since),
      container = enabled.container, what = "debug-logging" })
  end,
}

step "Turn debug logging back" {
  description = "debug_env as it was (removed when it was not set on the container), and wait for the rollout",
  needs = { "Enable debug logging" },
  run = function(ctx, o)
    k8s.set_env(target(ctx), { [ctx.params.debug_env] = o.was }, { namespace = ctx.params.namespace, container = o.container })
    k8s.rollout_status(target(ctx), { namespace = ctx.params.namespace, timeout = ctx.params.timeout, fail_fast = true })
  end,
}
