-- restore.lua: put the database back from a backup set that backup.lua wrote.
--
-- Replaces seed 002's `psql $DATABASE_URL < backup-20251230_000000.sql`: the set's
-- checksums are verified before anything is touched, writes are stopped by
-- scaling the writers to 0 (their replicas remembered), the current database is
-- kept in a safety backup, the restore runs in one transaction, and the result is
-- checked (row counts against the manifest, and validation queries) before the
-- writers come back. A failure brings the writers back (on_failure = "undo").
--
--   runbook run restore -p dir=/var/backups/todo                  # the newest set
--   runbook run restore -p set=/var/backups/todo/todo-20261122T030000Z --step

name = "restore"
description = "Verify a backup set, stop the writers, keep a safety backup, restore the database, validate it, start the writers"
replaces = {}
version = "1.0.0"
on_failure = "undo"

param "dir" { default = "./backups", help = "directory holding the backup sets (for the newest one, and the safety backup)" }
param "prefix" (steps.params.prefix)
param "set" { default = "", help = "the backup set directory to restore (default: the newest PREFIX set in dir)" }
param "database_url" (steps.params.database_url)
param "namespace" (steps.params.namespace)
param "writers" (steps.params.writers)
param "safety_backup" { type = "boolean", default = true, help = "back up the current database before replacing it (into dir, as PREFIX-pre-restore-...)" }
param "validate" { default = "SELECT count(*) FROM tasks WHERE user_id IS NULL",
  help = "validation queries separated by ';', each must return 0 after the restore" }
param "timeout" (steps.params.writers_timeout)

step "Verify the backup set" {
  description = "Every file's sha256 and size against manifest.json, and pg_restore --list on the dump, before anything is touched",
  run = function(ctx)
    local path = backupset.find(ctx.params.dir, ctx.params.prefix, { set = ctx.params.set })
    local m = backupset.verify(path)
    if not m.database then error(path .. " holds no database dump", 0) end
    local n, rows = 0, 0
    for _, c in pairs(m.database.tables) do n, rows = n + 1, rows + c end
    log.info("%s: %d files verified; database %s, %d tables, %d rows, taken %s", path, #m.files,
      tostring(m.database.name), n, rows, m.created_at)
    steps.writers(ctx)
    return { path = path, tables = n, rows = rows, created_at = m.created_at }
  end,
}

step "Stop writes" (steps.stop_writers { needs = { "Verify the backup set" } })

step "Safety backup" (steps.backup_database {
  description = "Back up the current database as it is now, so the restore can itself be undone by hand",
  when = function(ctx) return ctx.params.safety_backup end,
  suffix = "-pre-restore",
})

step "Restore the database" (steps.restore_database {
  needs = { "Verify the backup set" },
  set = function(ctx) return ctx.outputs["Verify the backup set"].path end,
})

step "Validate" (steps.validate {
  description = "Row counts of every table against the manifest, and each validation query returns 0",
  needs = { "Verify the backup set", "Restore the database" }, uses = { "Safety backup" },
  set = function(ctx) return ctx.outputs["Verify the backup set"].path end, queries = "validate", kept = "Safety backup",
})

step "Start writes" (steps.start_writers { stopped = "Stop writes" })
