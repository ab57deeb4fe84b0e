-- deploy.lua: how the todo-chatbot team ships one service. A runbook a team
-- writes for itself, with its own spec (examples/team/spec/deploy_spec.lua,
-- run by `runbook test examples/team/spec`).
--
--   runbook run examples/team/deploy.lua -p service=backend -p tag=v1.5.0
--
-- It sets the new image, waits for the rollout (giving up as soon as the new
-- pods crash-loop or cannot pull the image), checks /health through the API
-- server, and when any of that fails, rolls the deployment back to the
-- revision it replaced (on_failure = "undo").

name = "team-deploy"
description = "Deploy a new image tag of one todo-chatbot service; roll back when it does not come up healthy"
version = "1.0.0"
on_failure = "undo"
lock = "deploy:todo-chatbot"   -- one deploy at a time, whatever the service

param "service" { type = { "backend", "frontend", "websocket", "recurring-task", "notification" }, required = true,
  help = "the service to deploy" }
param "tag" { required = true, help = "image tag to deploy (the registry and repository stay as they are)" }
param "namespace" { default = "todo-chatbot", help = "Kubernetes namespace" }
param "timeout" { type = "duration", default = "3m", help = "how long the rollout may take" }

local PORTS = { backend = 8000, frontend = 3000, websocket = 8001, ["recurring-task"] = 8002, notification = 8003 }

local function target(ctx) return "deploy/todo-chatbot-" .. ctx.params.service end

step "Read the running version" {
  description = "The deployment's current image and revision, to roll back to",
  run = function(ctx)
    local d = k8s.get(target(ctx), { namespace = ctx.params.namespace })
    local image = d.spec.template.spec.containers[1].image
    local change = k8s.last_change(target(ctx), { namespace = ctx.params.namespace })
    log.info("%s runs %s (revision %d)", ctx.params.service, image, change.revision)
    if image:match(":([^:]+)$") == ctx.params.tag then error(("%s already runs %s"):format(ctx.params.service, image), 0) end
    return { image = image, revision = change.revision }
  end,
}

step "Set the image" {
  description = "kubectl set image, for the service's own container only",
  needs = { "Read the running version" },
  run = function(ctx)
    local image = ctx.outputs["Read the running version"].image:gsub(":[^:]+$", ":" .. ctx.params.tag)
    k8s.set_image(target(ctx), { [ctx.params.service] = image }, { namespace = ctx.params.namespace })
    return { image = image }
  end,
  undo = function(ctx)
    local rev = ctx.outputs["Read the running version"].revision
    log.warn("rolling %s back to revision %d", ctx.params.service, rev)
    k8s.rollout_undo(target(ctx), { namespace = ctx.params.namespace, to_revision = rev })
    if not ctx.dry_run then
      k8s.rollout_status(target(ctx), { namespace = ctx.params.namespace, timeout = ctx.params.timeout })
    end
  end,
}

step "Wait for the rollout" {
  description = "Until every new pod is ready; fails at once when they crash-loop or cannot pull the image",
  run = function(ctx)
    if ctx.dry_run then return end
    k8s.rollout_status(target(ctx), { namespace = ctx.params.namespace, timeout = ctx.params.timeout, fail_fast = true })
  end,
}

step "Check /health" {
  description = "GET /health through the API server's service proxy",
  retry = { attempts = 3, base = "1s" },
  run = function(ctx)
    local svc = ("svc/todo-chatbot-%s:%d"):format(ctx.params.service, PORTS[ctx.params.service])
    local r = k8s.proxy_get(svc, "/health", { namespace = ctx.params.namespace, check = true })
    log.info("%s /health: HTTP %d", ctx.params.service, r.status)
    return { status = r.status }
  end,
}
