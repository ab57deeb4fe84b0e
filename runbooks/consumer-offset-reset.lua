-- consumer-offset-reset.lua: move a consumer group's committed offsets, safely.
--
-- Replaces seed 002's `kafka-consumer-groups.sh --reset-offsets --execute`:
-- a group only takes new offsets while it has no members, so its consumers
-- are scaled to zero first (their replicas remembered), the plan is shown per
-- partition (current -> target, messages replayed or skipped), the reset is
-- checked against the broker, and the consumers come back. A failure brings
-- the consumers back too (on_failure = "undo").
--
--   runbook run consumer-offset-reset -p to=earliest --step
--   runbook run consumer-offset-reset -p to=shift:-500 -p partitions=0,3
--   runbook run consumer-offset-reset -p to=datetime:2026-11-22T10:00:00Z

name = "consumer-offset-reset"
description = "Stop a consumer group's consumers, reset its offsets (earliest, latest, an offset, a shift, a time), verify, start them again"
replaces = { "002-10" }
version = "1.0.0"
on_failure = "undo"

param "group" (steps.params.group)
param "topic" (steps.params.topic)
param "to" { required = true,
  help = "earliest | latest | offset:N | shift:N (e.g. shift:-500 replays 500 per partition) | datetime:2026-11-22T10:00:00Z" }
param "partitions" { type = "list", default = "", help = "the partitions (default: all of the topic's)" }
param "deployment" (steps.params.consumers)
param "namespace" (steps.params.namespace)
param "timeout" { type = "duration", default = "2m", help = "how long the consumers may take to stop, and to come back" }

-- "shift:-500" -> {shift = -500}; errors name the param.
local function target(text)
  if text == "earliest" or text == "latest" then return text end
  local kind, v = text:match("^(%a+):(.+)$")
  if (kind == "offset" or kind == "shift") and math.tointeger(tonumber(v)) then return { [kind] = math.tointeger(tonumber(v)) } end
  if kind == "datetime" and v:match("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d") then return { datetime = v } end
  error(("param to: %q is not earliest, latest, offset:N, shift:N or datetime:YYYY-MM-DDTHH:MM:SSZ"):format(text), 0)
end

local function partitions(ctx)
  local list = ctx.params.partitions
  if #list == 0 then return nil end
  for i, p in ipairs(list) do
    list[i] = math.tointeger(tonumber(p)) or error(("param partitions: %q is not a partition number"):format(p), 0)
  end
  return list
end

local function lag(ctx) return kafka.lag { group = ctx.params.group, topics = ctx.params.topic } end

step "Show the group's offsets" {
  description = "kafka-consumer-groups --describe: where the group is now, per partition",
  run = function(ctx)
    target(ctx.params.to) -- a bad `to` fails here, before anything is stopped
    partitions(ctx)
    local r = lag(ctx)
    log.info("%s", kafka.format_lag(r))
    local d = k8s.get("deploy/" .. ctx.params.deployment, { namespace = ctx.params.namespace })
    log.info("%s runs %d consumers of %s", ctx.params.deployment, d.spec.replicas or 1, ctx.params.group)
    return { total = r.total }
  end,
}

step "Stop the consumers" {
  description = "Scale the consumer deployment to 0 and wait until its pods are gone (the group takes no reset while it has members)",
  confirm = true,
  run = function(ctx)
    local saved = k8s.stop_workloads({ "deploy/" .. ctx.params.deployment },
      { namespace = ctx.params.namespace, timeout = ctx.params.timeout })
    log.info("%s stopped (was %d replicas)", ctx.params.deployment, saved[1].replicas)
    return { saved = saved }
  end,
  undo = function(ctx, out) k8s.start_workloads(out.saved, { timeout = ctx.params.timeout }) end,
}

step "Reset the offsets" {
  description = "kafka-consumer-groups --reset-offsets --execute: commit the target offset of every selected partition",
  uses = { "Stop the consumers" },
  confirm = true,
  run = function(ctx)
    if ctx.skipped("Stop the consumers") then
      -- the operator may have stopped them by hand; if not, the group still has members
      local d = k8s.get("deploy/" .. ctx.params.deployment, { namespace = ctx.params.namespace })
      local running = math.max(d.spec.replicas or 1, d.status and d.status.replicas or 0)
      if running > 0 then
        error(("not resetting: %s still runs %d consumer pod(s) because stopping them was declined, and a group "
          .. "takes no reset while it has members; run again and stop the consumers"):format(ctx.params.deployment,
          running), 0)
      end
    end
    local plan = kafka.reset_offsets { group = ctx.params.group, topics = ctx.params.topic,
      partitions = partitions(ctx), to = target(ctx.params.to) }
    log.info("%s", kafka.format_plan(plan))
    local targets = {}
    for _, p in ipairs(plan.partitions) do targets[tostring(p.partition)] = p.target end
    return { targets = targets, replay = plan.replay, skip = plan.skip, applied = plan.applied }
  end,
}

step "Verify the offsets" {
  description = "Read the group's committed offsets back from the broker: each selected partition at its target",
  needs = { "Reset the offsets" },
  run = function(ctx, reset)
    local want = reset.targets
    if ctx.dry_run then log.info("would read the committed offsets back and compare them with the plan"); return end
    local wrong = {}
    for _, p in ipairs(lag(ctx).partitions) do
      local w = want[tostring(p.partition)]
      if w and p.committed ~= w then
        wrong[#wrong + 1] = ("partition %d at %s, not %d"):format(p.partition, tostring(p.committed), w)
      end
    end
    if #wrong > 0 then error("the reset did not hold: " .. table.concat(wrong, "; "), 0) end
    log.info("every selected partition of %s is at its target", ctx.params.topic)
  end,
}

step "Start the consumers" {
  description = "Scale the consumers back to their replicas and wait until they are ready",
  needs = { "Stop the consumers" }, uses = { "Reset the offsets" },
  run = function(ctx, stopped)
    k8s.start_workloads(stopped.saved, { timeout = ctx.params.timeout })
    if ctx.skipped("Reset the offsets") then
      log.info("%s consumes again from its old offsets: the operator skipped the reset", ctx.params.group)
      return
    end
    local r = ctx.outputs["Reset the offsets"]
    log.info("%s consumes again from the new offsets (%d messages to replay, %d skipped)", ctx.params.group,
      r.replay, r.skip)
  end,
}
