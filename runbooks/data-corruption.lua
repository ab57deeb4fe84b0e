-- data-corruption.lua: stop writes, keep the corrupted state, restore a good
-- backup, validate, resume.
--
-- Replaces seed 002 "Data Corruption" (scale backend to 0, pg_dump, psql <
-- backup, check `tasks WHERE user_id IS NULL`, scale back) and seed 004's data
-- recovery: it shows the corruption with the same checks it validates with
-- afterwards, picks the good backup set (a path, or the newest taken before
-- the corruption began) and verifies it before stopping anything, keeps the
-- corrupted database as evidence, and brings the writers back on any failure.
-- The sets are backup.lua's (the backupset library).
--
-- For seed 001 "Data Loss Prevention" too: the audit log's sequence
-- (`sequence`, TABLE.COLUMN) is checked for gaps before and after, each gap
-- named; and when the set recorded consumer groups' offsets (backup -p
-- groups=GROUP:TOPIC), each group is set back to them before the writers
-- resume, so its consumers replay from Kafka the events since the backup.
--
--   runbook run data-corruption -p dir=/var/backups/todo -p before=2026-11-22T10:00:00Z --step

name = "data-corruption"
description = "Show the corruption (checks, audit log gaps), stop the writers, back up the corrupted state, restore a good backup set, validate, replay the events since from Kafka, resume writes"
replaces = { "002-25", "004-18", "001-18" }
version = "1.0.0"
on_failure = "undo"

param "checks" { default = "SELECT count(*) FROM tasks WHERE user_id IS NULL",
  help = "integrity checks separated by ';': each counts bad rows, 0 when healthy (before: what is corrupt; after: must be 0)" }
param "dir" { default = "./backups", help = "directory holding the backup sets (the corrupted state is backed up there too)" }
param "prefix" (steps.params.prefix)
param "set" { default = "", help = "the good backup set to restore (a directory; default: the newest, or the newest before `before`)" }
param "sequence" { default = "audit_log.sequence_number",
  help = "TABLE.COLUMN of a gapless sequence (an audit log) checked for gaps before and after the restore; empty: none" }
param "before" { default = "", help = "restore the newest set taken before this time (e.g. when the corruption began: 2026-11-22T10:00:00Z)" }
param "force" { type = "boolean", default = false, help = "restore even when no check finds corruption" }
param "database_url" (steps.params.database_url)
param "namespace" (steps.params.namespace)
param "writers" (steps.params.writers)
param "timeout" (steps.params.writers_timeout)

-- The gap check of param sequence: a query counting the gaps, or nil.
local function gap_query(ctx)
  if ctx.params.sequence == "" then return nil end
  local t, c = ctx.params.sequence:match("^([%w_.]+)%.([%w_]+)$")
  if not t then error(("param sequence: %q is not TABLE.COLUMN"):format(ctx.params.sequence), 0) end
  local tq = t:gsub("[^.]+", pg.quote_ident)
  return ("SELECT count(*) FROM (SELECT %s - lag(%s) OVER (ORDER BY %s) AS step FROM %s) s WHERE step > 1")
    :format(pg.quote_ident(c), pg.quote_ident(c), pg.quote_ident(c), tq), t, c
end

-- Param checks, and the gap check.
local function all_checks(ctx)
  local checks = backupset.queries(ctx.params.checks)
  checks[#checks + 1] = gap_query(ctx)
  return checks
end

-- The first gaps of the sequence: "from-to" ranges of the missing numbers.
local function gaps(db, ctx)
  local _, t, c = gap_query(ctx)
  local tq, cq = t:gsub("[^.]+", pg.quote_ident), pg.quote_ident(c)
  local out = {}
  for _, r in ipairs(db:query(("SELECT prev + 1 AS first, cur - 1 AS last FROM (SELECT lag(%s) OVER (ORDER BY %s) AS prev,"
      .. " %s AS cur FROM %s) s WHERE cur - prev > 1 ORDER BY cur LIMIT 10"):format(cq, cq, cq, tq))) do
    out[#out + 1] = r.first == r.last and tostring(r.first) or (r.first .. "-" .. r.last)
  end
  return out
end

step "Assess the corruption" {
  description = "Run each integrity check on the live database, and choose and verify the good backup set",
  run = function(ctx)
    local checks = all_checks(ctx)
    if #checks == 0 then error("param checks: give at least one query (or a sequence)", 0) end
    local db <close> = pg.connect(ctx.params.database_url, { connect_timeout = "10s" })
    local bad = {}
    for _, sql in ipairs(checks) do
      local n = db:value(sql)
      if n ~= nil and n ~= 0 and n ~= "0" and n ~= false then
        bad[#bad + 1] = ("%s: %s"):format(sql, tostring(n))
        log.warn("%s -> %s", sql, tostring(n))
      else
        log.info("%s -> 0", sql)
      end
    end
    if gap_query(ctx) then
      local missing = gaps(db, ctx)
      if #missing > 0 then log.warn("%s is missing %s%s", ctx.params.sequence, table.concat(missing, ", "),
        #missing == 10 and ", ..." or "") end
    end
    steps.writers(ctx)
    local path = backupset.find(ctx.params.dir, ctx.params.prefix, { set = ctx.params.set, before = ctx.params.before })
    local m = backupset.verify(path)
    if not m.database then error(path .. " holds no database dump", 0) end
    log.info("good backup: %s (taken %s), %d files verified", path, m.created_at, #m.files)
    if #bad == 0 and not ctx.params.force then
      error("no check finds corruption: nothing to restore (force=true restores anyway)", 0)
    end
    return { corrupt = bad, set = path, set_created_at = m.created_at }
  end,
}

step "Stop writes" (steps.stop_writers {
  description = "Scale the writer deployments to 0 and wait until their pods are gone, so nothing corrupts further (replicas remembered)",
  needs = { "Assess the corruption" },
})

step "Back up the corrupted state" (steps.backup_database {
  description = "Keep the database as it is now (evidence, and a way back), as PREFIX-corrupted-STAMP in dir",
  needs = { "Assess the corruption" },
  suffix = "-corrupted",
})

step "Restore the good backup" (steps.restore_database {
  needs = { "Assess the corruption", "Back up the corrupted state" },
  set = function(ctx) return ctx.outputs["Assess the corruption"].set end,
})

step "Validate" (steps.validate {
  description = "Row counts against the good set's manifest, and every integrity check returns 0",
  needs = { "Assess the corruption", "Back up the corrupted state", "Restore the good backup" },
  set = function(ctx) return ctx.outputs["Assess the corruption"].set end, queries = all_checks,
  kept = "Back up the corrupted state",
})

step "Replay the events since the backup" (steps.replay_events {
  needs = { "Assess the corruption", "Stop writes", "Restore the good backup" },
  set = function(ctx) return ctx.outputs["Assess the corruption"].set end,
})

step "Resume writes" (steps.start_writers { stopped = "Stop writes" })
