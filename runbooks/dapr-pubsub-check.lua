-- dapr-pubsub-check.lua: is Dapr pub/sub working end to end?
--
-- Replaces seed 002 "Check Dapr Components" and the diagnosis of "Dapr
-- Pub/Sub Not Working" and "Dapr Sidecar Not Injected" (kubectl get component,
-- curl the sidecar's publish endpoint, daprd logs, the operator's and the
-- injector's logs, kafka-topics --list): the sidecars are injected and ready,
-- the component is deployed and loaded, the topics exist on the brokers, the
-- apps subscribe where they should, the control plane logs no errors, and a
-- test event published through the sidecar really lands on the Kafka topic.
-- Read-only apart from that test event (which --dry-run skips); exits 1 naming
-- every problem and what to do about it. Its steps are stdlib/steps.lua's,
-- which dapr-control-plane runs too before it fixes what it can.
--
--   runbook run dapr-pubsub-check
--   runbook run dapr-pubsub-check -p topic=reminders -p test_publish=false

name = "dapr-pubsub-check"
description = "Check Dapr pub/sub end to end: sidecars, the Kafka component, topics, subscriptions, the operator's and injector's logs, and a test event seen on Kafka"
replaces = { "000-7", "000-10", "001-8", "002-18" }
version = "1.1.0"

params (steps.dapr_params) { "namespace", "system_namespace", "pubsub", "app_id", "topic", "topics", "test_publish",
  "publish_timeout", "log_since" }

step "Check the sidecars" (steps.dapr_sidecars {})
step "Check the component" (steps.dapr_component {})
step "Check the topics" (steps.dapr_topics {})
step "Check the sidecar and publish" (steps.dapr_publish {})
step "Read the Dapr logs" (steps.dapr_logs { components = { "operator", "injector" } })

local CHECKS = { "Check the sidecars", "Check the component", "Check the topics", "Check the sidecar and publish",
  "Read the Dapr logs" }

step "Verdict" {
  description = "Healthy, or every problem found with what to do; exit 1 when there is one",
  uses = CHECKS,
  run = function(ctx)
    local problems = {}
    for _, name in ipairs(CHECKS) do
      if ctx.skipped(name) then log.warn("%s was skipped: not checked", name)
      else for _, p in ipairs(ctx.outputs[name].problems) do problems[#problems + 1] = p end end
    end
    if #problems == 0 then
      log.info("Dapr pub/sub %s works: sidecars ready, component loaded, topics there%s", ctx.params.pubsub,
        ctx.params.test_publish and not ctx.dry_run and ", a test event went through to Kafka" or "")
      return { ok = true }
    end
    error(("%d problem%s with Dapr pub/sub %s:\n  %s\nsee seed 002: check the component's brokers; dapr-control-plane "
      .. "restarts what is unhealthy in the control plane and re-creates the pods without sidecars")
      :format(#problems, #problems == 1 and "" or "s", ctx.params.pubsub, table.concat(problems, "\n  ")), 0)
  end,
}
