-- deploy.lua: roll a new image out to a deployment, check every pod, smoke-test
-- it, and roll back when any of that fails.
--
-- Replaces seed 001 "Update Procedures" (a backup before a major update, kubectl
-- set image, health checks, the rollback ready), seed 003 "Rolling Update" (set
-- image, rollout status, each pod's health) and seed 004 "Standard Deployment"
-- and "Hotfix Deployment" (set image, rollout status, /health; a hotfix
-- watched closely). Reviewing, merging, tagging and building the image stay
-- with git and CI.
--
--   runbook run deploy -p deployment=todo-chatbot-backend -p tag=v1.5.0 -p backup=true --step
--   runbook run deploy -p deployment=todo-chatbot-backend -p tag=hotfix-critical-fix -p hotfix=true
--
-- A hotfix is the fast path: no backup, and once its pods are up they are
-- watched for `observe` (seed 004: "monitor closely", kubectl logs -f): their
-- ERROR lines shown as they come, and a pod restart, or the deployment not
-- healthy at the end, rolls it back. Any failure after the image is set rolls the deployment back to the
-- revision it replaced (on_failure = "undo"); a backup taken first stays.

name = "deploy"
description = "Set a deployment's new image (a backup first when asked), wait for the rollout, check each pod and the smoke test, watch a hotfix; roll back on failure"
replaces = { "001-14", "003-4", "004-7", "004-8" }
version = "1.0.0"
on_failure = "undo"

params (steps.params) { "deployment", "namespace" }
param "tag" { default = "", help = "the new image tag of the container (its registry and repository stay)" }
param "image" { default = "", help = "the whole new image, instead of tag" }
param "container" { default = "", help = "the container whose image is set (default: the first, the app's)" }
param "timeout" { type = "duration", default = "5m", help = "how long the rollout, and a rollback's, may take" }
param "health_path" (steps.params.health_path)
param "smoke" (steps.params.smoke)
param "smoke_paths" (steps.params.smoke_paths)
param "backup" { type = "boolean", default = false, help = "back the database up first (a set PREFIX-pre-deploy-STAMP in dir), as before a major update" }
param "dir" { default = "./backups", help = "with backup=true, where the set goes (runbook backup's dir)" }
param "prefix" (steps.params.prefix)
param "database_url" (steps.params.database_url)
param "hotfix" { type = "boolean", default = false, help = "the fast path: no backup, and the new pods watched for observe" }
param "observe" { type = "duration", default = "5m", help = "with hotfix=true, how long the new pods are watched" }

local function target(ctx) return "deploy/" .. ctx.params.deployment end
local function ns(ctx) return { namespace = ctx.params.namespace } end
local function running(ctx) return ctx.outputs["Read the running version"] end

--- The pod template's container named `name`, or its first when name is "".
local function container_of(spec, name)
  for _, c in ipairs(spec.containers) do
    if name == "" or c.name == name then return c end
  end
  error(("%s has no container %s"):format(spec.name or "the pod template", name), 0)
end

step "Read the running version" {
  description = "The container's image now and the revision that brought it (the rollback's target); the new image",
  run = function(ctx)
    local p = ctx.params
    if (p.tag == "") == (p.image == "") then error("give either tag or image (one of them)", 0) end
    if p.hotfix and p.backup then error("hotfix=true is the fast path, without a backup: drop backup=true", 0) end
    local c = container_of(k8s.get(target(ctx), ns(ctx)).spec.template.spec, p.container)
    local new = p.image ~= "" and p.image or steps.retag(c.image, p.tag)
    if new == c.image then error(("%s already runs %s"):format(p.deployment, c.image), 0) end
    local change = k8s.last_change(target(ctx), ns(ctx))
    local h = k8s.deployment_health(p.namespace, p.deployment)
    log.info("%s: container %s runs %s (revision %d), %d of %d ready; the new image is %s", p.deployment, c.name,
      c.image, change.revision, h.ready, h.desired, new)
    return { container = c.name, image = c.image, revision = change.revision, new_image = new }
  end,
}

step "Back up the database" (steps.backup_database { suffix = "-pre-deploy",
  description = "pg_dump into a sealed backup set before the update (backup=true)",
  when = function(ctx) return ctx.params.backup end })

step "Set the image" {
  description = "kubectl set image of the container",
  needs = { "Read the running version" },
  confirm = true,
  run = function(ctx)
    local v = running(ctx)
    k8s.set_image(target(ctx), { [v.container] = v.new_image }, ns(ctx))
    return { image = v.new_image }
  end,
  undo = function(ctx)
    local rev = running(ctx).revision
    log.warn("rolling %s back to revision %d (%s)", ctx.params.deployment, rev, running(ctx).image)
    k8s.rollout_undo(target(ctx), { namespace = ctx.params.namespace, to_revision = rev })
    k8s.rollout_status(target(ctx), { namespace = ctx.params.namespace, timeout = ctx.params.timeout })
  end,
}

step "Wait for the rollout" (steps.rollout_status { target = target, needs = { "Set the image" } })

step "Check each pod" {
  description = "Every pod ready, on the new image, and answering health_path on its own port (API server pod proxy)",
  needs = { "Read the running version", "Set the image" },
  retry = { attempts = 5, base = "1s", max = "5s" },
  run = function(ctx)
    local v, problems, checked = running(ctx), {}, 0
    local d = k8s.get(target(ctx), ns(ctx))
    for _, pod in ipairs(k8s.list("pods", { namespace = ctx.params.namespace, selector = d.spec.selector.matchLabels })) do
      if not pod.metadata.deletionTimestamp then
        local name, c = pod.metadata.name, container_of(pod.spec, v.container)
        local port = (c.ports and c.ports[1] or {}).containerPort
        local ready = false
        for _, cond in ipairs((pod.status or {}).conditions or {}) do ready = ready or (cond.type == "Ready" and cond.status == "True") end
        if c.image ~= v.new_image and not ctx.dry_run then problems[#problems + 1] = ("pod %s runs %s"):format(name, c.image)
        elseif not ready then problems[#problems + 1] = ("pod %s is not ready"):format(name)
        elseif port then
          local r = k8s.proxy_get(("pod/%s:%d"):format(name, port), ctx.params.health_path, ns(ctx))
          log.info("pod %s %s: HTTP %d", name, ctx.params.health_path, r.status)
          if r.status >= 400 then problems[#problems + 1] = ("pod %s %s: HTTP %d"):format(name, ctx.params.health_path, r.status) end
        else
          log.info("pod %s: ready (container %s declares no port to GET %s on)", name, v.container, ctx.params.health_path)
        end
        checked = checked + 1
      end
    end
    if checked < (d.spec.replicas or 1) then problems[#problems + 1] = ("%d of %d pods"):format(checked, d.spec.replicas or 1) end
    if #problems > 0 then
      if not ctx.dry_run then error(table.concat(problems, "; "), 0) end
      log.info("the pods now, before the change: %s", table.concat(problems, "; "))
    end
    return { pods = checked }
  end,
}

step "Smoke test" (steps.smoke_test { target = function(ctx) return ctx.params.deployment end, needs = { "Set the image" } })

step "Watch the hotfix" {
  description = "For observe: no pod restarts once it is healthy, healthy at the end, its ERROR log lines shown as they come (hotfix=true)",
  needs = { "Set the image" },
  when = function(ctx) return ctx.params.hotfix end,
  run = function(ctx)
    local p = ctx.params
    if ctx.dry_run then log.info("would watch %s and its ERROR lines for %s", p.deployment, duration.format(p.observe)); return end
    local seen, looked, errors = os.time() - 1, 0, 0
    local function show_errors(last)   -- kubectl logs -f, ERROR lines only, every 5 s
      if not last and time.monotonic() - looked < 5 then return end
      looked = time.monotonic()
      -- a log that cannot be read now (a container restarting) is no reason to roll back: the restarts are
      local ok, q = pcall(k8s.log_query, { target = target(ctx), namespace = p.namespace,
        where = { level = { "ERROR", "CRITICAL" } }, since_time = os.date("!%Y-%m-%dT%H:%M:%SZ", math.floor(seen)) })
      if not ok then log.warn("logs of %s: %s", p.deployment, tostring(type(q) == "table" and q.message or q)); return end
      for _, rec in ipairs(q.records) do
        if rec.time > seen then
          log.warn("%s: %s", rec.pod, rec.fields.message or rec.line)
          errors, seen = errors + 1, rec.time
        end
      end
    end
    steps.watch_restarts(ctx, p.deployment, show_errors)
    show_errors(true)
    log.info("%d ERROR lines while watched", errors)
    return { errors = errors }
  end,
}
