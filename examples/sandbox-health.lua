-- sandbox-health.lua: looks at every part of the local sandbox the way an
-- operator's daily check would, then publishes a test event (a write).
--   make sandbox && . examples/sandbox/.state/env
--   runbook run examples/sandbox-health.lua --dry-run

name = "sandbox-health"
description = "Check the sandbox's Dapr sidecar, PostgreSQL, Redis and Kafka, then publish a test event"
version = "1.0.0"

param "dapr" { default = os.getenv("DAPR_HTTP_ENDPOINT") or "http://127.0.0.1:3500", help = "Dapr sidecar endpoint" }
param "database_url" { default = os.getenv("DATABASE_URL"), secret = true, help = "PostgreSQL URL" }

step "Dapr sidecar" {
  description = "GET /v1.0/healthz and /v1.0/metadata",
  retry = { attempts = 3, base = "200ms" },
  run = function(ctx)
    http.check(ctx.params.dapr .. "/v1.0/healthz")
    local meta = http.check(ctx.params.dapr .. "/v1.0/metadata").json
    local comps = {}
    for _, c in ipairs(meta.components or {}) do comps[#comps + 1] = c.name .. " (" .. c.type .. ")" end
    log.info("app %s: components %s", meta.id, table.concat(comps, ", "))
    return { app = meta.id, components = #comps }
  end,
}

step "PostgreSQL" {
  description = "Count tasks with psql (a read)",
  timeout = "10s",
  run = function(ctx)
    local r = exec.read { "psql", ctx.params.database_url, "-XAtc", "select count(*) from tasks" }
    local n = tonumber(r.stdout)
    log.info("%d tasks", n)
    return { tasks = n }
  end,
}

step "Publish a test event" {
  description = "POST a CloudEvent through the sidecar to Kafka (skipped in a dry run)",
  run = function(ctx)
    local r = http.post(ctx.params.dapr .. "/v1.0/publish/kafka-pubsub/task-events",
      { json = { type = "health-check", at = os.date("!%Y-%m-%dT%H:%M:%SZ") } })
    if not r.skipped and r.status ~= 204 then error("publish answered " .. r.status) end
    return { published = not r.skipped }
  end,
}
