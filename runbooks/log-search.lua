-- log-search.lua: what a workload's logs say, as data.
--
-- Replaces seed 000 "Structured Logs" and seed 002 "Structured Log Queries":
-- `kubectl logs ... | jq 'select(.level == "ERROR")'`, `select(.correlation_id == ...)`
-- and the error counts, across every pod of a deployment at once, merged in
-- time order. Prints a summary (records by level and by logger, the top
-- messages, the first and last match) and the matches themselves. Only reads.
--
--   runbook run log-search -p deployment=todo-chatbot-backend -p level=ERROR -p since=1h
--   runbook run log-search -p deployment=todo-chatbot-backend -p correlation_id=3f2a9c1e
--   runbook run log-search -p deployment=todo-chatbot-backend -p pattern="publish to .* failed"

name = "log-search"
description = "Search a deployment's logs across its pods by level, correlation id, pattern and time range"
replaces = { "000-10" }
version = "1.0.0"

params (steps.params) { "deployment", "namespace", "container" }
param "level" { default = "", help = "only records of this level (ERROR, WARNING, INFO ...)" }
param "correlation_id" { default = "", help = "only records with this correlation_id" }
param "pattern" { default = "", help = "only lines matching this Lua pattern (JSON or plain text lines)" }
param "since" { type = "duration", default = "1h", help = "how far back to look" }
param "show" { type = "integer", default = 20, help = "how many matches to print (the latest)" }

local function query(ctx, extra)
  local p = ctx.params
  local where = {}
  if p.level ~= "" then where.level = p.level end
  if p.correlation_id ~= "" then where.correlation_id = p.correlation_id end
  local q = { target = "deploy/" .. p.deployment, namespace = p.namespace, since = p.since, where = where,
    container = p.container ~= "" and p.container or nil, match = p.pattern ~= "" and p.pattern or nil }
  for k, v in pairs(extra or {}) do q[k] = v end
  return k8s.log_query(q)
end

local function message(rec)
  return rec.fields and tostring(rec.fields.message or rec.line) or rec.line
end

step "Search the logs" {
  description = "kubectl logs of every pod --since | jq select(...): the matches, merged in time order",
  run = function(ctx)
    local r = query(ctx, { count_by = "level" })
    log.info("%d of %d records match in %d pod(s) of %s", r.count, r.scanned, #r.pods, ctx.params.deployment)
    for _, b in ipairs(r.by) do log.info("  level %-8s %d", b.value, b.count) end
    if r.first then
      log.info("first match %s in %s: %s", r.first.stamp, r.first.pod, message(r.first))
      log.info("last match  %s in %s: %s", r.last.stamp, r.last.pod, message(r.last))
    end
    local from = math.max(1, r.count - ctx.params.show + 1)
    if r.count > 0 then log.info("the latest %d:", r.count - from + 1) end
    for i = from, r.count do
      local rec = r.records[i]
      log.info("  %s %s %s", rec.stamp, rec.pod, rec.line)
    end
    return { count = r.count, scanned = r.scanned, pods = r.pods, by_level = r.by,
      first = r.first and r.first.stamp, last = r.last and r.last.stamp }
  end,
}

step "Top messages" {
  description = "jq -r .message | sort | uniq -c | sort -rn | head: which error, and which logger says it",
  needs = { "Search the logs" },
  when = function(ctx) return ctx.outputs["Search the logs"].count > 0 end,
  run = function(ctx)
    local top = {}
    for _, field in ipairs { "message", "logger" } do
      local r = query(ctx, { count_by = field, top = 5 })
      top[field] = r.by
      log.info("top %ss:", field)
      for _, b in ipairs(r.by) do log.info("  %5d  %s", b.count, b.value) end
    end
    return top
  end,
}
