-- dlq-replay.lua: send dead-lettered messages back to the topic they failed on.
--
-- Replaces seed 002 "Reminder Delivery Failures" (notification-service logs,
-- kafka-console-consumer on reminders-dlq, then POST /api/admin/retry-dlq with
-- max_count 100). First the consumer must be able to take them (healthy, its
-- recent logs, and the mail server answering from inside its pod, as seed 002's
-- `kubectl exec deployment/notification-service -- curl -f smtp://...`), then the DLQ is read and summarized by error, then the chosen
-- messages are produced to their original topic with their key and headers.
-- A consumer group (`group`) remembers how far the replays got, so a second
-- run never sends the same message twice.
--
--   runbook run dlq-replay --step
--   runbook run dlq-replay -p error_match='^smtp' -p max=100

name = "dlq-replay"
description = "Check the consumer, summarize the dead-letter topic by error, replay the chosen messages to their original topic"
replaces = { "002-22" }
version = "1.0.0"

param "dlq_topic" { default = "reminders-dlq", help = "the dead-letter topic" }
param "to_topic" { default = "reminders", help = "where the messages go back to (messages whose original-topic header names another topic are left)" }
param "group" { default = "runbook-dlq-replay", help = "consumer group that remembers what was replayed" }
param "max" { type = "integer", default = 100, help = "most messages to replay in one run (seed: max_count 100)" }
param "error_match" { default = "", help = "Lua pattern the message's error header must match (e.g. ^smtp for transient mail failures); empty: every error" }
param "deployment" { default = "todo-chatbot-notification", help = "the consumer of to_topic, which must be healthy before a replay" }
param "namespace" (steps.params.namespace)
param "require_healthy" { type = "boolean", default = true, help = "refuse to replay into an unhealthy consumer (the messages would fail again)" }
param "smtp_url" { default = "", help = "the mail server to check from inside the consumer's pod (smtp://host:port); empty: the pod's own $SMTP_URL, no check when it has none" }
param "inspect_max" { type = "integer", default = 10000, help = "most DLQ messages to read for the summary" }

local function header(m, name)
  for _, h in ipairs(m.headers or {}) do if h[1] == name then return h[2] end end
end

-- The messages the run may replay: for the original topic, matching the error pattern.
local function wanted(ctx)
  local pattern = ctx.params.error_match
  return function(m)
    local origin = header(m, "original-topic")
    if origin and origin ~= ctx.params.to_topic then return false end
    if pattern == "" then return true end
    local ok, found = pcall(string.match, header(m, "error") or "", pattern)
    if not ok then error(("param error_match %q: %s"):format(pattern, tostring(found):gsub("^.-:%d+: ", "")), 0) end
    return found ~= nil
  end
end

local function committed(ctx)
  local r = kafka.lag { group = ctx.params.group, topics = ctx.params.dlq_topic }
  local n = 0
  for _, p in ipairs(r.partitions) do n = n + (p.committed or 0) end
  return n, r.total
end

step "Check the consumer" {
  description = "kubectl get deploy / logs --tail=100 | grep -i error: the consumer of to_topic must be able to take the messages",
  run = function(ctx)
    -- a malformed pattern fails here, before anything is read (matched against its own text to parse it all)
    wanted(ctx)({ headers = { { "error", ctx.params.error_match } } })
    local h = k8s.deployment_health(ctx.params.namespace, ctx.params.deployment)
    local lines = k8s.logs("deploy/" .. ctx.params.deployment, { namespace = ctx.params.namespace, tail = 100 })
    local errors = 0
    for _, l in ipairs(lines) do if l:lower():find("error", 1, true) then errors = errors + 1 end end
    log.info("%s: %d/%d ready; %d of its last %d log lines mention an error", ctx.params.deployment, h.ready, h.desired,
      errors, #lines)
    if not h.healthy then
      local msg = ("%s is not healthy (%s): replayed messages would fail again"):format(ctx.params.deployment,
        table.concat(h.problems, "; "))
      if ctx.params.require_healthy then error(msg .. "; fix it first (or -p require_healthy=false)", 0) end
      log.warn("%s", msg)
    end
    return { healthy = h.healthy, log_errors = errors }
  end,
}

-- curl in the pod, with the pod's env: the URL (it may hold a password) is never printed.
local SMTP_CHECK = 'url=${1:-$SMTP_URL}; [ -n "$url" ] || { echo none; exit 0; }; curl -fsS --max-time 10 -o /dev/null "$url"'

step "Check the mail server from the consumer's pod" {
  description = "kubectl exec deploy/DEPLOYMENT -- curl -f smtp://...: the mail server answers from where the consumer sends",
  run = function(ctx)
    local r = k8s.exec("deploy/" .. ctx.params.deployment, { "sh", "-c", SMTP_CHECK, "sh", ctx.params.smtp_url },
      { namespace = ctx.params.namespace, read = true, check = false, timeout = "30s" })
    if r.status == 0 and r.stdout:match("^none") then
      log.info("pod %s has no SMTP_URL and no smtp_url was given: no mail server to check", r.pod)
      return { checked = false }
    end
    if r.status ~= 0 then
      local msg = ("the mail server does not answer from pod %s (curl exit %d: %s)"):format(r.pod, r.status,
        (r.stderr:gsub("%s+$", "")))
      if ctx.params.require_healthy then error(msg .. "; replayed reminders would fail again (or -p require_healthy=false)", 0) end
      log.warn("%s", msg)
      return { checked = true, answers = false }
    end
    log.info("the mail server answers from pod %s", r.pod)
    return { checked = true, answers = true }
  end,
}

step "Inspect the dead letters" {
  description = "kafka-console-consumer on the DLQ from where the last replay stopped: counts by error and original topic, the first 10",
  run = function(ctx)
    local by_error, by_origin, pick = {}, {}, wanted(ctx)
    local n, eligible, shown = 0, 0, 0
    local replayed_before = committed(ctx)
    local starts = {}
    for _, p in ipairs(kafka.lag({ group = ctx.params.group, topics = ctx.params.dlq_topic }).partitions) do
      if p.committed then starts[p.partition] = p.committed end
    end
    for m in kafka.consume { topic = ctx.params.dlq_topic, from = "earliest", from_offsets = starts,
      max_messages = ctx.params.inspect_max } do
      n = n + 1
      local err = (header(m, "error") or "(no error header)"):match("^[^:]*") -- "smtp: 550 ..." -> "smtp"
      by_error[err] = (by_error[err] or 0) + 1
      local origin = header(m, "original-topic") or "(none)"
      by_origin[origin] = (by_origin[origin] or 0) + 1
      if pick(m) then
        eligible = eligible + 1
        if shown < 10 then
          shown = shown + 1
          log.info("  [%d] offset %d key %s: %s (retries %s, failed at %s)", m.partition, m.offset, tostring(m.key),
            header(m, "error") or "?", header(m, "retry-count") or "?", header(m, "failed-at") or "?")
        end
      end
    end
    for e, c in pairs(by_error) do log.info("%d messages failed with %s", c, e) end
    for o, c in pairs(by_origin) do log.info("%d messages came from %s", c, o) end
    log.info("%d messages not yet replayed (%d replayed by earlier runs); %d match error_match %q and to_topic %s",
      n, replayed_before, eligible, ctx.params.error_match, ctx.params.to_topic)
    return { pending = n, eligible = eligible, by_error = by_error, will_replay = math.min(eligible, ctx.params.max) }
  end,
}

step "Replay" {
  description = "Produce the chosen messages (key, value, headers) to to_topic, at most `max`; commit the group's progress on the DLQ",
  needs = { "Inspect the dead letters" },
  confirm = true,
  when = function(ctx) return ctx.outputs["Inspect the dead letters"].eligible > 0 end,
  run = function(ctx)
    local before = committed(ctx)
    local r = kafka.replay { from_topic = ctx.params.dlq_topic, to_topic = ctx.params.to_topic, max = ctx.params.max,
      filter = wanted(ctx), group = ctx.params.group }
    log.info("%d of %d scanned messages %s to %s", r.matched, r.scanned, ctx.dry_run and "would be replayed" or "replayed",
      ctx.params.to_topic)
    return { moved = r.moved, matched = r.matched, scanned = r.scanned, committed_before = before }
  end,
}

step "Verify" {
  description = "Every replayed message was delivered, and the group's position on the DLQ moved past what was read",
  needs = { "Replay" }, -- skipped with it: nothing eligible, or the operator declined
  run = function(ctx, r)
    if ctx.dry_run then log.info("would check that %d messages were delivered", r.matched); return end
    if r.moved ~= r.matched then error(("only %d of %d messages were delivered"):format(r.moved, r.matched), 0) end
    local now, left = committed(ctx)
    if now - r.committed_before < r.scanned - 1 then
      error(("the group %s moved %d on %s, expected %d"):format(ctx.params.group, now - r.committed_before,
        ctx.params.dlq_topic, r.scanned), 0)
    end
    log.info("%d messages replayed to %s; %d left in %s after the group's position", r.moved, ctx.params.to_topic, left,
      ctx.params.dlq_topic)
    return { replayed = r.moved, left = left }
  end,
}
