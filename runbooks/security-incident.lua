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
--   runbook run security-incident -p deployment=todo-chatbot-backend -p dir=/srv/evidence --step

name = "security-incident"
description = "Evidence of a compromised deployment sealed (pods, logs, events, objects, sha256 manifest), its pods isolated by a deny-all NetworkPolicy, the team notified, the credentials to rotate named"
version = "1.0.0"
replaces = {}

param "deployment" { required = true, help = "the compromised deployment" }
param "namespace" (steps.params.namespace)
param "dir" { default = "./evidence", help = "where the evidence set is written (a directory of its own, mode 0700)" }
param "log_tail" { type = "integer", default = 5000, help = "lines of each container's log to keep" }
param "rotate" { default = "", help = "SECRET/KEY,... credentials to rotate now (rotate-secret's way: a generated value, the readers restarted, the old value back on failure)" }
param "rollout_timeout" { type = "duration", default = "5m", help = "how long each workload restarted after a rotation may take" }

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

step(ASSESS) {
  description = "The deployment, its pods (node, phase, restarts), the NetworkPolicies that select them, the Secrets they read",
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
    return { labels = labels, pods = pods, secrets = secrets }
  end,
}

step(EVIDENCE) {
  description = "Pods, every container's logs (current and previous), events and the namespace's objects as YAML, sealed with a sha256 manifest and verified",
  needs = { ASSESS },
  run = function(ctx)
    local p, a = ctx.params, ctx.outputs[ASSESS]
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
    local objects = backupset.dump_kubernetes(set, { namespace = p.namespace })
    objects.namespace = p.namespace
    local manifest = backupset.seal(set, { kubernetes = objects, evidence = { files = files } })
    if ctx.dry_run then return { path = set.final } end
    backupset.verify(manifest.path)
    log.info("evidence sealed in %s: %d files, sha256 of each in manifest.json", manifest.path, #manifest.files)
    return { path = manifest.path, files = #manifest.files }
  end,
}

step(ISOLATE) {
  description = "A deny-all NetworkPolicy (no ingress, no egress) on the deployment's pods; it stays until someone deletes it",
  needs = { ASSESS, EVIDENCE },
  confirm = true,
  run = function(ctx)
    local name = policy_name(ctx)
    k8s.apply { apiVersion = "networking.k8s.io/v1", kind = "NetworkPolicy",
      metadata = { name = name, namespace = ctx.params.namespace,
        labels = { ["app.kubernetes.io/managed-by"] = "runbook" },
        annotations = { ["runbook/incident"] = ctx.run_id, ["runbook/evidence"] = ctx.outputs[EVIDENCE].path } },
      spec = { podSelector = { matchLabels = ctx.outputs[ASSESS].labels }, policyTypes = { "Ingress", "Egress" } } }
    if not ctx.dry_run then
      log.warn("%d pods isolated by networkpolicy %s; lift it with: kubectl -n %s delete networkpolicy %s",
        #ctx.outputs[ASSESS].pods, name, ctx.params.namespace, name)
    end
    return { policy = name }
  end,
}

-- SECRET/KEY pairs of param rotate.
local function pairs_to_rotate(ctx)
  local out = {}
  for item in ctx.params.rotate:gmatch("[^,%s]+") do
    local s, k = item:match("^([^/]+)/(.+)$")
    if not s then error(("param rotate: %q is not SECRET/KEY"):format(item), 0) end
    out[#out + 1] = { secret = s, key = k }
  end
  return out
end

step "Rotate the credentials" {
  description = "Each SECRET/KEY of param rotate gets a generated value (the old one copied aside), the workloads reading them restarted; any failure puts every old value back",
  needs = { ISOLATE },
  when = function(ctx) return ctx.params.rotate ~= "" end,
  confirm = true,
  run = function(ctx)
    local p, done, readers, seen = ctx.params, {}, {}, {}
    local ok, err = pcall(function()
      for _, r in ipairs(pairs_to_rotate(ctx)) do
        local set = rotation.set { namespace = p.namespace, secret = r.secret, key = r.key, value = rotation.generate(32, "alnum") }
        done[#done + 1] = { namespace = p.namespace, secret = r.secret, key = r.key, copy = set.copy }
        for _, ref in ipairs((rotation.readers(p.namespace, r.secret))) do
          if not seen[ref] then seen[ref], readers[#readers + 1] = true, ref end
        end
      end
      rotation.restart(readers, { namespace = p.namespace, timeout = p.rollout_timeout })
    end)
    if not ok then
      for _, d in ipairs(done) do rotation.restore(d) end
      if #done > 0 then log.warn("the old values are back in %d keys", #done) end
      error(err, 0)
    end
    local rotated = {}
    for _, d in ipairs(done) do
      if not ctx.dry_run then k8s.delete("secret/" .. d.copy, { namespace = p.namespace, missing_ok = true }) end
      rotated[#rotated + 1] = d.secret .. "/" .. d.key
    end
    log.info("rotated %s; restarted %s", table.concat(rotated, ", "), #readers > 0 and table.concat(readers, ", ") or "nothing")
    return { rotated = rotated, restarted = readers }
  end,
}

step "Notify and report" {
  description = "What was kept and done, to Slack when SLACK_WEBHOOK is set; the Secrets to rotate, with the commands",
  needs = { ASSESS, EVIDENCE },
  uses = { ISOLATE, "Rotate the credentials" },
  run = function(ctx)
    local p, a = ctx.params, ctx.outputs[ASSESS]
    local isolated = ctx.skipped(ISOLATE) and "NOT isolated" or ctx.dry_run and "would be isolated"
      or ("isolated by networkpolicy " .. ctx.outputs[ISOLATE].policy)
    local lines = { ("Security incident: deployment %s in %s, %s"):format(p.deployment, p.namespace, isolated),
      ("evidence: %s"):format(ctx.outputs[EVIDENCE].path), ("timeline: runbook report %s"):format(ctx.run_id) }
    local rotated = not ctx.skipped("Rotate the credentials") and ctx.outputs["Rotate the credentials"].rotated or {}
    if #rotated > 0 then lines[#lines + 1] = "rotated: " .. table.concat(rotated, ", ") end
    for _, s in ipairs(a.secrets) do
      lines[#lines + 1] = ("rotate: runbook run rotate-secret -p namespace=%s -p secret=%s -p key=KEY (or rotate-db-credentials for a database URL)")
        :format(p.namespace, s)
    end
    for _, l in ipairs(lines) do log.info("%s", l) end
    if SLACK and SLACK ~= "" then
      notify.slack { webhook = SLACK, channel = os.getenv("SLACK_CHANNEL") or "#security", text = table.concat(lines, "\n") }
    else
      log.warn("SLACK_WEBHOOK is not set: tell the security team yourself")
    end
    return { isolated = not ctx.skipped(ISOLATE), evidence = ctx.outputs[EVIDENCE].path, rotate = a.secrets }
  end,
}
