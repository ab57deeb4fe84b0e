-- log-search.lua: what a workload's logs say, as data.
--
-- Replaces seed 000 "View Logs" and "Structured Logs" and seed 002 "Viewing
-- Logs" and "Structured Log Queries": `kubectl logs ... | jq 'select(.level ==
-- "ERROR")'`, `select(.user_id == ...)`, the error counts of the last N lines,
-- and `kubectl logs -f`, across every pod of a deployment at once, merged in
-- time order. Prints a summary (records by level and by logger, the top
-- messages, the first and last match) and the matches themselves; with
-- `follow`, then the matches as the pods write them, until that time has
-- passed, `max` matches have come, or Ctrl-C. Only reads.
--
--   runbook run log-search -p deployment=todo-chatbot-backend -p level=ERROR -p since=1h
--   runbook run log-search -p deployment=todo-chatbot-backend -p correlation_id=3f2a9c1e
--   runbook run log-search -p deployment=todo-chatbot-backend -p where=user_id=user-7,event_type=task.completed
--   runbook run log-search -p deployment=todo-chatbot-backend -p level=ERROR -p tail=1000
--   runbook run log-search -p deployment=todo-chatbot-backend -p container=daprd -p follow=2m
--   runbook run log-search -p deployment=todo-chatbot-backend -p pattern="publish to .* failed"

name = "log-search"
description = "Search and follow a deployment's logs across its pods by any JSON field, pattern and time range"
replaces = { "000-2", "000-10", "002-14", "002-15" }
version = "1.1.0"

params (steps.params) { "deployment", "namespace", "container" }
param "level" { default = "", help = "only records of this level (ERROR, WARNING, INFO ...)" }
param "correlation_id" { default = "", help = "only records with this correlation_id" }
param "where" { default = "", help = "only records whose JSON fields have these values: FIELD=VALUE[,FIELD=VALUE...], a value may be V1|V2 (e.g. user_id=user-7,event_type=task.completed)" }
param "pattern" { default = "", help = "only lines matching this Lua pattern (JSON or plain text lines)" }
param "since" { type = "duration", default = "1h", help = "how far back to look" }
param "tail" { type = "integer", default = 0, help = "only the last N lines of each pod (kubectl logs --tail; 0: every line since `since`)" }
param "show" { type = "integer", default = 20, help = "how many matches to print (the latest)" }
param "follow" { type = "duration", default = "0s", help = "then follow the logs (kubectl logs -f) this long, printing each match as it comes (0s: do not follow); Ctrl-C ends it" }
param "max" { type = "integer", default = 0, help = "stop following after this many matches (0: only `follow` ends it)" }

-- "user_id=user-7,level=ERROR|WARNING" -> {user_id = "user-7", level = {"ERROR", "WARNING"}}
local function parse_where(text)
  local where = {}
  for item in text:gmatch("[^,]+") do
    local k, v = item:match("^%s*([^=%s]+)%s*=%s*(.-)%s*$")
    if not k or v == "" then
      error(("param where: %q is not FIELD=VALUE (e.g. where=user_id=user-7,event_type=task.completed)"):format(item), 0)
    end
    if v:find("|", 1, true) then
      local any = {}
      for one in v:gmatch("[^|]+") do any[#any + 1] = one end
      v = any
    end
    where[k] = v
  end
  return where
end

local function query(ctx, extra)
  local p = ctx.params
  local where = parse_where(p.where)
  if p.level ~= "" then where.level = p.level end
  if p.correlation_id ~= "" then where.correlation_id = p.correlation_id end
  local q = { target = "deploy/" .. p.deployment, namespace = p.namespace, since = p.since, where = where,
    tail = p.tail > 0 and p.tail or nil,
    container = p.container ~= "" and p.container or nil, match = p.pattern ~= "" and p.pattern or nil }
  for k, v in pairs(extra or {}) do q[k] = v end
  return k8s.log_query(q)
end

local function message(rec)
  return rec.fields and tostring(rec.fields.message or rec.line) or rec.line
end

step "Search the logs" {
  description = "kubectl logs of every pod --since/--tail | jq select(...): the matches, merged in time order",
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

step "Follow the logs" {
  description = "kubectl logs -f of every pod | jq select(...): each match as it is written, until `follow` passes, `max` matches or Ctrl-C",
  when = function(ctx) return ctx.params.follow > 0 end,
  run = function(ctx)
    local p = ctx.params
    log.info("following the pods of %s for %s%s (Ctrl-C ends it)", p.deployment, duration.format(p.follow),
      p.max > 0 and (" or until %d matches"):format(p.max) or "")
    local started = time.monotonic()
    -- Ctrl-C stops the run here (exit 130, resumable); the streams close with the query
    local r = query(ctx, { since = false, tail = 0, follow = p.follow, max = p.max > 0 and p.max or nil,
      each = function(rec) log.info("  %s %s %s", rec.stamp, rec.pod, rec.line) end })
    log.info("followed %d pod(s) for %s: %d of %d new records match%s", #r.pods, duration.format(time.monotonic() - started),
      r.count, r.scanned, p.max > 0 and r.count >= p.max and (" (max %d reached)"):format(p.max) or "")
    return { count = r.count, scanned = r.scanned, pods = r.pods, seconds = time.monotonic() - started }
  end,
}
