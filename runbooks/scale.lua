-- scale.lua: set the replicas of one deployment, several, or every one in the
-- namespace; wait for them; check each has exactly that many ready pods.
--
-- Replaces seed 000 "Scale Services", 001 "Scaling Services", 002 "Manual
-- Scaling" and 004 "Manual Scaling" (kubectl scale --replicas=N, then kubectl
-- get pods). When the wait or the check fails, every deployment goes back to
-- the replicas it had (on_failure = "undo"); the first step names them, so a
-- later run with the old count scales back by hand.
--
--   runbook run scale -p deployments=todo-chatbot-websocket -p replicas=3
--   runbook run scale -p deployments=all -p replicas=2 --step

name = "scale"
description = "Scale one deployment, several or all in the namespace to N replicas, wait, verify; scale back on failure"
replaces = { "000-3", "000-11", "001-4", "002-4", "003-8", "004-10" }
version = "1.0.0"
on_failure = "undo"

params (steps.params) { "deployments", "namespace" }
param "replicas" { type = "integer", required = true, help = "the replicas every deployment named should have" }
param "timeout" { type = "duration", default = "5m", help = "how long each deployment may take to get there" }

step "Find the deployments" {
  description = "kubectl get deploy: the deployments named (or all) and the replicas each has now",
  run = function(ctx)
    if ctx.params.replicas < 0 then error("param replicas: expected 0 or more", 0) end
    local found = steps.deployments(ctx)
    for _, d in ipairs(found) do log.info("%s: %d replicas now, %d wanted", d.name, d.replicas, ctx.params.replicas) end
    return { deployments = found }
  end,
}

step "Scale" (steps.scale {})

step "Wait for the rollouts" (steps.wait_rollouts { after = "Scale" })

step "Verify" (steps.verify_deployments { after = "Scale", check = "scaled" })
