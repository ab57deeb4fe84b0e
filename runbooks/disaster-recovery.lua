-- disaster-recovery.lua: a namespace brought back from a backup set after a
-- cluster failure or a complete outage.
--
-- Replaces seed 004 "DR: Complete Cluster Failure" (apply the configuration
-- backup, restore the database, verify), seed 001 "Complete System Outage"
-- (assess the scope, restore from backups, communicate) and seed 003
-- "Complete System Recovery" (namespace, secrets, configmaps, database,
-- application, services, ingress, health). The set is backup.lua's, taken
-- with kubernetes=true (and secrets=true, and the topics to keep). It looks
-- first: what of the set is missing from the cluster, which deployments fail,
-- which dependencies are down, how the database differs. It announces the
-- recovery, then puts the objects back in dependency order (the namespace, its
-- accounts, Secrets, ConfigMaps and Dapr components; the Services; the
-- workloads, the database's writers held at 0), the database (one
-- transaction), the topics (into empty topics only), and starts the writers.
-- It verifies every object, every deployment and service, the rows and the
-- topics, and reports. DNS and load balancers stay the operator's: the report
-- names the Ingress hosts and addresses to point them at.
--
--   runbook run disaster-recovery -p dir=/var/backups/todo --step
--   runbook run disaster-recovery -p set=/var/backups/todo/todo-20261122T030000Z --dry-run

name = "disaster-recovery"
description = "Assess an outage against a backup set, announce, restore the set's Kubernetes objects in dependency order, its database and topics, verify, report"
replaces = { "004-17", "001-19", "003-12" }
version = "1.0.0"
on_failure = "undo"

param "dir" { default = "./backups", help = "directory holding the backup sets (backup.lua's, taken with kubernetes=true)" }
param "prefix" (steps.params.prefix)
param "set" { default = "", help = "the backup set directory to restore (default: the newest PREFIX set in dir)" }
param "namespace" { default = "", help = "the namespace to restore into (default: the one the set was taken from)" }
param "database_url" (steps.params.database_url)
param "writers" (steps.params.writers)
param "topics" { type = "list", default = "", help = "the set's topics to restore, NAME or NAME=TARGET, comma-separated (default: every topic in the set)" }
param "validate" { default = "SELECT count(*) FROM tasks WHERE user_id IS NULL",
  help = "validation queries separated by ';', each must return 0 after the restore" }
param "passphrase" { secret = true, default = os.getenv("BACKUP_PASSPHRASE"), help = "for a set whose Kubernetes files are encrypted (default $BACKUP_PASSPHRASE)" }
param "health_path" (steps.params.health_path)
param "timeout" { type = "duration", default = "3m", help = "how long each rollout, and the writers' stop and start, may take" }
param "eta" { type = "duration", default = "30m", help = "the recovery time announced to stakeholders (the report gives the actual one)" }
param "force" { type = "boolean", default = false, help = "restore even when the assessment finds nothing missing or failing" }

local SLACK = os.getenv("SLACK_WEBHOOK")
local SET, ASSESS, CONFIG, SERVICES, WORKLOADS = "Verify the backup set", "Assess the outage",
  "Restore the namespace and its configuration", "Restore the services", "Restore the workloads"
local DATABASE, TOPICS, VERIFY = "Restore the database", "Restore the topics", "Verify the recovery"

local CONFIG_FILES = { "serviceaccounts", "secrets", "configmaps", "dapr-components", "dapr-subscriptions", "networkpolicies" }
local WORKLOAD_FILES = { "deployments", "statefulsets", "daemonsets", "cronjobs", "hpas", "ingresses" }

-- The kubectl type of each of the set's files.
local TYPE = {}
for _, k in ipairs(backupset.KINDS) do TYPE[k.file] = k.type end
TYPE.secrets = "secrets"

local function say(ctx, text)
  log.info("%s", text)
  if SLACK and SLACK ~= "" and not ctx.dry_run then
    notify.slack { webhook = SLACK, channel = os.getenv("SLACK_CHANNEL") or "#incidents", text = text }
  end
end

-- The set's objects of one file: {{type, name, kind}...}.
local function objects_of(ctx, path, file)
  local out = {}
  for _, o in ipairs(backupset.read_kubernetes(path, file, ctx.params.passphrase)) do
    out[#out + 1] = { type = TYPE[file], name = o.metadata.name, kind = o.kind, replicas = o.spec and o.spec.replicas }
  end
  return out
end

-- The set's objects the cluster lacks in namespace ns: "kind/name" list, and the count of all.
local function missing_objects(ctx, path, files, ns)
  local missing, all = {}, 0
  for _, file in ipairs(files) do
    for _, o in ipairs(objects_of(ctx, path, file)) do
      all = all + 1
      if not k8s.get(o.type .. "/" .. o.name, { namespace = ns, missing_ok = true }) then
        missing[#missing + 1] = o.kind .. "/" .. o.name
      end
    end
  end
  return missing, all
end

-- The files of `list` that the set holds.
local function in_set(ctx, list)
  local have = {}
  for _, f in ipairs(ctx.outputs[SET].files) do have[f] = true end
  local out = {}
  for _, f in ipairs(list) do if have[f] then out[#out + 1] = f end end
  return out
end

-- The writers (param writers) that are deployments in the set.
local function held_writers(ctx)
  local inset = {}
  for _, o in ipairs(objects_of(ctx, ctx.outputs[SET].path, "deployments")) do inset[o.name] = true end
  local out = {}
  for _, w in ipairs(ctx.params.writers) do if inset[w] then out[#out + 1] = w end end
  return out
end

-- The set's manifest (its files were verified by the first step).
local function manifest(ctx) return backupset.manifest(ctx.outputs[SET].path) end

-- The set's objects of `files` (those it holds) applied into its namespace,
-- the deployments named in `hold` at 0 replicas (backupset.restore_kubernetes).
local function restore(ctx, files, hold)
  local s = ctx.outputs[SET]
  return backupset.restore_kubernetes(s.path, manifest(ctx),
    { namespace = s.namespace, files = in_set(ctx, files), hold = hold, passphrase = ctx.params.passphrase })
end

step(SET) {
  description = "Every file's sha256 and size against manifest.json (and pg_restore --list on the dump) before anything is touched; it must hold Kubernetes objects",
  run = function(ctx)
    local path = backupset.find(ctx.params.dir, ctx.params.prefix, { set = ctx.params.set })
    local m = backupset.verify(path)
    local files = backupset.kubernetes_files(m)
    if #files == 0 then error(path .. " holds no Kubernetes objects (take sets with backup -p kubernetes=true)", 0) end
    local ns = ctx.params.namespace ~= "" and ctx.params.namespace or (m.kubernetes or {}).namespace
    local topics = {}
    for t in pairs((m.kafka or {}).topics or {}) do topics[#topics + 1] = t end
    table.sort(topics)
    log.info("%s (taken %s): %d files verified; objects: %s; database: %s; topics: %s", path, m.created_at, #m.files,
      table.concat(files, ", "), m.database and m.database.name or "none", #topics > 0 and table.concat(topics, ", ") or "none")
    if not (m.kubernetes or {}).objects or not (m.kubernetes.objects.secrets) then
      log.warn("the set holds no Secrets (backup -p secrets=true): the workloads that read them will wait for them")
    end
    return { path = path, namespace = ns, files = files, database = m.database ~= nil, topics = topics,
      created_at = m.created_at }
  end,
}

step(ASSESS) {
  description = "The scope: the API and nodes, what of the set the cluster lacks, failing deployments, dependencies (PostgreSQL, Redis, Kafka), the database against the set",
  needs = { SET },
  run = function(ctx, s)
    local scope = {}
    local ns_obj = k8s.get("namespaces/" .. s.namespace, { missing_ok = true })
    local missing, all = missing_objects(ctx, s.path, s.files, s.namespace)
    if not ns_obj then scope[#scope + 1] = ("namespace %s is gone"):format(s.namespace)
    elseif #missing > 0 then
      scope[#scope + 1] = ("%d of the set's %d objects are missing: %s"):format(#missing, all, table.concat(missing, ", "))
    end
    local h = k8s.namespace_health(s.namespace)
    for _, p in ipairs(h.problems) do scope[#scope + 1] = p end
    local deps = checks.dependencies { namespace = s.namespace }
    if #deps.down > 0 then scope[#scope + 1] = "dependencies down: " .. table.concat(deps.down, ", ") end
    if s.database then
      local up, err = pcall(function() pg.connect(ctx.params.database_url, { connect_timeout = "10s" }):close() end)
      if not up then
        error(("the database does not answer (%s): it cannot be restored until it does, or database_url names the new one")
          :format(tostring(type(err) == "table" and err.message or err)), 0)
      end
      local problems = backupset.validate { manifest = manifest(ctx), url = ctx.params.database_url }
      if #problems > 0 then scope[#scope + 1] = "the database differs from the set: " .. table.concat(problems, "; ") end
    end
    for _, line in ipairs(scope) do log.warn("%s", line) end
    if #scope == 0 then
      if not ctx.params.force then error("nothing of the set is missing or failing: nothing to recover (force=true restores anyway)", 0) end
      log.info("nothing is missing or failing; restoring anyway (force)")
    end
    return { scope = scope, missing = #missing, objects = all, namespace_gone = ns_obj == nil }
  end,
}

step "Announce the recovery" {
  description = "The scope, the set and the expected recovery time, to Slack when SLACK_WEBHOOK is set",
  needs = { SET, ASSESS },
  run = function(ctx, s, a)
    local eta = os.date("!%H:%M UTC", os.time() + ctx.params.eta)
    say(ctx, table.concat({ ("Disaster recovery of %s started from %s (taken %s); expected back by %s."):format(
      s.namespace, s.path, s.created_at, eta), "Scope: " .. (#a.scope > 0 and table.concat(a.scope, "; ") or "nothing failing (forced)"),
      "Timeline: runbook report " .. ctx.run_id }, "\n"))
    return { started = os.time(), eta = eta }
  end,
}

step(CONFIG) {
  description = "The namespace (created when missing), then the set's service accounts, Secrets, ConfigMaps, Dapr components and subscriptions, NetworkPolicies",
  needs = { SET, ASSESS },
  confirm = true,
  run = function(ctx)
    local r = restore(ctx, CONFIG_FILES)
    for file, n in pairs(r.applied) do log.info("%d %s applied", n, file) end
    return { created = r.created, applied = r.applied }
  end,
}

step(SERVICES) {
  description = "The set's Services, before the workloads behind them",
  needs = { SET, CONFIG },
  confirm = true,
  run = function(ctx) return { applied = restore(ctx, { "services" }).applied } end,
}

step(WORKLOADS) {
  description = "The set's deployments (the writers held at 0 until the data is back), statefulsets, daemonsets, cronjobs, HPAs and ingresses; waits for the rollouts",
  needs = { SET, CONFIG },
  confirm = true,
  run = function(ctx, s)
    local writers = held_writers(ctx)
    local r = restore(ctx, WORKLOAD_FILES, writers)
    local saved = r.held
    if #saved > 0 and not ctx.dry_run then
      -- writers that were running (a partial outage): their pods gone before the data changes
      local targets = {}
      for _, w in ipairs(saved) do targets[#targets + 1] = w.target end
      k8s.stop_workloads(targets, { namespace = s.namespace, timeout = ctx.params.timeout })
    end
    local held = {}
    for _, w in ipairs(writers) do held[w] = true end
    local deployments = {}
    for _, o in ipairs(r.applied.deployments and objects_of(ctx, s.path, "deployments") or {}) do
      if not held[o.name] then
        deployments[#deployments + 1] = o.name
        if not ctx.dry_run then
          k8s.rollout_status("deploy/" .. o.name, { namespace = s.namespace, timeout = ctx.params.timeout, fail_fast = true, progress = false })
          log.info("%s rolled out", o.name)
        end
      end
    end
    if #writers > 0 then log.info("writers held at 0 until the data is back: %s", table.concat(writers, ", ")) end
    return { saved = saved, deployments = deployments }
  end,
  undo = function(ctx, out) k8s.start_workloads(out.saved, { timeout = ctx.params.timeout }) end,
}

step(DATABASE) (steps.restore_database {
  description = "pg_restore --clean --single-transaction of the set's dump while the writers are held; the restored row counts must equal the dump's",
  needs = { SET, WORKLOADS },
  when = function(ctx) return ctx.outputs[SET].database end,
  set = function(ctx) return ctx.outputs[SET].path end,
})

step(TOPICS) {
  description = "The set's topics produced back (keys, headers, timestamps, partitions) into topics that hold no message; a topic with messages is kept as it is",
  needs = { SET, WORKLOADS },
  when = function(ctx) return #ctx.outputs[SET].topics > 0 end,
  confirm = true,
  run = function(ctx, s)
    return backupset.restore_topics(s.path, manifest(ctx), { topics = #ctx.params.topics > 0 and ctx.params.topics or nil })
  end,
}

step "Start writes" (steps.start_writers { stopped = WORKLOADS })

step(VERIFY) {
  description = "Every object of the set present, every deployment healthy, each service's health path answering, the rows against the set, the restored topics holding the set's messages",
  needs = { SET },
  uses = { DATABASE, TOPICS },
  idempotent = true,
  retry = { attempts = 3, base = "2s" },
  run = function(ctx, s)
    local problems = {}
    local missing = missing_objects(ctx, s.path, s.files, s.namespace)
    if #missing > 0 then problems[#problems + 1] = "missing: " .. table.concat(missing, ", ") end
    local h = k8s.namespace_health(s.namespace)
    for _, p in ipairs(h.problems) do problems[#problems + 1] = p end
    local services = 0
    for _, row in ipairs(k8s.services_health(s.namespace, { path = ctx.params.health_path }).services) do
      services = services + 1
      if not row.ok then problems[#problems + 1] = row.service .. " " .. ctx.params.health_path .. ": " .. row.error end
    end
    if s.database then
      for _, p in ipairs(backupset.validate { manifest = manifest(ctx), url = ctx.params.database_url,
        queries = backupset.queries(ctx.params.validate) }) do problems[#problems + 1] = p end
    end
    if not ctx.skipped(TOPICS) then
      for topic, n in pairs(ctx.outputs[TOPICS].restored) do
        local have = 0
        for _, w in pairs(kafka.watermarks(topic)) do have = have + (w.high - w.low) end
        if have < n then problems[#problems + 1] = ("topic %s holds %d messages, %d were restored"):format(topic, have, n) end
      end
    end
    for _, p in ipairs(problems) do log.warn("%s", p) end
    if #problems > 0 and not ctx.dry_run then error(("not recovered: %d problems remain"):format(#problems), 0) end
    log.info("%s: %d deployments, %d services answering %s", #problems == 0 and "recovered" or "now",
      #h.deployments, services, ctx.params.health_path)
    return { problems = problems }
  end,
}

step "Report" {
  description = "The outcome and the time it took, to Slack when SLACK_WEBHOOK is set; the Ingress hosts and addresses DNS must point at",
  needs = { SET, VERIFY },
  uses = { "Announce the recovery", CONFIG, SERVICES, WORKLOADS, DATABASE, TOPICS },
  run = function(ctx, s)
    local lines = { ("%s %s from %s"):format(s.namespace, ctx.dry_run and "would be recovered (dry run)" or "recovered", s.path) }
    for _, st in ipairs { CONFIG, SERVICES, WORKLOADS, DATABASE, TOPICS } do
      local why = ctx.skipped(st)
      if why then lines[#lines + 1] = ("%s: skipped (%s)"):format(st, why == "operator" and "by the operator"
        or why == "when" and "nothing of it in the set" or "a step it needs was skipped") end
    end
    if not ctx.skipped(TOPICS) then
      for t, why in pairs(ctx.outputs[TOPICS].kept) do lines[#lines + 1] = ("topic %s kept as it was: it %s"):format(t, why) end
    end
    for _, ing in ipairs(k8s.list("ingresses", { namespace = s.namespace })) do
      local hosts, addrs = {}, {}
      for _, r in ipairs(ing.spec.rules or {}) do hosts[#hosts + 1] = r.host end
      for _, a in ipairs(((ing.status or {}).loadBalancer or {}).ingress or {}) do addrs[#addrs + 1] = a.ip or a.hostname end
      lines[#lines + 1] = ("DNS: point %s at %s (ingress %s)"):format(table.concat(hosts, ", "),
        #addrs > 0 and table.concat(addrs, ", ") or "the ingress controller's address, once it has one", ing.metadata.name)
    end
    if not ctx.skipped("Announce the recovery") then
      lines[#lines + 1] = ("took %s (announced: back by %s)"):format(
        duration.format(os.time() - ctx.outputs["Announce the recovery"].started), ctx.outputs["Announce the recovery"].eta)
    end
    lines[#lines + 1] = "timeline: runbook report " .. ctx.run_id
    say(ctx, table.concat(lines, "\n"))
    return { report = lines }
  end,
}
