-- dapr-pubsub-check.lua: is Dapr pub/sub working end to end?
--
-- Replaces seed 002 "Dapr Pub/Sub Not Working" and "Dapr Sidecar Not
-- Injected" (kubectl get component, curl the sidecar's publish endpoint,
-- daprd logs, kafka-topics --list): the sidecars are injected and ready, the
-- component is deployed and loaded, the topics exist on the brokers, the apps
-- subscribe where they should, and a test event published through the sidecar
-- really lands on the Kafka topic. Read-only apart from that test event (which
-- --dry-run skips); exits 1 naming every problem and what to do about it.
--
--   runbook run dapr-pubsub-check
--   runbook run dapr-pubsub-check -p topic=reminders -p test_publish=false

name = "dapr-pubsub-check"
description = "Check Dapr pub/sub end to end: sidecars, the Kafka component, topics, subscriptions, and a test event seen on Kafka"
replaces = { "000-7", "000-10", "001-8" }
version = "1.0.0"

param "namespace" (steps.params.namespace)
param "pubsub" { default = "kafka-pubsub", help = "the pub/sub component's name" }
param "app_id" { default = "backend", help = "the app whose sidecar publishes (DAPR_HTTP_ENDPOINT is its sidecar)" }
param "topic" { default = "task-events", help = "the topic the test event goes to" }
param "topics" { default = "task-events,task-updates,reminders", help = "topics that must exist on the brokers (comma-separated)" }
param "test_publish" { type = "boolean", default = true, help = "publish a test event through the sidecar and look for it on Kafka" }
param "publish_timeout" { type = "duration", default = "10s", help = "how long to look for the test event on the topic" }

local function list(s)
  local out = {}
  for t in s:gmatch("[^,%s]+") do out[#out + 1] = t end
  return out
end

-- Each check step returns its problems in its outputs (so a resumed run still
-- has them for the verdict); problem() logs one and adds it to the list.
local function collector()
  local problems = {}
  return problems, function(fmt, ...)
    local p = fmt:format(...)
    problems[#problems + 1] = p
    log.warn("%s", p)
  end
end

step "Check the sidecars" {
  description = "Every pod annotated dapr.io/enabled has a daprd container, and it is ready",
  run = function(ctx)
    local problems, problem = collector()
    local s = dapr.sidecar_status(ctx.params.namespace)
    local ready = 0
    for _, p in ipairs(s.pods) do
      if p.problem then problem("pod %s (app %s): %s; restart it (kubectl delete pod) once the injector runs", p.pod,
        tostring(p.app_id), p.problem)
      else ready = ready + 1 end
    end
    log.info("%d of %d pods have a ready daprd sidecar", ready, #s.pods)
    return { pods = #s.pods, ready = ready, problems = problems }
  end,
}

step "Check the component" {
  description = "kubectl get component: the pub/sub component is deployed as pubsub.kafka and its brokers are reachable",
  run = function(ctx)
    local problems, problem = collector()
    local c = k8s.get("components.dapr.io/" .. ctx.params.pubsub, { namespace = ctx.params.namespace, missing_ok = true })
    if not c then
      problem("component %s is not deployed in %s (kubectl get components -n %s)", ctx.params.pubsub,
        ctx.params.namespace, ctx.params.namespace)
      return { deployed = false, problems = problems }
    end
    if c.spec.type ~= "pubsub.kafka" then problem("component %s is %s, not pubsub.kafka", ctx.params.pubsub, tostring(c.spec.type)) end
    local brokers
    for _, m in ipairs(c.spec.metadata or {}) do if m.name == "brokers" then brokers = m.value end end
    log.info("component %s: %s, brokers %s", ctx.params.pubsub, c.spec.type, tostring(brokers))
    local down = {}
    for _, b in ipairs(kafka.brokers { probe_timeout = "3s" }) do
      if not b.reachable then down[#down + 1] = ("%s:%d (%s)"):format(b.host, b.port, tostring(b.reason)) end
    end
    if #down > 0 then problem("Kafka brokers not answering: %s", table.concat(down, ", ")) end
    return { deployed = true, brokers = brokers, problems = problems }
  end,
}

step "Check the topics" {
  description = "kafka-topics --list: the topics the apps publish to and subscribe to exist",
  run = function(ctx)
    local problems, problem = collector()
    local have = {}
    for _, t in ipairs(kafka.topics()) do have[t.name] = t.partitions end
    for _, t in ipairs(list(ctx.params.topics)) do
      if not have[t] then problem("topic %s does not exist on the brokers", t)
      else log.info("topic %s: %d partitions", t, have[t]) end
    end
    return { problems = problems }
  end,
}

step "Check the sidecar and publish" {
  description = "The app's sidecar: healthz, outbound, the component loaded, its subscriptions; then POST /v1.0/publish and read the event back from Kafka",
  run = function(ctx)
    local problems, problem = collector()
    local before = kafka.watermarks(ctx.params.topic)
    local rep = dapr.check_app(ctx.params.app_id, {
      components = { [ctx.params.pubsub] = "pubsub.kafka" },
      test_publish = ctx.params.test_publish and {
        pubsub = ctx.params.pubsub, topic = ctx.params.topic,
        confirm = function(ev) -- the event, keyed by its check id, read from the partitions' old ends
          local from = {}
          for p, w in pairs(before) do from[p] = w.high end
          for m in kafka.consume { topic = ctx.params.topic, from_offsets = from, timeout = ctx.params.publish_timeout } do
            if m.key == ev.check_id then
              log.info("test event %s is on %s partition %d offset %d", ev.check_id, ctx.params.topic, m.partition, m.offset)
              return true
            end
          end
          return false
        end,
      } or nil,
    })
    log.info("sidecar %s (%s): healthz %s, outbound %s, runtime %s", rep.app_id, rep.endpoint, tostring(rep.healthy),
      tostring(rep.outbound), tostring(rep.runtime_version))
    log.info("subscriptions: %s", #rep.subscriptions > 0 and table.concat(rep.subscriptions, ", ") or "none")
    for _, p in ipairs(rep.problems) do problem("%s", p) end
    return { publish = rep.publish, subscriptions = rep.subscriptions, problems = problems }
  end,
}

local CHECKS = { "Check the sidecars", "Check the component", "Check the topics", "Check the sidecar and publish" }

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
    error(("%d problem%s with Dapr pub/sub %s:\n  %s\nsee seed 002: check the component's brokers, restart the Dapr "
      .. "system deployments (kubectl rollout restart deployment -n dapr-system), or the pods without sidecars")
      :format(#problems, #problems == 1 and "" or "s", ctx.params.pubsub, table.concat(problems, "\n  ")), 0)
  end,
}
