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
--   runbook run data-corruption -p dir=/var/backups/todo -p before=2026-11-22T10:00:00Z --step

name = "data-corruption"
description = "Show the corruption, stop the writers, back up the corrupted state, restore a good backup set, validate, resume writes"
replaces = { "002-25", "004-18" }
version = "1.0.0"
on_failure = "undo"

param "checks" { default = "SELECT count(*) FROM tasks WHERE user_id IS NULL",
  help = "integrity checks separated by ';': each counts bad rows, 0 when healthy (before: what is corrupt; after: must be 0)" }
param "dir" { default = "./backups", help = "directory holding the backup sets (the corrupted state is backed up there too)" }
param "prefix" (steps.params.prefix)
param "set" { default = "", help = "the good backup set to restore (a directory; default: the newest, or the newest before `before`)" }
param "before" { default = "", help = "restore the newest set taken before this time (e.g. when the corruption began: 2026-11-22T10:00:00Z)" }
param "force" { type = "boolean", default = false, help = "restore even when no check finds corruption" }
param "database_url" (steps.params.database_url)
param "namespace" (steps.params.namespace)
param "writers" (steps.params.writers)
param "timeout" (steps.params.writers_timeout)

step "Assess the corruption" {
  description = "Run each integrity check on the live database, and choose and verify the good backup set",
  run = function(ctx)
    local checks = backupset.queries(ctx.params.checks)
    if #checks == 0 then error("param checks: give at least one query", 0) end
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
  set = function(ctx) return ctx.outputs["Assess the corruption"].set end, queries = "checks",
  kept = "Back up the corrupted state",
})

step "Resume writes" (steps.start_writers { stopped = "Stop writes" })
