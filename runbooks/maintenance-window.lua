-- maintenance-window.lua: a change made inside a maintenance window that does not page.
--
-- Replaces seed 000 "Maintenance Windows": before (a recent backup, the
-- namespace's alerts silenced in Alertmanager for the window, one more
-- replica for buffer), during (the new image, its rollout, its health), after
-- (the error rate watched, the buffer scaled away, the silence ended so the
-- next page is a real one). The status page stays the operator's.
--
--   runbook run maintenance-window -p deployment=todo-chatbot-backend \
--     -p image=registry.digitalocean.com/todo-chatbot/backend:v1.5.0 -p reason="CHG-2291 backend 1.5" --step

name = "maintenance-window"
description = "Silence the namespace's alerts for the window, check a recent backup, scale up for buffer, roll out the new image, verify health and the error rate, scale back, end the silence"
replaces = { "000-16" }
version = "1.0.0"

param "deployment" { required = true, help = "the deployment to change, e.g. todo-chatbot-backend" }
param "namespace" { default = "todo-chatbot", help = "Kubernetes namespace (also the silence's namespace matcher)" }
param "image" { default = "", help = "the new image of its first container (empty: no image change, e.g. work outside the cluster)" }
param "reason" { required = true, help = "why, with the ticket: the silence's comment" }
param "window" { type = "duration", default = "1h", help = "how long the alerts stay silenced at most" }
param "buffer" { type = "integer", default = 1, help = "replicas added for the window (seed: scale up for buffer)" }
param "backup_dir" { default = "./backups", help = "where backup sets are (runbook backup's dir)" }
param "backup_prefix" { default = "todo", help = "the sets' prefix (runbook backup's prefix)" }
param "backup_max_age" { type = "duration", default = "24h", help = "the newest backup must be younger than this" }
param "timeout" { type = "duration", default = "5m", help = "how long each rollout may take" }
param "watch" { type = "duration", default = "15m", help = "how long the error rate must stay low after the change (seed: 15 minutes)" }
param "error_rate_window" (steps.params.error_rate_window)

local function target(ctx) return "deploy/" .. ctx.params.deployment end
local function ns(ctx) return { namespace = ctx.params.namespace } end

--- "todo-20261206T101500Z" -> seconds since that stamp.
local function age(stamp)
  local y, mo, d, h, mi, s = stamp:match("(%d%d%d%d)(%d%d)(%d%d)T(%d%d)(%d%d)(%d%d)Z$")
  local t = os.time { year = y, month = mo, day = d, hour = h, min = mi, sec = s }
  return os.time(os.date("!*t")) - t
end

step "Check a recent backup" {
  description = "The newest backup set is younger than backup_max_age and its files match their checksums",
  run = function(ctx)
    local path = backupset.latest(ctx.params.backup_dir, ctx.params.backup_prefix)
    if not path then
      error(("no backup set %s-* in %s: run the backup runbook first"):format(ctx.params.backup_prefix,
        ctx.params.backup_dir), 0)
    end
    local old = age(path)
    if old > ctx.params.backup_max_age then
      error(("the newest backup, %s, is %s old (backup_max_age %s): run the backup runbook first"):format(path,
        duration.format(old), duration.format(ctx.params.backup_max_age)), 0)
    end
    backupset.verify(path)
    log.info("backup %s, %s old, verified", path, duration.format(old))
    return { backup = path }
  end,
}

step "Silence the namespace's alerts" {
  description = "An Alertmanager silence of every alert of the namespace for the window",
  run = function(ctx)
    local s = alertmanager.silence { matchers = { namespace = ctx.params.namespace }, for_ = ctx.params.window,
      comment = "maintenance window: " .. ctx.params.reason }
    if s.id then log.info("silence %s until %s", s.id, s.ends_at) end
    return { silence = s.id }
  end,
}

step "Scale up for buffer" {
  description = "buffer more replicas while the change rolls",
  run = function(ctx)
    local replicas = k8s.get(target(ctx), ns(ctx)).spec.replicas or 1
    k8s.scale(target(ctx), replicas + ctx.params.buffer, ns(ctx))
    k8s.rollout_status(target(ctx), { namespace = ctx.params.namespace, timeout = ctx.params.timeout })
    return { replicas = replicas }
  end,
}

step "Roll out the new image" {
  description = "kubectl set image, then rollout status (gives up at once on a crash loop or a bad image)",
  when = function(ctx) return ctx.params.image ~= "" end,
  confirm = true,
  run = function(ctx)
    local container = k8s.get(target(ctx), ns(ctx)).spec.template.spec.containers[1].name
    k8s.set_image(target(ctx), { [container] = ctx.params.image }, ns(ctx))
    k8s.rollout_status(target(ctx), { namespace = ctx.params.namespace, timeout = ctx.params.timeout, fail_fast = true })
    return { image = ctx.params.image }
  end,
}

step "Verify health" (steps.verify_health { services = false, description = "The deployment healthy (its pods ready)" })

step "Watch the error rate" {
  description = "The deployment's 5xx share stays under 1% for watch (Prometheus; skipped without PROMETHEUS_URL)",
  run = function(ctx)
    checks.error_rate { name = ctx.params.deployment .. " error rate", below = 0.01,
      selector = ('namespace="%s",deployment="%s"'):format(ctx.params.namespace, ctx.params.deployment),
      window = ctx.params.error_rate_window, hold = ctx.params.watch, every = "5s", settle = true }
  end,
}

step "Scale back" {
  description = "Back to the replicas it had before the window",
  needs = { "Scale up for buffer" },
  run = function(ctx, buffer)
    k8s.scale(target(ctx), buffer.replicas, ns(ctx))
  end,
}

step "End the silence" {
  description = "Expire the window's silence, so the next page is a real one",
  needs = { "Silence the namespace's alerts" },
  run = function(ctx, silenced)
    if silenced.silence then alertmanager.expire(silenced.silence) end
  end,
}
