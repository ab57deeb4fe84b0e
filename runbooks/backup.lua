-- backup.lua: a verified, self-describing backup set of the database, and
-- optionally the namespace's Kubernetes configuration and chosen Kafka topics.
--
-- Replaces seed 002's `pg_dump > backup.sql` and seed 003's backup steps: the
-- dump is checked (pg_restore can read it, row counts taken in its own
-- snapshot), every file gets a sha256 in one manifest, the set appears under
-- its timestamped name only once complete, and old sets are deleted only
-- through the effect gate.
--
--   runbook run backup -p dir=/var/backups/todo -p keep=7 -p kubernetes=true
--   runbook run backup --dry-run            # the checks, and what it would write and delete
--   BACKUP_PASSPHRASE=... runbook run backup -p kubernetes=true -p secrets=true -p encrypt=true
--       # the configuration encrypted: openssl enc -d -aes-256-cbc -pbkdf2 -iter 100000 -md sha256 decrypts it

name = "backup"
description = "Back up PostgreSQL (and optionally the namespace's Kubernetes configuration and Kafka topics) into a verified set with one manifest; keep the newest N"
replaces = { "001-13", "004-13" }
version = "1.0.0"

param "dir" { default = "./backups", help = "directory the backup sets go in (each set is DIR/PREFIX-YYYYMMDDTHHMMSSZ/)" }
param "prefix" (steps.params.prefix)
param "database_url" (steps.params.database_url)
param "keep" { type = "integer", default = 7, help = "how many sets to keep: older ones are deleted after a successful backup" }
param "kubernetes" { type = "boolean", default = false,
  help = "also back up the namespace's workloads, services, configmaps, service accounts, network policies, HPAs, ingresses and Dapr components as YAML" }
param "secrets" { type = "boolean", default = false, help = "with kubernetes=true, include the namespace's Secrets (the files then hold them)" }
param "namespace" { default = "todo-chatbot", help = "Kubernetes namespace whose configuration is backed up" }
param "encrypt" { type = "boolean", default = false,
  help = "encrypt the Kubernetes files (k8s/KIND.yaml.enc: AES-256-CBC, PBKDF2, openssl enc's format) with passphrase" }
param "passphrase" { secret = true, default = os.getenv("BACKUP_PASSPHRASE"), help = "with encrypt=true (default $BACKUP_PASSPHRASE)" }
param "topics" { type = "list", default = "", help = "Kafka topics to back up as JSON Lines (default: none)" }
param "groups" { type = "list", default = "",
  help = "GROUP:TOPIC,... consumer groups whose committed offsets are recorded before the dump, so a restore can replay the events after it" }
param "min_free" { type = "number", default = 1.5, help = "free space needed at DIR, as a multiple of the database's size" }

step "Preflight" {
  description = "The database answers; its size against the free space at the destination; the sets already there",
  run = function(ctx)
    local p = ctx.params
    if p.keep < 1 then error("param keep: must be at least 1", 0) end
    if p.secrets and not p.kubernetes then error("param secrets: needs kubernetes=true", 0) end
    if p.encrypt and not p.kubernetes then error("param encrypt: needs kubernetes=true (it encrypts the Kubernetes files)", 0) end
    if p.encrypt and (p.passphrase or "") == "" then error("param encrypt: give a passphrase (or set BACKUP_PASSPHRASE)", 0) end
    local pf = backupset.preflight { root = p.dir, url = p.database_url }
    log.info("database: %s (PostgreSQL %s); free at %s: %s", pf.db_pretty, pf.server_version, p.dir, pf.free_pretty)
    if pf.free_bytes < pf.db_bytes * p.min_free then
      error(("not enough space at %s: %s free, the database is %s (need %.1fx)"):format(
        p.dir, pf.free_pretty, pf.db_pretty, p.min_free), 0)
    end
    local sets = backupset.list(p.dir, p.prefix)
    log.info("%d existing %s sets in %s%s", #sets, p.prefix, p.dir, sets[1] and (", newest " .. sets[1].name) or "")
    return { db_bytes = pf.db_bytes, free_bytes = pf.free_bytes, existing = #sets }
  end,
}

step "Dump the database" {
  description = "The groups' committed offsets (when asked), then pg_dump --format=custom into a partial set directory and pg_restore --list to prove it reads back",
  run = function(ctx)
    local set = backupset.new(ctx.params.dir, ctx.params.prefix)
    -- the offsets first: what the consumers committed before the snapshot is in it
    local offsets = #ctx.params.groups > 0 and backupset.record_offsets(ctx.params.groups) or nil
    local db = backupset.dump_database(set, { url = ctx.params.database_url })
    return { set = set, database = db, offsets = offsets }
  end,
}

step "Back up the Kubernetes configuration" {
  description = "Deployments, statefulsets, daemonsets, cronjobs, services, configmaps, service accounts, network policies, HPAs, ingresses, Dapr components and subscriptions (secrets only with secrets=true) as YAML, encrypted with encrypt=true",
  needs = { "Dump the database" },
  when = function(ctx) return ctx.params.kubernetes end,
  run = function(ctx, dumped)
    local out = backupset.dump_kubernetes(dumped.set,
      { namespace = ctx.params.namespace, secrets = ctx.params.secrets, passphrase = ctx.params.encrypt and ctx.params.passphrase or nil })
    out.namespace = ctx.params.namespace
    return out
  end,
}

step "Back up Kafka topics" {
  description = "Every message of each chosen topic (keys, headers, timestamps) as JSON Lines",
  needs = { "Dump the database" },
  when = function(ctx) return #ctx.params.topics > 0 end,
  run = function(ctx, dumped)
    return backupset.dump_topics(dumped.set, ctx.params.topics)
  end,
}

step "Seal the set" {
  description = "Write manifest.json (every file's sha256 and size, row counts per table, times), rename the set to its timestamped name, verify it",
  needs = { "Dump the database" }, uses = { "Back up the Kubernetes configuration", "Back up Kafka topics" },
  run = function(ctx, dumped)
    local parts = { database = dumped.database, offsets = dumped.offsets }
    if ctx.params.kubernetes and not ctx.skipped("Back up the Kubernetes configuration") then parts.kubernetes = ctx.outputs["Back up the Kubernetes configuration"] end
    if #ctx.params.topics > 0 and not ctx.skipped("Back up Kafka topics") then parts.kafka = ctx.outputs["Back up Kafka topics"] end
    local m = backupset.seal(dumped.set, parts)
    if ctx.dry_run then
      log.info("would seal %s", dumped.set.final)
      return { path = dumped.set.final }
    end
    backupset.verify(dumped.set.final) -- read back: every checksum, and the dump
    local bytes = 0
    for _, f in ipairs(m.files) do bytes = bytes + f.size end
    log.info("backup set %s: %d files, %s, checksums verified", dumped.set.final, #m.files, backupset.pretty(bytes))
    return { path = dumped.set.final, files = #m.files, bytes = bytes }
  end,
}

step "Apply retention" {
  description = "Keep the newest `keep` sets; delete the older ones",
  confirm = true,
  run = function(ctx)
    -- in a dry run the new set was not written: count it all the same
    local removed = backupset.prune(ctx.params.dir, ctx.params.prefix, ctx.params.keep,
      { pending = ctx.dry_run and 1 or 0 })
    if #removed == 0 then log.info("nothing to delete: at most %d sets", ctx.params.keep) end
    return { removed = removed }
  end,
}
