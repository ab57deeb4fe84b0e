-- db-pool-exhausted.lua: find what holds PostgreSQL's connections and free them.
--
-- Replaces seed 002 "Database Connection Pool Exhausted" (count
-- pg_stat_activity, kubectl set env DB_POOL_SIZE=30 DB_MAX_OVERFLOW=20,
-- rollout restart, the long-running queries of pg_stat_activity) and seed
-- 004's connection-limit checks. It names the holders first (by application,
-- user and state) and the longest-running statements, ends the sessions stuck
-- "idle in transaction" (the usual leak: they hold a pool slot and their locks
-- until the server's limit), cancels the queries active for longer than
-- running_for (terminating the session of one that ignores the cancel),
-- optionally raises the app's pool, and checks the connections came down.
--
--   runbook run db-pool-exhausted --step
--   runbook run db-pool-exhausted -p idle_for=1m -p pool_size=30 -p max_overflow=20

name = "db-pool-exhausted"
description = "Connections by application and state against max_connections; end sessions idle in transaction, cancel long-running queries; optionally raise the app's pool; verify"
replaces = { "002-23" }
version = "1.0.0"

param "idle_for" { type = "duration", default = "5m", help = "sessions idle in a transaction longer than this are ended" }
param "running_for" { type = "duration", default = "5m", help = "queries active for longer than this are cancelled (pg_cancel_backend)" }
param "user" { default = "", help = "only end sessions and cancel queries of this database user (default: any but superusers)" }
param "warn_share" { type = "number", default = 0.8, help = "connections at this share of max_connections are too many (seed 003: 80% of pool)" }
param "deployment" { default = "todo-chatbot-backend", help = "the app whose pool is raised when pool_size is set" }
param "namespace" (steps.params.namespace)
param "pool_size" { type = "integer", default = 0, help = "set DB_POOL_SIZE on the deployment (seed: 30); 0 leaves the pool alone" }
param "max_overflow" { type = "integer", default = 0, help = "set DB_MAX_OVERFLOW with it (seed: 20)" }

-- Sessions of other users than superusers in this database, in `state`s,
-- for at least $1 seconds since `since` (a pg_stat_activity column); $2 a user or ''.
local function sessions(states, since)
  return ([[
  SELECT a.pid, a.usename AS user, a.application_name AS app, coalesce(a.client_addr::text, 'local') AS client,
         extract(epoch FROM now() - a.%s)::float8 AS seconds, left(a.query, 200) AS query
  FROM pg_stat_activity a JOIN pg_roles r ON r.rolname = a.usename
  WHERE a.datname = current_database() AND a.state IN (%s)
    AND a.pid <> pg_backend_pid() AND NOT r.rolsuper
    AND now() - a.%s >= make_interval(secs => $1) AND ($2 = '' OR a.usename = $2)
  ORDER BY a.%s]]):format(since, states, since, since)
end
local STUCK = sessions("'idle in transaction', 'idle in transaction (aborted)'", "state_change")
local LONG = sessions("'active'", "query_start")

local BY_APP = [[
  SELECT coalesce(nullif(application_name, ''), '(none)') AS app, usename AS user, coalesce(state, 'background') AS state,
         count(*) AS n
  FROM pg_stat_activity WHERE datname = current_database()
  GROUP BY 1, 2, 3 ORDER BY 4 DESC, 1]]

local function measure(db, ctx)
  local a = db:activity()
  local share = a.total / a.max_connections
  log.info("%d of %d connections in use (%.0f%%)", a.total, a.max_connections, share * 100)
  for _, r in ipairs(db:query(BY_APP)) do log.info("  %4d  %-24s %-12s %s", r.n, r.app, r.user, r.state) end
  local stuck = db:query(STUCK, ctx.params.idle_for, ctx.params.user)
  local long = db:query(LONG, ctx.params.running_for, ctx.params.user)
  stuck.columns, long.columns = nil, nil
  return { total = a.total, max = a.max_connections, share = share, stuck = stuck, long = long, longest = a.long_running }
end

step "Measure the connections" {
  description = "SELECT count(*) FROM pg_stat_activity, by application, user and state; the 10 longest-running statements; "
    .. "sessions idle in a transaction for longer than idle_for, queries active for longer than running_for",
  run = function(ctx)
    local db <close> = pg.connect()
    local m = measure(db, ctx)
    if #m.longest > 0 then log.info("the longest-running statements (not idle):") end
    for _, q in ipairs(m.longest) do
      log.info("  pid %d  %s  %-28s %s: %s", q.pid, duration.format(q.seconds), q.state, q.application_name or "", q.query)
    end
    for _, s in ipairs(m.stuck) do
      log.warn("pid %d (%s, %s from %s) idle in a transaction for %s: %s", s.pid, s.app, s.user, s.client,
        duration.format(s.seconds), s.query)
    end
    for _, q in ipairs(m.long) do
      log.warn("pid %d (%s, %s from %s) running a query for %s: %s", q.pid, q.app, q.user, q.client,
        duration.format(q.seconds), q.query)
    end
    if m.share >= ctx.params.warn_share then
      log.warn("%d of %d connections: the pool is exhausted or close to it", m.total, m.max)
    end
    return { total = m.total, max = m.max, stuck = #m.stuck, long = #m.long }
  end,
}

step "End stuck sessions" {
  description = "pg_terminate_backend for each session idle in a transaction longer than idle_for (its transaction rolls back)",
  needs = { "Measure the connections" },
  confirm = true,
  when = function(ctx) return ctx.outputs["Measure the connections"].stuck > 0 end,
  run = function(ctx)
    local db <close> = pg.connect()
    local ended = 0
    for _, s in ipairs(db:query(STUCK, ctx.params.idle_for, ctx.params.user)) do
      if db:terminate(s.pid) then ended = ended + 1 end
    end
    if not ctx.dry_run then log.info("ended %d sessions", ended) end
    return { ended = ended }
  end,
}

step "Cancel long-running queries" {
  description = "pg_cancel_backend for each query active for longer than running_for; pg_terminate_backend for one still running 5s later",
  needs = { "Measure the connections" },
  confirm = true,
  when = function(ctx) return ctx.outputs["Measure the connections"].long > 0 end,
  run = function(ctx)
    local db <close> = pg.connect()
    local cancelled, pids = 0, {}
    for _, q in ipairs(db:query(LONG, ctx.params.running_for, ctx.params.user)) do
      if db:cancel(q.pid) then cancelled, pids[q.pid] = cancelled + 1, true end
    end
    if ctx.dry_run then return { cancelled = 0, terminated = 0 } end
    -- A query inside a function that never checks for interrupts ignores the cancel: end its session.
    local still, deadline = {}, time.monotonic() + 5
    repeat
      if #still > 0 then time.sleep(0.5) end
      still = {}
      for _, q in ipairs(db:query(LONG, ctx.params.running_for, ctx.params.user)) do
        if pids[q.pid] then still[#still + 1] = q.pid end
      end
    until #still == 0 or time.monotonic() >= deadline
    local terminated = 0
    for _, pid in ipairs(still) do if db:terminate(pid) then terminated = terminated + 1 end end
    log.info("cancelled %d %s%s", cancelled, cancelled == 1 and "query" or "queries", terminated > 0 and (", ended the sessions of %d that kept running"):format(terminated) or "")
    return { cancelled = cancelled, terminated = terminated }
  end,
}

step "Raise the pool" {
  description = "kubectl set env DB_POOL_SIZE / DB_MAX_OVERFLOW on the deployment (a rolling restart), and wait for it",
  needs = { "Measure the connections" },
  confirm = true,
  when = function(ctx) return ctx.params.pool_size > 0 end,
  run = function(ctx)
    local m = ctx.outputs["Measure the connections"]
    local want = ctx.params.pool_size + ctx.params.max_overflow
    local d = k8s.get("deploy/" .. ctx.params.deployment, { namespace = ctx.params.namespace })
    local replicas = d.spec.replicas or 1
    if want * replicas > m.max then
      log.warn("%d replicas x (pool %d + overflow %d) = %d connections, more than max_connections %d: the pool can "
        .. "exhaust the server", replicas, ctx.params.pool_size, ctx.params.max_overflow, want * replicas, m.max)
    end
    local env = { DB_POOL_SIZE = tostring(ctx.params.pool_size) }
    if ctx.params.max_overflow > 0 then env.DB_MAX_OVERFLOW = tostring(ctx.params.max_overflow) end
    k8s.set_env("deploy/" .. ctx.params.deployment, env, { namespace = ctx.params.namespace })
    k8s.rollout_status("deploy/" .. ctx.params.deployment, { namespace = ctx.params.namespace, timeout = "5m", fail_fast = true })
  end,
}

step "Verify" {
  description = "No session idle in a transaction past idle_for, no query active past running_for, and the connections below warn_share of max_connections",
  needs = { "Measure the connections" },
  retry = { attempts = 5, base = "1s", max = "3s" },
  run = function(ctx)
    local db <close> = pg.connect()
    local m = measure(db, ctx)
    if ctx.dry_run then return end
    local problems = {}
    if #m.stuck > 0 then problems[#problems + 1] = ("%d sessions still idle in a transaction"):format(#m.stuck) end
    if #m.long > 0 then problems[#problems + 1] = ("%d queries still running past %s"):format(#m.long, duration.format(ctx.params.running_for)) end
    if m.share >= ctx.params.warn_share then
      problems[#problems + 1] = ("%d of %d connections still in use"):format(m.total, m.max)
    end
    if #problems > 0 then error(table.concat(problems, "; "), 0) end
    log.info("%d of %d connections, none stuck: the pool has room (was %d)", m.total, m.max,
      ctx.outputs["Measure the connections"].total)
    return { total = m.total }
  end,
}
