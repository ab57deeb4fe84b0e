-- kafka-lag-remediation.lua: scale a consumer group's deployment out of its lag.
--
-- Replaces seed 002 "High Consumer Lag" and "Kafka Consumer Scaling" and seed
-- 000 "Message Processing Delays" (kafka-consumer-groups --describe, kubectl
-- scale, watch the lag, escalate after 5 minutes). The replicas come from the
-- lag (lag_per_replica, the seed's HPA target of 100 per pod) and never exceed
-- the topic's partition count: a consumer beyond it gets no partition. An HPA
-- on the deployment is raised with it, so it does not scale the consumers back.
--
--   runbook run kafka-lag-remediation --step
--   runbook run kafka-lag-remediation -p group=notification-service -p topic=reminders \
--     -p deployment=todo-chatbot-notification

name = "kafka-lag-remediation"
description = "Measure a consumer group's lag; over the threshold, scale its consumers (capped at the partition count) and watch the lag drain"
replaces = { "000-13", "001-8", "002-6", "002-21" }
version = "1.0.0"

param "group" (steps.params.group)
param "topic" (steps.params.topic)
param "deployment" (steps.params.consumers)
param "namespace" (steps.params.namespace)
param "threshold" { type = "integer", default = 1000, help = "total lag (messages) above which to act (seed: >1000)" }
param "lag_per_replica" { type = "integer", default = 100, help = "lag one consumer is expected to hold (the seed's HPA target averageValue)" }
param "max_replicas" { type = "integer", default = 0, help = "upper bound for the replicas (0: the topic's partition count)" }
param "watch" { type = "duration", default = "5m", help = "how long the lag has to fall below the threshold before escalating (seed: 5 minutes)" }
param "interval" { type = "duration", default = "5s", help = "how often to measure the lag while watching" }
param "rollout_timeout" { type = "duration", default = "3m", help = "how long the new consumers may take to become ready" }

-- The escalation goes to Slack when SLACK_WEBHOOK is set (channel SLACK_CHANNEL,
-- default #incidents); without it the failed run is the escalation.
local SLACK = os.getenv("SLACK_WEBHOOK")
if SLACK and SLACK ~= "" then
  notify = { on_failure = { slack = { webhook = SLACK, channel = os.getenv("SLACK_CHANNEL") or "#incidents" } } }
end

local function deploy(ctx) return "deploy/" .. ctx.params.deployment end
local function ns(ctx) return { namespace = ctx.params.namespace } end

local function scaling(ctx)
  local p = ctx.outputs["Plan the replicas"]
  return p.target > p.current
end

local function measure(ctx)
  local r = kafka.lag { group = ctx.params.group, topics = ctx.params.topic }
  return r, r.total
end

-- The replicas for the lag `m` (of "Measure the lag") with `current` running:
-- ceil(lag / lag_per_replica), never fewer than current, never more than the
-- partitions (or max_replicas). Returns them, the cap and the replicas wanted.
local function replicas_for(ctx, m, current)
  local cap = ctx.params.max_replicas > 0 and math.min(ctx.params.max_replicas, m.partitions) or m.partitions
  local want = math.ceil(m.total / ctx.params.lag_per_replica)
  return math.max(current, math.min(want, cap)), cap, want
end

-- The HPA whose scaleTargetRef is the deployment, if any.
local function hpa_of(ctx)
  for _, h in ipairs(k8s.list("horizontalpodautoscalers", ns(ctx))) do
    local ref = h.spec.scaleTargetRef or {}
    if ref.kind == "Deployment" and ref.name == ctx.params.deployment then return h end
  end
end

step "Measure the lag" {
  description = "kafka-consumer-groups --describe: committed offset, log end and lag per partition of the topic",
  run = function(ctx)
    local r, total = measure(ctx)
    log.info("%s", kafka.format_lag(r))
    if r.no_offset > 0 then log.warn("%d partitions have no committed offset for %s", r.no_offset, ctx.params.group) end
    local partitions = #kafka.describe_topic(ctx.params.topic).partitions
    local over = total > ctx.params.threshold
    log[over and "warn" or "info"]("lag %d %s the threshold %d", total, over and "is over" or "is within", ctx.params.threshold)
    return { total = total, partitions = partitions, over = over,
      max = r.max and { partition = r.max.partition, lag = r.max.lag } or nil }
  end,
}

step "Consumer errors" (steps.top_errors {
  description = "kubectl logs of every consumer pod | jq select(.level == \"ERROR\"): processing errors scaling would not fix",
  needs = { "Measure the lag" },
  when = function(ctx) return ctx.outputs["Measure the lag"].over end,
  since = "15m",
})

step "Plan the replicas" {
  description = "ceil(lag / lag_per_replica), never fewer than now, never more than the partitions (seed: beyond 12 gives nothing)",
  needs = { "Measure the lag" },
  run = function(ctx)
    local current = k8s.get(deploy(ctx), ns(ctx)).spec.replicas or 1
    local m = ctx.outputs["Measure the lag"]
    if not m.over then return { current = current, target = current } end
    local target, cap, want = replicas_for(ctx, m, current)
    if ctx.params.max_replicas > m.partitions then
      log.warn("max_replicas %d is more than the %d partitions of %s: capped at %d", ctx.params.max_replicas,
        m.partitions, ctx.params.topic, m.partitions)
    end
    if target == current then
      log.warn("%s already runs %d consumers, the most that help (%s has %d partitions): scaling cannot reduce this lag",
        ctx.params.deployment, current, ctx.params.topic, m.partitions)
    else
      log.info("%s: %d -> %d replicas (lag %d / %d per replica = %d, cap %d)", ctx.params.deployment, current, target,
        m.total, ctx.params.lag_per_replica, want, cap)
    end
    local h = hpa_of(ctx)
    if h then
      log.info("HPA %s keeps %s between %d and %d replicas", h.metadata.name, ctx.params.deployment,
        h.spec.minReplicas or 1, h.spec.maxReplicas)
    end
    return { current = current, target = target, cap = cap,
      hpa = h and { name = h.metadata.name, min = h.spec.minReplicas or 1, max = h.spec.maxReplicas } or nil }
  end,
}

step "Scale the consumers" {
  description = "kubectl scale to the planned replicas; an HPA on the deployment gets minReplicas (and maxReplicas if lower) raised to match",
  needs = { "Plan the replicas" },
  confirm = true,
  when = function(ctx) return scaling(ctx) end,
  run = function(ctx, p)
    if p.hpa and (p.hpa.min < p.target or p.hpa.max < p.target) then
      k8s.patch("horizontalpodautoscalers/" .. p.hpa.name,
        { spec = { minReplicas = math.max(p.hpa.min, p.target), maxReplicas = math.max(p.hpa.max, p.target) } },
        { namespace = ctx.params.namespace, type = "merge" })
      log.info("HPA %s: minReplicas %d, maxReplicas %d (was %d and %d; lower them again once the lag is gone)",
        p.hpa.name, math.max(p.hpa.min, p.target), math.max(p.hpa.max, p.target), p.hpa.min, p.hpa.max)
    end
    k8s.scale(deploy(ctx), p.target, { namespace = ctx.params.namespace, current_replicas = p.current })
  end,
}

step "Wait for the new consumers" (steps.rollout_status {
  needs = { "Plan the replicas", "Scale the consumers" },
  when = scaling,
  target = deploy, within = "rollout_timeout",
})

step "Watch the lag fall" {
  description = "Measure the lag every `interval` until it is within the threshold, for at most `watch`",
  needs = { "Measure the lag" },
  when = function(ctx) return ctx.outputs["Measure the lag"].over end,
  run = function(ctx, measured)
    local start = measured.total
    if ctx.dry_run then
      log.info("would watch the lag of %s fall from %d below %d for up to %s", ctx.params.group, start,
        ctx.params.threshold, duration.format(ctx.params.watch))
      return { drained = false, total = start, samples = {} }
    end
    local t0 = time.monotonic()
    local samples, prev = {}, nil
    while true do
      local _, now = measure(ctx)
      local elapsed = time.monotonic() - t0
      samples[#samples + 1] = { t = math.floor(elapsed * 10 + 0.5) / 10, lag = now }
      if now <= ctx.params.threshold then
        log.info("lag %d after %s: within the threshold %d (from %d)", now, duration.format(elapsed),
          ctx.params.threshold, start)
        return { drained = true, total = now, seconds = elapsed, samples = samples }
      end
      log.info("lag %d after %s (%s)", now, duration.format(elapsed),
        prev and ("%+.0f/s"):format((now - prev.lag) / math.max(elapsed - prev.t, 0.001)) or "first measurement")
      prev = { t = elapsed, lag = now }
      if elapsed >= ctx.params.watch then
        log.warn("lag %d is still over the threshold %d after %s (it was %d)", now, ctx.params.threshold,
          duration.format(ctx.params.watch), start)
        return { drained = false, total = now, seconds = elapsed, samples = samples }
      end
      time.sleep(math.min(ctx.params.interval, ctx.params.watch - elapsed))
    end
  end,
}

step "Report or escalate" {
  description = "Say what was done; when the lag did not fall within `watch`, post to Slack and fail the run (seed: escalate to engineering)",
  needs = { "Measure the lag", "Plan the replicas" }, uses = { "Scale the consumers", "Watch the lag fall" },
  run = function(ctx, m)
    local p = ctx.outputs["Plan the replicas"]
    local scaled = ("no scaling (%s at %d replicas)"):format(ctx.params.deployment, p.current)
    if ctx.skipped("Scale the consumers") == "operator" then
      scaled = ("no scaling: the operator declined %s %d -> %d"):format(ctx.params.deployment, p.current, p.target)
    elseif scaling(ctx) then
      scaled = ("%s scaled %d -> %d"):format(ctx.params.deployment, p.current, p.target)
    end
    if not m.over then
      log.info("%s on %s: lag %d, within the threshold %d; nothing to do", ctx.params.group, ctx.params.topic,
        m.total, ctx.params.threshold)
      return { ok = true }
    end
    if ctx.dry_run then log.info("dry run: %s would be acted on (lag %d, %s)", ctx.params.group, m.total, scaled); return end
    if ctx.skipped("Watch the lag fall") then
      log.warn("%s on %s: lag %d, over the threshold %d; the lag was not watched (%s)", ctx.params.group,
        ctx.params.topic, m.total, ctx.params.threshold, scaled)
      return { ok = false }
    end
    local w = ctx.outputs["Watch the lag fall"]
    if w.drained then
      log.info("%s on %s: lag %d -> %d in %s; %s", ctx.params.group, ctx.params.topic, m.total, w.total,
        duration.format(w.seconds), scaled)
      return { ok = true }
    end
    error(("consumer lag of %s on %s is %d after %s (was %d; %s). Escalating to engineering: runbook report %s")
      :format(ctx.params.group, ctx.params.topic, w.total, duration.format(w.seconds), m.total, scaled, ctx.run_id), 0)
  end,
}
