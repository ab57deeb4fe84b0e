-- blue-green-switch.lua: bring up a new color beside the live deployment,
-- check and smoke-test it, move the Ingress to it, watch it, retire the old
-- color, and label which one is current.
--
-- Replaces seed 003 "Blue-Green Deployment" and its "Rollback Procedure": if
-- the new color fails before or while it is watched, every completed step is
-- undone in reverse (on_failure = "undo"): the Ingress points at the old color
-- again, the old color is scaled back, what was created is removed. Later, once
-- this run is over, rollback=true switches back to the other color while it is
-- still there (the retired one, kept at 0 replicas): scaled back up, checked,
-- the Ingress switched, the broken color scaled to 0, the labels swapped.
--
--   runbook run blue-green-switch -p from=todo-chatbot-frontend -p tag=v1.5.0 --step
--   runbook run blue-green-switch -p from=todo-chatbot-frontend-green -p rollback=true --step
--
-- The new color (default: FROM-green; for FROM-green, FROM-blue or plain FROM) is
-- FROM's pod template with the new image tag, its pods labelled apart from
-- FROM's (split_label gets the color as a suffix, so FROM's Service and
-- selector never pick them), with a Service of the same name. In a rollback,
-- "the new color" is the one switched back to. Once the Ingress sends to it,
-- the deployments are labelled current=true and current=false (seed 003's
-- labels for the next iteration).

name = "blue-green-switch"
description = "Deploy a new color beside the live deployment, health- and smoke-test it, switch the Ingress, watch, retire the old color; or switch back (rollback=true)"
replaces = { "003-1", "003-2" }
version = "1.0.0"
on_failure = "undo"

param "from" { required = true, help = "the live deployment (and, by default, its Service), e.g. todo-chatbot-frontend" }
param "tag" { default = "", help = "image tag for the new color's app container (required, unless rollback=true)" }
param "rollback" { type = "boolean", default = false, help = "switch back to the other color, still there at 0 replicas (no tag: it keeps its image)" }
param "to" { default = "", help = "the new color's deployment and Service name (default FROM-green; after a green, its blue: FROM-blue or plain FROM)" }
param "namespace" (steps.params.namespace)
param "ingress" { default = "todo-chatbot", help = "the Ingress whose paths to FROM's Service are switched" }
param "service" { default = "", help = "the live Service the Ingress sends to (default: FROM)" }
param "split_label" { default = "app.kubernetes.io/instance", help = "pod label given the color as a suffix, so the colors' selectors stay apart" }
param "health_path" (steps.params.health_path)
param "smoke" (steps.params.smoke)
param "smoke_paths" (steps.params.smoke_paths)
param "observe" { type = "duration", default = "10m", help = "how long to watch the new color after the switch (seed: 10 minutes)" }
param "timeout" { type = "duration", default = "5m", help = "how long the new color may take to roll out" }
param "max_error_rate" { type = "number", default = 0.01, help = "after the switch, the new color's 5xx share must stay below this (Prometheus; skipped without PROMETHEUS_URL)" }
param "error_rate_window" (steps.params.error_rate_window)
param "error_rate_hold" { type = "duration", default = "2m", help = "how long the new color's error rate must hold after the switch" }
param "retire_old" { type = "boolean", default = true, help = "scale the old color to 0 once the new one held" }

-- The new color's name: -p to, else FROM-green for a FROM without a color,
-- and for FROM-green its blue: FROM-blue when that exists, else plain FROM.
local function pick_to(ctx)
  if ctx.params.to ~= "" then return ctx.params.to end
  local from = ctx.params.from
  if from:match("%-blue$") then return (from:gsub("%-blue$", "-green")) end
  if not from:match("%-green$") then return from .. "-green" end
  local blue = from:gsub("%-green$", "-blue")
  if k8s.get("deploy/" .. blue, { namespace = ctx.params.namespace, missing_ok = true }) then return blue end
  return (from:gsub("%-green$", ""))
end
local function to_name(ctx) return ctx.outputs["Check the live color"].to end
local function color(ctx) return to_name(ctx):match("%-(green)$") or to_name(ctx):match("%-(blue)$") or "new" end
local function ns(ctx) return { namespace = ctx.params.namespace } end
local function live_service(ctx) return ctx.params.service ~= "" and ctx.params.service or ctx.params.from end

-- The Ingress with every backend to service `a` pointed at `b`; how many paths moved.
local function switched(ing, a, b)
  local n = 0
  for _, rule in ipairs(ing.spec.rules or {}) do
    for _, p in ipairs((rule.http or {}).paths or {}) do
      local svc = p.backend and p.backend.service
      if svc and svc.name == a then svc.name, n = b, n + 1 end
    end
  end
  local def = ing.spec.defaultBackend and ing.spec.defaultBackend.service
  if def and def.name == a then def.name, n = b, n + 1 end
  return ing, n
end

step "Check the live color" {
  description = "FROM healthy (in a rollback, the other color still there), its Service, and the Ingress paths that send to it",
  run = function(ctx)
    local p = ctx.params
    if p.rollback == (p.tag ~= "") then error("give tag (the new color's image tag), or rollback=true without a tag", 0) end
    local h = p.rollback and k8s.deployment_health(p.namespace, p.from) or steps.healthy(ctx, p.from)
    local svc = k8s.get("svc/" .. live_service(ctx), ns(ctx))
    local to = pick_to(ctx)
    if p.rollback and not (k8s.get("deploy/" .. to, { namespace = p.namespace, missing_ok = true })
        and k8s.get("svc/" .. to, { namespace = p.namespace, missing_ok = true })) then
      error(("nothing to switch back to: %s or its Service is gone (deploy it again with -p tag=...)"):format(to), 0)
    end
    local _, paths = switched(k8s.get("ingress/" .. ctx.params.ingress, ns(ctx)), live_service(ctx), to)
    if paths == 0 then
      error(("ingress %s sends nothing to service %s"):format(ctx.params.ingress, live_service(ctx)), 0)
    end
    log.info("%s: %d/%d ready; ingress %s sends %d path(s) to service %s; the new color is %s", ctx.params.from,
      h.ready, h.desired, ctx.params.ingress, paths, live_service(ctx), to)
    return { replicas = h.desired, ports = svc.spec.ports, paths = paths, to = to }
  end,
}

step "Deploy the new color" {
  description = "Create (or update) the new color's deployment: FROM's template, the new image tag, FROM's replicas",
  needs = { "Check the live color" },
  when = function(ctx) return not ctx.params.rollback end,
  run = function(ctx, live)
    local replicas = live.replicas
    local existed = k8s.get("deploy/" .. to_name(ctx), { namespace = ctx.params.namespace, missing_ok = true })
    if existed then -- an earlier color, kept at 0 replicas: its own selector stays, the image and size change
      local revision = k8s.last_change("deploy/" .. to_name(ctx), ns(ctx)).revision
      local c = existed.spec.template.spec.containers[1]
      local image = steps.retag(c.image, ctx.params.tag)
      k8s.set_image("deploy/" .. to_name(ctx), { [c.name] = image }, ns(ctx))
      k8s.scale("deploy/" .. to_name(ctx), replicas, ns(ctx))
      local labels = existed.spec.template.metadata.labels or {}
      labels["pod-template-hash"] = nil
      return { name = to_name(ctx), created = false, image = image, labels = labels,
        replicas_before = existed.spec.replicas, revision = revision }
    end
    local deployment, labels, image = steps.sibling_deployment { from = ctx.params.from, name = to_name(ctx),
      namespace = ctx.params.namespace, tag = ctx.params.tag, split = ctx.params.split_label, what = "the colors",
      relabel = function(v) return v:gsub("%-green$", ""):gsub("%-blue$", "") .. "-" .. color(ctx) end,
      replicas = replicas, cause = ("blue-green-switch from %s, tag %s"):format(ctx.params.from, ctx.params.tag) }
    k8s.apply(deployment, { force = true })
    log.info("%s: %s, %d replicas", to_name(ctx), image, replicas)
    return { name = to_name(ctx), created = true, image = image, labels = labels }
  end,
  undo = function(ctx, out)
    if out.created then k8s.delete("deploy/" .. to_name(ctx), { namespace = ctx.params.namespace, missing_ok = true })
    else
      k8s.scale("deploy/" .. to_name(ctx), out.replicas_before or 0, ns(ctx))
      k8s.rollout_undo("deploy/" .. to_name(ctx), { namespace = ctx.params.namespace, to_revision = out.revision })
    end
  end,
}

step "Give it a Service" (steps.sibling_service { live = "Check the live color", deployed = "Deploy the new color" })

step "Scale the other color back up" {
  description = "In a rollback: the color switched back to, at FROM's replicas again",
  needs = { "Check the live color" },
  when = function(ctx) return ctx.params.rollback end,
  run = function(ctx, live)
    local replicas = math.max(live.replicas, 1)
    local before = k8s.get("deploy/" .. to_name(ctx), ns(ctx)).spec.replicas or 1
    if before < replicas then k8s.scale("deploy/" .. to_name(ctx), replicas, ns(ctx)) end
    log.info("%s: %d replicas (was %d)", to_name(ctx), math.max(before, replicas), before)
    return { replicas_before = before }
  end,
  undo = function(ctx, out) k8s.scale("deploy/" .. to_name(ctx), out.replicas_before, ns(ctx)) end,
}

step "Wait for the new color" (steps.rollout_status {
  target = function(ctx) return "deploy/" .. to_name(ctx) end, needs = { "Check the live color" } })

step "Health-check the new color" {
  description = "GET health_path through the new color's Service (API server proxy) before any traffic goes to it",
  needs = { "Check the live color" },
  retry = { attempts = 3, base = "1s" },
  run = function(ctx)
    if ctx.dry_run then log.info("would GET %s through service %s", ctx.params.health_path, to_name(ctx)); return end
    local sh = k8s.service_health("deploy/" .. to_name(ctx), { namespace = ctx.params.namespace, path = ctx.params.health_path })
    if #sh.services == 0 then error("no Service selects the new color's pods", 0) end
    for _, row in ipairs(sh.services) do
      if not row.ok then error(("%s %s: %s"):format(row.service, ctx.params.health_path, row.error), 0) end
      log.info("%s %s: HTTP %d", row.service, ctx.params.health_path, row.status)
    end
  end,
}

step "Smoke-test the new color" (steps.smoke_test { target = to_name, needs = { "Check the live color" } })

step "Switch the Ingress" {
  description = "Point the Ingress paths that send to the live Service at the new color's Service",
  needs = { "Check the live color", "Health-check the new color" },
  confirm = true,
  run = function(ctx)
    local ing, n = switched(k8s.get("ingress/" .. ctx.params.ingress, ns(ctx)), live_service(ctx), to_name(ctx))
    k8s.replace(ing)
    log.info("ingress %s: %d path(s) now to %s", ctx.params.ingress, n, to_name(ctx))
    return { paths = n }
  end,
  undo = function(ctx)
    local ing, n = switched(k8s.get("ingress/" .. ctx.params.ingress, ns(ctx)), to_name(ctx), live_service(ctx))
    k8s.replace(ing)
    log.warn("ingress %s: %d path(s) back to %s", ctx.params.ingress, n, live_service(ctx))
  end,
}

step "Watch the new color" {
  description = "For `observe`, every 5 s: the new color healthy and answering health_path (a failure switches back)",
  needs = { "Check the live color", "Switch the Ingress" },
  run = function(ctx)
    if ctx.dry_run then log.info("would watch %s for %s", to_name(ctx), duration.format(ctx.params.observe)); return end
    local deadline, checks = time.monotonic() + ctx.params.observe, 0
    repeat
      local h = k8s.deployment_health(ctx.params.namespace, to_name(ctx))
      if not h.healthy then error(("%s failed while watched: %s"):format(to_name(ctx), table.concat(h.problems, "; ")), 0) end
      local sh = k8s.service_health("deploy/" .. to_name(ctx), { namespace = ctx.params.namespace, path = ctx.params.health_path })
      if not sh.ok then error(("%s failed while watched: %s"):format(to_name(ctx), sh.services[1] and sh.services[1].error or "?"), 0) end
      checks = checks + 1
      local left = deadline - time.monotonic()
      if left > 0 then time.sleep(math.min(5, left)) end
    until time.monotonic() >= deadline
    log.info("%s held for %s (%d checks)", to_name(ctx), duration.format(ctx.params.observe), checks)
    return { checks = checks }
  end,
}

step "Verify the error rate" {
  description = "The new color's 5xx share under max_error_rate for error_rate_hold once it serves (a break switches back)",
  run = function(ctx)
    checks.error_rate { name = to_name(ctx) .. " error rate", below = ctx.params.max_error_rate,
      selector = ('namespace="%s",deployment="%s"'):format(ctx.params.namespace, to_name(ctx)),
      window = ctx.params.error_rate_window, hold = ctx.params.error_rate_hold, every = "5s", warmup = "30s" }
  end,
}

step "Retire the old color" {
  description = "Scale the old color to 0 (its deployment stays, for the next switch or a rollback)",
  needs = { "Check the live color", "Watch the new color" },
  confirm = true,
  when = function(ctx) return ctx.params.retire_old end,
  run = function(ctx)
    local replicas = k8s.get("deploy/" .. ctx.params.from, ns(ctx)).spec.replicas
    k8s.scale("deploy/" .. ctx.params.from, 0, ns(ctx))
    log.info("%s scaled 0 (was %d); to go back: runbook run blue-green-switch -p from=%s -p to=%s -p rollback=true",
      ctx.params.from, replicas, to_name(ctx), ctx.params.from)
    return { replicas = replicas }
  end,
  undo = function(ctx, out) k8s.scale("deploy/" .. ctx.params.from, out.replicas, ns(ctx)) end,
}

step "Label the colors" {
  description = "current=true on the color the Ingress sends to, current=false on the other (for the next switch)",
  needs = { "Check the live color", "Switch the Ingress" },
  run = function(ctx)
    local before = {}
    for name, current in pairs { [to_name(ctx)] = "true", [ctx.params.from] = "false" } do
      local d = k8s.get("deploy/" .. name, { namespace = ctx.params.namespace, missing_ok = ctx.dry_run })
      if d then
        before[name] = (d.metadata.labels or {}).current or false
        k8s.patch("deploy/" .. name, { metadata = { labels = { current = current } } }, { namespace = ctx.params.namespace, type = "merge" })
      else
        log.info("would label %s current=%s (a dry run did not create it)", name, current)
      end
    end
    log.info("%s current=true, %s current=false", to_name(ctx), ctx.params.from)
    return { before = before }
  end,
  undo = function(ctx, out)
    for name, was in pairs(out.before) do
      k8s.patch("deploy/" .. name, { metadata = { labels = { current = was or json.null } } },
        { namespace = ctx.params.namespace, type = "merge" })
    end
  end,
}
