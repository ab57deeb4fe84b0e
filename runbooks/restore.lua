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
version = "1.0.0"
on_failure = "undo"

param "dir" { default = "./backups", help = "directory holding the backup sets (for the newest one, and the safety backup)" }
param "prefix" { default = "todo", help = "name of the sets in dir" }
param "set" { default = "", help = "the backup set directory to restore (default: the newest PREFIX set in dir)" }
param "database_url" { secret = true, default = os.getenv("DATABASE_URL"), help = "the database to restore into (default $DATABASE_URL)" }
param "namespace" { default = "todo-chatbot", help = "Kubernetes namespace of the writers" }
param "writers" { default = "todo-chatbot-backend,todo-chatbot-recurring-task",
  help = "comma-separated deployments that write to the database: scaled to 0 during the restore" }
param "safety_backup" { type = "boolean", default = true, help = "back up the current database before replacing it (into dir, as PREFIX-pre-restore-...)" }
param "validate" { default = "SELECT count(*) FROM tasks WHERE user_id IS NULL",
  help = "validation queries separated by ';', each must return 0 after the restore" }
param "timeout" { type = "duration", default = "2m", help = "how long the writers may take to stop, and to come back" }

local function writers(ctx)
  local list = {}
  for d in ctx.params.writers:gmatch("[^,%s]+") do list[#list + 1] = "deploy/" .. d end
  return list
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
    if #writers(ctx) == 0 then error("param writers: name at least one deployment", 0) end
    return { path = path, tables = n, rows = rows, created_at = m.created_at }
  end,
}

step "Stop writes" {
  description = "Scale the writer deployments to 0 and wait until their pods are gone (replicas remembered)",
  needs = { "Verify the backup set" },
  confirm = true,
  run = function(ctx)
    local saved = k8s.stop_workloads(writers(ctx), { namespace = ctx.params.namespace, timeout = ctx.params.timeout })
    for _, s in ipairs(saved) do log.info("%s stopped (was %d replicas)", s.target, s.replicas) end
    return { saved = saved }
  end,
  undo = function(ctx, out) k8s.start_workloads(out.saved, { timeout = ctx.params.timeout }) end,
}

step "Safety backup" {
  description = "Back up the current database as it is now, so the restore can itself be undone by hand",
  when = function(ctx) return ctx.params.safety_backup end,
  run = function(ctx)
    local set = backupset.new(ctx.params.dir, ctx.params.prefix .. "-pre-restore")
    local m = backupset.seal(set, { database = backupset.dump_database(set, { url = ctx.params.database_url }) })
    log.info("the current database is in %s", set.final)
    return { path = set.final, files = #m.files }
  end,
}

step "Restore the database" {
  description = "pg_restore --clean --single-transaction from the set; the restored row counts must equal the dump's",
  needs = { "Verify the backup set" },
  confirm = true,
  run = function(ctx)
    local path = ctx.outputs["Verify the backup set"].path
    local r = backupset.restore_database(path, { url = ctx.params.database_url })
    if not r.skipped then log.info("restored %s", path) end
    return { path = path }
  end,
}

step "Validate" {
  description = "Row counts of every table against the manifest, and each validation query returns 0",
  needs = { "Verify the backup set", "Restore the database" }, uses = { "Safety backup" },
  run = function(ctx)
    local path = ctx.outputs["Verify the backup set"].path
    local m = backupset.verify(path)
    local problems = backupset.validate { manifest = m, url = ctx.params.database_url,
      queries = backupset.queries(ctx.params.validate) }
    if ctx.dry_run then
      log.info("now, before the restore: %s", #problems == 0 and "the database matches the set"
        or table.concat(problems, "; "))
      return { problems = problems }
    end
    if #problems > 0 then
      local safety = not ctx.skipped("Safety backup") and ctx.outputs["Safety backup"].path
      error("the restored database is not valid: " .. table.concat(problems, "; ")
        .. (safety and ("; the database before the restore is in " .. safety) or ""), 0)
    end
    log.info("the database matches %s", path)
    return { problems = problems }
  end,
}

step "Start writes" {
  description = "Scale the writers back to their replicas and wait for their rollouts",
  needs = { "Stop writes" }, -- skipped with it when the operator kept them running
  run = function(ctx)
    local saved = ctx.outputs["Stop writes"].saved
    k8s.start_workloads(saved, { timeout = ctx.params.timeout })
    for _, s in ipairs(saved) do log.info("%s back at %d replicas", s.target, s.replicas) end
  end,
}
