-- restore.lua: put the database back from a backup set that backup.lua wrote,
-- and, when asked, the set's Kubernetes objects and Kafka topics.
--
-- Replaces seed 002's `psql $DATABASE_URL < backup-20251230_000000.sql`: the set's
-- checksums are verified before anything is touched, writes are stopped by
-- scaling the writers to 0 (their replicas remembered), the current database is
-- kept in a safety backup, the restore runs in one transaction, and the result is
-- checked (row counts against the manifest, and validation queries) before the
-- writers come back. A failure brings the writers back (on_failure = "undo").
-- With kubernetes=true the set's objects are applied first, in dependency
-- order (the namespace created when missing); with topics, the set's topics
-- are produced back into topics that hold no message (backupset). For a
-- whole namespace after a cluster failure, disaster-recovery does all of it
-- with an assessment, the writers held from the start, and a report.
--
--   runbook run restore -p dir=/var/backups/todo                  # the newest set
--   runbook run restore -p set=/var/backups/todo/todo-20261122T030000Z --step
--   runbook run restore -p kubernetes=true -p topics=all        # objects, database, topics

name = "restore"
description = "Verify a backup set, (its Kubernetes objects back), stop the writers, keep a safety backup, restore the database (and topics), validate, start the writers"
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
param "kubernetes" { type = "boolean", default = false,
  help = "first put the set's Kubernetes objects back (server-side apply in dependency order; the namespace created when missing)" }
param "passphrase" { secret = true, default = os.getenv("BACKUP_PASSPHRASE"), help = "for a set whose Kubernetes files are encrypted (default $BACKUP_PASSPHRASE)" }
param "topics" { type = "list", default = "", help = "the set's topics to produce back into topics that hold no message: all, or NAME or NAME=TARGET, comma-separated (default: none)" }

local VERIFY = "Verify the backup set"

-- Param topics as backupset.restore_topics takes it: nil for all.
local function topics(ctx)
  local list = ctx.params.topics
  if list[1] ~= "all" then return list end
end

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
    if ctx.params.kubernetes and #backupset.kubernetes_files(m) == 0 then
      error(path .. " holds no Kubernetes objects (take sets with backup -p kubernetes=true)", 0)
    end
    if #ctx.params.topics > 0 and not (m.kafka and next(m.kafka.topics or {})) then
      error(path .. " holds no topics (take sets with backup -p topics=...)", 0)
    end
    steps.writers(ctx)
    return { path = path, tables = n, rows = rows, created_at = m.created_at }
  end,
}

step "Restore the Kubernetes objects" {
  description = "The set's objects in dependency order (accounts, Secrets, ConfigMaps, Dapr components, Services, workloads, HPAs, ingresses), the namespace created when missing",
  needs = { VERIFY },
  when = function(ctx) return ctx.params.kubernetes end,
  confirm = true,
  run = function(ctx, verified)
    local path = verified.path
    local r = backupset.restore_kubernetes(path, backupset.manifest(path),
      { namespace = ctx.params.namespace, passphrase = ctx.params.passphrase })
    for _, file in ipairs(backupset.RESTORE_ORDER) do
      if r.applied[file] then log.info("%s: %d applied", file, r.applied[file]) end
    end
    return { namespace = r.namespace, created = r.created, applied = r.applied }
  end,
}

step "Stop writes" (steps.stop_writers { needs = { VERIFY } })

step "Safety backup" (steps.backup_database {
  description = "Back up the current database as it is now, so the restore can itself be undone by hand",
  when = function(ctx) return ctx.params.safety_backup end,
  suffix = "-pre-restore",
})

step "Restore the database" (steps.restore_database {
  needs = { "Verify the backup set" },
  set = function(ctx) return ctx.outputs["Verify the backup set"].path end,
})

step "Restore the topics" {
  description = "The set's topics produced back (keys, headers, timestamps, partitions) into topics that hold no message; a topic with messages is kept as it is",
  needs = { VERIFY },
  when = function(ctx) return #ctx.params.topics > 0 end,
  confirm = true,
  run = function(ctx, verified)
    local path = verified.path
    return backupset.restore_topics(path, backupset.manifest(path), { topics = topics(ctx) })
  end,
}

step "Validate" (steps.validate {
  description = "Row counts of every table against the manifest, and each validation query returns 0",
  needs = { "Verify the backup set", "Restore the database" }, uses = { "Safety backup" },
  set = function(ctx) return ctx.outputs["Verify the backup set"].path end, queries = "validate", kept = "Safety backup",
})

step "Start writes" (steps.start_writers { stopped = "Stop writes" })
