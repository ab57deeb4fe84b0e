-- db-maintenance.lua: purge old checkpoints, VACUUM ANALYZE, and show what it freed.
--
-- Replaces seed 004 "Database Maintenance" (VACUUM ANALYZE, pg_database_size,
-- DELETE FROM checkpoints WHERE created_at < NOW() - INTERVAL '30 days'). The
-- delete is counted first (a dry run says how many rows it would delete), asks,
-- and runs in batches so no statement holds its locks for long.
--
--   runbook run db-maintenance --dry-run
--   runbook run db-maintenance -p older_than=90d --yes

name = "db-maintenance"
description = "Sizes and dead rows, purge checkpoints older than N days (counted first, in batches), VACUUM ANALYZE, sizes again"
replaces = { "004-15" }
version = "1.0.0"

param "older_than" { type = "duration", default = "30d", help = "checkpoints created longer ago than this are deleted (seed: 30 days)" }
param "table" { default = "checkpoints", help = "the table to purge" }
param "time_column" { default = "created_at", help = "its timestamp column" }
param "batch_size" { type = "integer", default = 5000, help = "rows deleted per statement" }
param "purge" { type = "boolean", default = true, help = "delete old rows (false: only vacuum and report)" }

local SIZES = [[
  SELECT c.relname AS table, pg_total_relation_size(c.oid) AS bytes,
         pg_size_pretty(pg_total_relation_size(c.oid)) AS pretty,
         coalesce(s.n_live_tup, 0) AS live, coalesce(s.n_dead_tup, 0) AS dead,
         coalesce(greatest(s.last_vacuum, s.last_autovacuum)::text, 'never') AS vacuumed
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
  LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid
  WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  ORDER BY pg_total_relation_size(c.oid) DESC]]

local function sizes(db)
  local total, pretty = db:database_size()
  local tables = db:query(SIZES)
  log.info("database: %s", pretty)
  for _, t in ipairs(tables) do
    log.info("  %-20s %10s  %8d live  %8d dead  vacuumed %s", t.table, t.pretty, t.live, t.dead, t.vacuumed)
  end
  return { bytes = total, pretty = pretty }
end

-- The purge's WHERE clause; the table and column are quoted identifiers.
local function old_rows(ctx)
  return ("%s WHERE %s < now() - make_interval(secs => $1)"):format(pg.quote_ident(ctx.params.table),
    pg.quote_ident(ctx.params.time_column))
end

step "Measure" {
  description = "pg_database_size, and each table's total size, live and dead rows and last vacuum",
  run = function(ctx)
    local db <close> = pg.connect()
    return sizes(db)
  end,
}

step "Count old rows" {
  description = "SELECT count(*): how many rows are older than older_than, and the oldest",
  when = function(ctx) return ctx.params.purge end,
  run = function(ctx)
    local db <close> = pg.connect()
    local r = db:one(("SELECT count(*) AS n, min(%s)::text AS oldest FROM %s"):format(
      pg.quote_ident(ctx.params.time_column), old_rows(ctx)), ctx.params.older_than)
    log.info("%d rows of %s are older than %s%s", r.n, ctx.params.table, duration.format(ctx.params.older_than),
      r.n > 0 and (" (the oldest from %s)"):format(r.oldest) or "")
    return { rows = r.n }
  end,
}

step "Purge old rows" {
  description = "DELETE the counted rows, batch_size at a time, each batch its own statement",
  needs = { "Count old rows" },
  confirm = true,
  when = function(ctx) return ctx.params.purge and ctx.outputs["Count old rows"].rows > 0 end,
  run = function(ctx)
    local db <close> = pg.connect()
    local batch = ("DELETE FROM %s WHERE ctid IN (SELECT ctid FROM %s LIMIT %d)"):format(
      pg.quote_ident(ctx.params.table), old_rows(ctx), ctx.params.batch_size)
    local deleted = 0
    repeat
      local n, how = db:exec(batch, ctx.params.older_than)
      if how ~= "performed" then
        -- A simulated batch leaves the rows in place, so the next would find the same ones: plan from the count.
        local rows = ctx.outputs["Count old rows"].rows
        local batches = math.ceil(rows / ctx.params.batch_size)
        log.info("would delete %d rows from %s in %d batch%s of %d", rows, ctx.params.table, batches,
          batches == 1 and "" or "es", ctx.params.batch_size)
        return { deleted = 0, would_delete = rows, batches = batches }
      end
      deleted = deleted + n
    until n < ctx.params.batch_size
    log.info("deleted %d rows from %s", deleted, ctx.params.table)
    return { deleted = deleted }
  end,
}

step "VACUUM ANALYZE" {
  description = "VACUUM (ANALYZE) the whole database: dead rows reclaimed for reuse, planner statistics refreshed",
  run = function(ctx)
    local db <close> = pg.connect()
    db:vacuum_analyze()
  end,
}

step "Measure again" {
  description = "The sizes and dead rows after, and what the maintenance changed",
  needs = { "Measure" },
  run = function(ctx)
    local db <close> = pg.connect()
    local after = sizes(db)
    local before = ctx.outputs["Measure"]
    log.info("database %s -> %s (VACUUM makes space reusable; the file shrinks only with VACUUM FULL)", before.pretty, after.pretty)
    return after
  end,
}
