-- restart.lua: rolling restart of one deployment, several, or every one in the
-- namespace; wait for the rollouts; check that every pod was replaced.
--
-- Replaces seed 000 "Rolling Restart", 001 "Service Restart" (one or all) and
-- 002 "Restart Services" (kubectl rollout restart deployment/X or --all, then
-- kubectl rollout status). A restart has no undo: when new pods crash-loop or
-- cannot pull their image, the wait stops at once naming the pod (the
-- deployment's rolling update keeps the old pods it has not replaced yet);
-- rollback is the runbook for a bad change.
--
--   runbook run restart -p deployments=todo-chatbot-backend
--   runbook run restart -p deployments=all --step

name = "restart"
description = "Rolling restart of one deployment, several or all in the namespace; wait for the rollouts; verify every pod was replaced"
replaces = { "000-4", "001-6", "002-2", "004-2" }
version = "1.0.0"

params (steps.params) { "deployments", "namespace" }
param "timeout" { type = "duration", default = "5m", help = "how long each deployment's rollout may take" }

step "Find the deployments" {
  description = "kubectl get deploy,pods: the deployments named (or all) and the pods each runs now",
  run = function(ctx)
    local found = steps.deployments(ctx)
    for _, d in ipairs(found) do
      d.pods = {}
      for _, p in ipairs(k8s.deployment_health(ctx.params.namespace, d.name).pods) do d.pods[#d.pods + 1] = p.name end
      log.info("%s: %d pods", d.name, #d.pods)
    end
    return { deployments = found }
  end,
}

step "Restart" {
  description = "kubectl rollout restart of each deployment",
  confirm = true,
  needs = { "Find the deployments" },
  run = function(ctx, found)
    for _, d in ipairs(found.deployments) do
      k8s.rollout_restart("deploy/" .. d.name, { namespace = ctx.params.namespace })
    end
  end,
}

step "Wait for the rollouts" (steps.wait_rollouts { after = "Restart" })

step "Verify" (steps.verify_deployments { after = "Restart", check = "replaced" })
