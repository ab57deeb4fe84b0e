-- security-incident.lua: a compromised service isolated, its evidence kept sealed, the team told.
--
-- For seed 001 "Security Incident" (isolate, preserve evidence, notify) and
-- seed 002 "Security Incident" (a deny-all NetworkPolicy, audit logs). The
-- evidence is taken first, before anything changes: the deployment's pods as
-- they are (status included), every container's logs (and the previous
-- container's), the namespace's events and configuration, in one backup set
-- with a sha256 manifest (backupset; verified after sealing). Then the pods
-- are cut off with a deny-all NetworkPolicy (ingress and egress), which stays
-- until someone lifts it. The credentials named in `rotate` (SECRET/KEY) get
-- new values as rotate-secret gives them (stdlib/rotation.lua), their readers
-- restarted, every old value back on failure. The team is told on Slack when
-- SLACK_WEBHOOK is set. The report names every Secret the pods read, with the
-- rotate-secret command for each.
--
-- Seed 002's "rotate all secrets" is rotate_all=true: every key of every Secret
-- the pods read, a database URL's password changed in PostgreSQL too (and
-- wherever it appears in its Secret, as rotate-db-credentials does), keys
-- sharing a value given one new value, and credentials of other servers (a
-- redis:// URL's password, a key equal to it) named, not changed. Policies
-- that let traffic reach the pods in spite of the deny-all (NetworkPolicies
-- add up) stop selecting them. The access log audit keeps every WARN and
-- ERROR line; a patched `image` is rolled out while isolated. What only
-- people can do (assess the scope, the post-incident review) is a section of
-- the report, with what the run gathered for it.
--
--   runbook run security-incident -p deployment=todo-chatbot-backend -p dir=/srv/evidence --step

name = "security-incident"
description = "Evidence of a compromised deployment sealed (pods, logs, WARN/ERROR audit, events, objects, sha256 manifest), its pods isolated by a deny-all NetworkPolicy, its credentials rotated, a patched image rolled out, the team notified"
version = "1.0.0"
replaces = { "001-20", "002-26" }

param "deployment" { required = true, help = "the compromised deployment" }
param "namespace" (steps.params.namespace)
param "dir" { default = "./evidence", help = "where the evidence set is written (a directory of its own, mode 0700)" }
param "log_tail" { type = "integer", default = 5000, help = "lines of each container's log to keep" }
param "rotate" { type = "list", default = "", help = "SECRET/KEY,... credentials to rotate now (rotate-secret's way: a generated value, the readers restarted, the old value back on failure)" }
param "rollout_timeout" { type = "duration", default = "5m", help = "how long each workload restarted after a rotation may take" }
param "rotate_all" { type = "boolean", default = false,
  help = "rotate every key of every Secret the pods read (a database URL's password in PostgreSQL too; other servers' credentials are named, not changed)" }
param "connect_url" { secret = true, default = os.getenv("DATABASE_URL"),
  help = "with rotate_all, how this runbook reaches the database with the current password (default $DATABASE_URL)" }
param "image" { default = "", help = "a patched image for the deployment's first container, rolled out while the pods are isolated" }
param "audit_levels" { type = "list", default = "WARN,ERROR", help = "the log levels the access audit keeps (JSON lines' level field)" }

local SLACK = os.getenv("SLACK_WEBHOOK")
local ASSESS, EVIDENCE, ISOLATE = "Assess", "Preserve the evidence", "Isolate the pods"

local function ns(ctx) return { namespace = ctx.params.namespace } end
local function policy_name(ctx) return "isolate-" .. ctx.params.deployment end

-- The Secrets a pod spec reads: name -> true.
local function secrets_of(spec)
  local out = {}
  for _, v in ipairs(spec.volumes or {}) do
    if v.secret then out[v.secret.secretName] = true end
    for _, src in ipairs(v.projected and v.projected.sources or {}) do if src.secret then out[src.secret.name] = true end end
  end
  for _, list in ipairs { spec.containers or {}, spec.initContainers or {} } do
    for _, c in ipairs(list) do
      for _, ef in ipairs(c.envFrom or {}) do if ef.secretRef then out[ef.secretRef.name] = true end end
      for _, e in ipairs(c.env or {}) do
        if e.valueFrom and e.valueFrom.secretKeyRef then out[e.valueFrom.secretKeyRef.name] = true end
      end
    end
  end
  return out
end

-- A label of the pods that no other pod of the namespace has with that value:
-- the one a policy can leave them out by. nil when none does.
local function split_label(ctx, labels)
  local keys = {}
  for k in pairs(labels) do keys[#keys + 1] = k end
  table.sort(keys)
  local all = k8s.list("pods", ns(ctx))
  for _, k in ipairs(keys) do
    local others = 0
    for _, p in ipairs(all) do
      local l = p.metadata.labels or {}
      if l[k] == labels[k] and not k8s.selects({ matchLabels = labels }, l) then others = others + 1 end
    end
    if others == 0 then return { key = k, value = labels[k] } end
  end
end

step(ASSESS) {
  description = "The deployment, its pods (node, phase, restarts), the NetworkPolicies that let traffic reach them, the Secrets they read",
  run = function(ctx)
    local d = k8s.get("deploy/" .. ctx.params.deployment, ns(ctx))
    local labels = d.spec.selector.matchLabels
    if not labels or next(labels) == nil then error(("deployment %s selects its pods without matchLabels"):format(ctx.params.deployment), 0) end
    local pods = {}
    for _, p in ipairs(k8s.list("pods", { namespace = ctx.params.namespace, selector = labels })) do
      local restarts = 0
      for _, cs in ipairs(p.status.containerStatuses or {}) do restarts = restarts + (cs.restartCount or 0) end
      pods[#pods + 1] = p.metadata.name
      log.info("pod %s on %s: %s, %d restarts", p.metadata.name, tostring(p.spec.nodeName), tostring(p.status.phase), restarts)
    end
    local secrets = {}
    for name in pairs(secrets_of(d.spec.template.spec)) do secrets[#secrets + 1] = name end
    table.sort(secrets)
    log.info("it reads secrets: %s", #secrets > 0 and table.concat(secrets, ", ") or "(none)")
    -- policies that let traffic in or out of the pods: NetworkPolicies add up, so a deny-all does not stop them
    local tmpl_labels, permissive = d.spec.template.metadata.labels or {}, {}
    for _, np in ipairs(k8s.list("networkpolicies", ns(ctx))) do
      if np.metadata.name ~= policy_name(ctx) and k8s.selects(np.spec.podSelector, tmpl_labels)
          and (np.spec.ingress or np.spec.egress) then
        permissive[#permissive + 1] = np.metadata.name
        log.warn("networkpolicy %s lets traffic reach the pods", np.metadata.name)
      end
    end
    return { labels = labels, pods = pods, secrets = secrets, permissive = permissive, split = split_label(ctx, labels) }
  end,
}

step(EVIDENCE) {
  description = "Pods, every container's logs (current and previous), the WARN/ERROR access audit, events and the namespace's objects as YAML, sealed with a sha256 manifest and verified",
  needs = { ASSESS },
  run = function(ctx, a)
    local p = ctx.params
    local set = backupset.new(p.dir, "evidence-" .. p.deployment)
    local files = {}
    local function keep(rel, text)
      if not fs.write(set.partial .. "/" .. rel, text).skipped then files[#files + 1] = rel end
    end
    local pods = k8s.list("pods", { namespace = p.namespace, selector = a.labels })
    keep("pods.yaml", yaml.dump(table.unpack(pods)))
    local events = k8s.events(ns(ctx))
    keep("events.yaml", #events > 0 and yaml.dump(table.unpack(events)) or "")
    fs.mkdir(set.partial .. "/logs")
    for _, pod in ipairs(pods) do
      for _, c in ipairs(pod.spec.containers) do
        for _, previous in ipairs { false, true } do
          local ok, lines = pcall(k8s.logs, "pod/" .. pod.metadata.name,
            { namespace = p.namespace, container = c.name, tail = p.log_tail, timestamps = true, previous = previous })
          if ok then
            keep(("logs/%s_%s%s.log"):format(pod.metadata.name, c.name, previous and ".previous" or ""), table.concat(lines, "\n") .. "\n")
          elseif not previous then
            log.warn("no logs of %s/%s: %s", pod.metadata.name, c.name, tostring(type(lines) == "table" and lines.message or lines))
          end
        end
      end
    end
    -- seed 002's access log audit: every WARN and ERROR line of the deployment's pods
    local audit = k8s.log_query { target = "deploy/" .. p.deployment, namespace = p.namespace, tail = p.log_tail,
      where = { level = p.audit_levels }, count_by = "level", prefix = true }
    local lines = {}
    for i, rec in ipairs(audit.records) do lines[i] = ("%s %s/%s %s"):format(rec.stamp or "", rec.pod, rec.container, rec.line) end
    keep("audit.log", #lines > 0 and table.concat(lines, "\n") .. "\n" or "")
    local by = {}
    for _, b in ipairs(audit.by or {}) do by[#by + 1] = ("%s %d"):format(b.value, b.count) end
    log.info("access audit: %d %s lines of %d read%s", #lines, table.concat(p.audit_levels, "/"), audit.scanned,
      #by > 0 and (" (" .. table.concat(by, ", ") .. ")") or "")
    local objects = backupset.dump_kubernetes(set, { namespace = p.namespace })
    objects.namespace = p.namespace
    local manifest = backupset.seal(set, { kubernetes = objects, evidence = { files = files } })
    if ctx.dry_run then return { path = set.final, audit = by } end
    backupset.verify(manifest.path)
    log.info("evidence sealed in %s: %d files, sha256 of each in manifest.json", manifest.path, #manifest.files)
    return { path = manifest.path, files = #manifest.files, audit = by }
  end,
}

step(ISOLATE) {
  description = "A deny-all NetworkPolicy (no ingress, no egress) on the deployment's pods, and the policies that let traffic reach them no longer selecting them; it stays until someone lifts it",
  needs = { ASSESS, EVIDENCE },
  confirm = true,
  run = function(ctx)
    local name = policy_name(ctx)
    k8s.apply { apiVersion = "networking.k8s.io/v1", kind = "NetworkPolicy",
      metadata = { name = name, namespace = ctx.params.namespace,
        labels = { ["app.kubernetes.io/managed-by"] = "runbook" },
        annotations = { ["runbook/incident"] = ctx.run_id, ["runbook/evidence"] = ctx.outputs[EVIDENCE].path } },
      spec = { podSelector = { matchLabels = ctx.outputs[ASSESS].labels }, policyTypes = { "Ingress", "Egress" } } }
    -- the policies that let traffic reach the pods stop selecting them (their YAML is in the evidence)
    local a, excluded, kept = ctx.outputs[ASSESS], {}, {}
    for _, pname in ipairs(a.permissive) do
      if a.split then
        local np = k8s.get("networkpolicy/" .. pname, ns(ctx))
        local sel = np.spec.podSelector or {}
        local exprs = sel.matchExpressions or {}
        exprs[#exprs + 1] = { key = a.split.key, operator = "NotIn", values = { a.split.value } }
        k8s.patch("networkpolicy/" .. pname, { spec = { podSelector = { matchLabels = sel.matchLabels, matchExpressions = exprs } } },
          { namespace = ctx.params.namespace, type = "merge" })
        excluded[#excluded + 1] = pname
      else
        kept[#kept + 1] = pname
        log.warn("networkpolicy %s still lets traffic reach the pods: no label sets them apart from other pods", pname)
      end
    end
    if not ctx.dry_run then
      log.warn("%d pods isolated by networkpolicy %s%s; lift it with: kubectl -n %s delete networkpolicy %s%s",
        #a.pods, name, #excluded > 0 and (" (no longer selected by " .. table.concat(excluded, ", ") .. ")") or "",
        ctx.params.namespace, name, #excluded > 0 and (", and kubectl apply -f " .. ctx.outputs[EVIDENCE].path
          .. "/k8s/networkpolicies.yaml") or "")
    end
    return { policy = name, excluded = excluded, not_excluded = kept }
  end,
}

-- SECRET/KEY pairs of param rotate.
local function pairs_to_rotate(ctx)
  local out = {}
  for _, item in ipairs(ctx.params.rotate) do
    local s, k = item:match("^([^/]+)/(.+)$")
    if not s then error(("param rotate: %q is not SECRET/KEY"):format(item), 0) end
    out[#out + 1] = { secret = s, key = k }
  end
  return out
end

-- What rotate_all does with the Secrets the pods read: `db`, one entry per
-- database password (the keys it appears in, their values); `groups`, the
-- other keys by equal value (one new value each, so keys that must match
-- still do); `left`, SECRET/KEY: why (another server's credentials).
local function plan_all(ctx)
  local plan = { db = {}, groups = {}, left = {} }
  for _, name in ipairs(ctx.outputs[ASSESS].secrets) do
    local s = k8s.get("secret/" .. name, { namespace = ctx.params.namespace, missing_ok = true })
    if not s then plan.left[#plan.left + 1] = name .. ": the pods name it, but it does not exist" end
    local data, keys, db, other, done = {}, {}, {}, {}, {}
    for k, v in pairs(s and s.data or {}) do data[k] = secret.register(base64.decode(v)); keys[#keys + 1] = k end
    table.sort(keys)
    for _, k in ipairs(keys) do
      local user, pw = rotation.db_credentials(data[k])
      local opw = not user and data[k]:match("^%a[%w+.-]*://[^:@/]*:([^@/]+)@")
      if user and pw ~= "" then
        db[pw] = db[pw] or { secret = name, user = user, password = pw, values = {} }
      elseif opw then
        other[opw], done[k] = true, true
        plan.left[#plan.left + 1] = ("%s/%s: another server's credentials (change them there, then config-update)"):format(name, k)
      end
    end
    for pw, d in pairs(db) do
      for _, k in ipairs(keys) do
        if data[k]:find(pw, 1, true) then d.values[k], done[k] = data[k], true end
      end
      plan.db[#plan.db + 1] = d
    end
    local by_value = {}
    for _, k in ipairs(keys) do -- the keys not rotated with a database password, nor left
      if not done[k] and other[data[k]] then
        plan.left[#plan.left + 1] = ("%s/%s: the password of another server's URL"):format(name, k)
      elseif not done[k] then
        local g = by_value[data[k]]
        if not g then g = { secret = name, keys = {} }; by_value[data[k]] = g; plan.groups[#plan.groups + 1] = g end
        g.keys[#g.keys + 1] = k
      end
    end
  end
  return plan
end

-- Rotates what params rotate and rotate_all name; `done` collects each key
-- set (for the restore) and `altered` each database password changed.
local function rotate(ctx, done, altered)
  local p, readers, seen, rotated, left = ctx.params, {}, {}, {}, {}
  local function set(name, key, value)
    if seen[name .. "/" .. key] then return end
    seen[name .. "/" .. key] = true
    local r = rotation.set { namespace = p.namespace, secret = name, key = key, value = value }
    done[#done + 1] = { namespace = p.namespace, secret = name, key = key, copy = r.copy }
    rotated[#rotated + 1] = name .. "/" .. key
    for _, ref in ipairs((rotation.readers(p.namespace, name))) do
      if not seen[ref] then seen[ref], readers[#readers + 1] = true, ref end
    end
  end
  if p.rotate_all then
    local plan = plan_all(ctx)
    for _, d in ipairs(plan.db) do
      if rotation.db_credentials(p.connect_url or "") ~= d.user then
        error(("param connect_url must connect as %s, the user of secret %s's database URL"):format(d.user, d.secret), 0)
      end
      local new = rotation.generate(32, "alnum")
      local keys = {}
      for k in pairs(d.values) do keys[#keys + 1] = k end
      table.sort(keys)
      for _, k in ipairs(keys) do
        set(d.secret, k, secret.register((d.values[k]:gsub(d.password:gsub("%p", "%%%0"), (new:gsub("%%", "%%%%"))))))
      end
      rotation.set_db_password(p.connect_url, d.user, new)
      altered[#altered + 1] = { user = d.user, old = d.password, new = new }
      log.info("database user %s: a new password, in PostgreSQL and in %s", d.user, table.concat(keys, ", "))
    end
    for _, g in ipairs(plan.groups) do
      local v = rotation.generate(32, "alnum")
      for _, k in ipairs(g.keys) do set(g.secret, k, v) end
    end
    left = plan.left
  end
  for _, r in ipairs(pairs_to_rotate(ctx)) do set(r.secret, r.key, rotation.generate(32, "alnum")) end
  rotation.restart(readers, { namespace = p.namespace, timeout = p.rollout_timeout })
  return rotated, readers, left
end

step "Rotate the credentials" {
  description = "The keys of param rotate, or (rotate_all) every key of every Secret the pods read, get new values (the old ones copied aside; a database password changed in PostgreSQL too); the readers restarted; any failure puts every old value back",
  needs = { ASSESS, ISOLATE },
  when = function(ctx) return #ctx.params.rotate > 0 or ctx.params.rotate_all end,
  confirm = true,
  run = function(ctx)
    local p, done, altered = ctx.params, {}, {}
    local ok, rotated, readers, left = pcall(rotate, ctx, done, altered)
    if not ok then
      for _, a in ipairs(altered) do rotation.set_db_password(rotation.with_password(p.connect_url, a.new), a.user, a.old) end
      for _, d in ipairs(done) do rotation.restore(d) end
      if #done > 0 then log.warn("the old values are back in %d keys", #done) end
      error(rotated, 0)
    end
    if not ctx.dry_run then
      for _, d in ipairs(done) do k8s.delete("secret/" .. d.copy, { namespace = p.namespace, missing_ok = true }) end
    end
    for _, l in ipairs(left) do log.warn("not rotated: %s", l) end
    log.info("rotated %s; restarted %s", #rotated > 0 and table.concat(rotated, ", ") or "nothing",
      #readers > 0 and table.concat(readers, ", ") or "nothing")
    return { rotated = rotated, restarted = readers, left = left }
  end,
}

step "Roll out the patched image" {
  description = "The deployment's first container on param image (kubectl set image), waited for; its new pods carry the same labels, so they stay isolated",
  needs = { ASSESS },
  when = function(ctx) return ctx.params.image ~= "" end,
  confirm = true,
  run = function(ctx)
    local target = "deploy/" .. ctx.params.deployment
    local c = k8s.get(target, ns(ctx)).spec.template.spec.containers[1].name
    k8s.set_image(target, { [c] = ctx.params.image }, ns(ctx))
    k8s.rollout_status(target, { namespace = ctx.params.namespace, timeout = ctx.params.rollout_timeout, fail_fast = true })
    return { container = c, image = ctx.params.image }
  end,
}

step "Notify and report" {
  description = "What was kept and done, to Slack when SLACK_WEBHOOK is set; what is left to rotate; the scope assessment and the review, which are people's, with what the run gathered for them",
  needs = { ASSESS, EVIDENCE },
  uses = { ISOLATE, "Rotate the credentials", "Roll out the patched image" },
  run = function(ctx, a, e)
    local p = ctx.params
    local isolated = ctx.skipped(ISOLATE) and "NOT isolated" or ctx.dry_run and "would be isolated"
      or ("isolated by networkpolicy " .. ctx.outputs[ISOLATE].policy)
    local lines = { ("Security incident: deployment %s in %s, %s"):format(p.deployment, p.namespace, isolated),
      ("evidence: %s"):format(e.path), ("timeline: runbook report %s"):format(ctx.run_id) }
    if not ctx.skipped(ISOLATE) and #ctx.outputs[ISOLATE].not_excluded > 0 then
      lines[#lines + 1] = "still letting traffic reach the pods: networkpolicy " .. table.concat(ctx.outputs[ISOLATE].not_excluded, ", ")
    end
    local r = not ctx.skipped("Rotate the credentials") and ctx.outputs["Rotate the credentials"]
    if r and #r.rotated > 0 then lines[#lines + 1] = "rotated: " .. table.concat(r.rotated, ", ") end
    for _, l in ipairs(r and r.left or {}) do lines[#lines + 1] = "not rotated: " .. l end
    if not r or not p.rotate_all then
      for _, s in ipairs(a.secrets) do
        lines[#lines + 1] = ("to rotate: runbook run security-incident -p rotate_all=true, or rotate-secret -p namespace=%s -p secret=%s"
          .. " -p key=KEY (rotate-db-credentials for a database URL)"):format(p.namespace, s)
      end
    end
    if not ctx.skipped("Roll out the patched image") then
      lines[#lines + 1] = "patched: " .. ctx.outputs["Roll out the patched image"].image
    end
    lines[#lines + 1] = ("assess the scope (yours): pods %s; they read %s; the access audit (%s) is evidence/audit.log; were other"
      .. " services reached? (runbook run log-search on each)"):format(table.concat(a.pods, ", "),
      #a.secrets > 0 and table.concat(a.secrets, ", ") or "no Secret", #e.audit > 0 and table.concat(e.audit, ", ") or "no lines")
    lines[#lines + 1] = "post-incident review (yours): the timeline above and the evidence; lift the isolation when it is over"
    for _, l in ipairs(lines) do log.info("%s", l) end
    if SLACK and SLACK ~= "" then
      notify.slack { webhook = SLACK, channel = os.getenv("SLACK_CHANNEL") or "#security", text = table.concat(lines, "\n") }
    else
      log.warn("SLACK_WEBHOOK is not set: tell the security team yourself")
    end
    return { isolated = not ctx.skipped(ISOLATE), evidence = e.path, rotate = a.secrets }
  end,
}
