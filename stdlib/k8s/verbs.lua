--- The kubectl verbs operators use, with kubectl's semantics, as methods of
-- the client (stdlib/k8s.lua documents them): scale, stop_workloads,
-- start_workloads, rollout_restart,
-- rollout_status, rollout_history, rollout_undo, set_image, set_env,
-- users_of, events, wait, top, proxy_get (logs are in k8s/logs.lua).
local cjson = require("cjson")
local host = require("runbook.host")
local client = require("k8s.client")
local duration = require("duration")
local heartbeat = require("runbook.heartbeat")

local Client = client.Client
local raise, write, path_of, qualified, target_of = client.raise, client.write, client.path, client.qualified, client.target

local M = {}

local function secs(v, what, dflt)
  if v == nil then return dflt end
  return duration.check(v, what)
end

local function copy(v)
  if type(v) ~= "table" then return v end
  local out = {}
  for k, x in pairs(v) do out[k] = copy(x) end
  return setmetatable(out, getmetatable(v))
end
M.copy = copy

local function now_rfc3339()
  return os.date("!%Y-%m-%dT%H:%M:%SZ")
end

-- A workload ("deploy/x", or a bare name meaning a deployment) and its current object.
function Client:workload(a, b, verb)
  local t, name, opts = client.target_args(a, b, nil, false, verb)
  if not name then t, name = "deployments", t end
  opts = opts or {}
  local r = self:resource(t)
  local ns = self:ns(opts)
  local obj = self:call { path = path_of(r, ns, name), op = verb,
    what = ('%s "%s" in namespace %s'):format(qualified(r), name, ns) }
  return r, ns, name, obj, opts
end

local function pod_spec(obj)
  if obj.kind == "Pod" then return obj.spec, { "spec" } end
  return obj.spec.template.spec, { "spec", "template", "spec" }
end

-- { spec = { template = { spec = inner } } } for a path like {"spec","template","spec"}
local function nest(path, inner)
  for i = #path, 1, -1 do inner = { [path[i]] = inner } end
  return inner
end

-- ---- scale and rollouts ------------------------------------------------------

function Client:scale(a, b, c, d)
  local ref, replicas, opts
  if type(b) == "string" then ref, replicas, opts = a .. "/" .. b, c, d else ref, replicas, opts = a, b, c end
  if type(replicas) ~= "number" or replicas < 0 or replicas ~= math.floor(replicas) then
    error("k8s.scale: replicas must be a whole number >= 0", 2)
  end
  replicas = math.tointeger(replicas)
  local r, ns, name, obj = self:workload(ref, opts, "scale")
  if not r.subresources.scale then
    raise { op = "scale", code = "not_scalable", message = ("%s cannot be scaled"):format(qualified(r)) }
  end
  local cur = obj.spec and obj.spec.replicas
  if opts and opts.current_replicas and cur ~= opts.current_replicas then
    raise { op = "scale", code = "precondition",
      message = ("expected replicas to be %d, was %s"):format(opts.current_replicas, tostring(cur)) }
  end
  return (write {
    op = "scale", target = target_of(r, ns, name), summary = ("scale %s %s to %d"):format(r.singular, name, replicas),
    before = { spec = { replicas = cur } },
    send = function()
      local s = self:call { method = "PATCH", path = path_of(r, ns, name, "scale"), op = "scale",
        content_type = "application/merge-patch+json", body = { spec = { replicas = replicas } },
        what = ('%s "%s"'):format(qualified(r), name), query = { fieldManager = "runbook" } }
      return s
    end,
    changes = function(before, after)
      return require("k8s.diff").changes(before, { spec = { replicas = after.spec and after.spec.replicas } })
    end,
  })
end

function Client:rollout_restart(a, b)
  local r, ns, name, obj, opts = self:workload(a, b, "rollout_restart")
  if obj.spec and obj.spec.paused then
    raise { op = "rollout_restart", code = "paused",
      message = ("can't restart paused %s %s (run rollout resume first)"):format(r.singular, name) }
  end
  return (write {
    op = "rollout_restart", target = target_of(r, ns, name), summary = ("restart %s %s"):format(r.singular, name),
    before = obj,
    send = function()
      return self:call { method = "PATCH", path = path_of(r, ns, name), op = "rollout_restart",
        content_type = "application/strategic-merge-patch+json",
        body = { spec = { template = { metadata = { annotations = {
          ["kubectl.kubernetes.io/restartedAt"] = opts.at or now_rfc3339() } } } } },
        what = ('%s "%s"'):format(qualified(r), name), query = { fieldManager = "runbook" } }
    end,
  })
end

local function condition(obj, ctype)
  for _, c in ipairs((obj.status or {}).conditions or {}) do
    if c.type == ctype then return c end
  end
end
M.condition = condition

--- kubectl's DeploymentStatusViewer: message, done; raises on ProgressDeadlineExceeded.
function M.deployment_status(d)
  local name, spec, st = d.metadata.name, d.spec or {}, d.status or {}
  if (d.metadata.generation or 0) > (st.observedGeneration or 0) then
    return "Waiting for deployment spec update to be observed...", false
  end
  local c = condition(d, "Progressing")
  if c and c.reason == "ProgressDeadlineExceeded" then
    raise { op = "rollout_status", code = "ProgressDeadlineExceeded",
      message = ("deployment %q exceeded its progress deadline"):format(name) }
  end
  local want, updated = spec.replicas or 1, st.updatedReplicas or 0
  local replicas, available = st.replicas or 0, st.availableReplicas or 0
  if updated < want then
    return ("Waiting for deployment %q rollout to finish: %d out of %d new replicas have been updated...")
      :format(name, updated, want), false
  end
  if replicas > updated then
    return ("Waiting for deployment %q rollout to finish: %d old replicas are pending termination...")
      :format(name, replicas - updated), false
  end
  if available < updated then
    return ("Waiting for deployment %q rollout to finish: %d of %d updated replicas are available...")
      :format(name, available, updated), false
  end
  return ("deployment %q successfully rolled out"):format(name), true
end

-- The next event of a wait's watch, waiting at most 2 s (the heartbeat beats
-- between). nil, "expired" when the server no longer has the history from
-- the watch's resourceVersion (410 Expired): the caller reads again and
-- watches from there, as client-go's informers re-list.
local function next_event(w, deadline)
  heartbeat.beat()
  local ok, ty, o = pcall(w.next, w, math.min(2, math.max(0.001, deadline - host.now())))
  if ok then return ty, o end
  if type(ty) == "table" and ty.code == "410" then return nil, "expired" end
  error(ty, 0)
end

-- Waiting reasons a pod does not get out of by itself (waiting longer does not help).
local STUCK = { CrashLoopBackOff = true, ImagePullBackOff = true, ErrImagePull = true, InvalidImageName = true,
  CreateContainerConfigError = true, CreateContainerError = true, RunContainerError = true }
M.STUCK = STUCK

-- For rollout_status{fail_fast}: a pod of the deployment's newest ReplicaSet
-- whose container is stuck, as a structured error; nil while none is.
function Client:stuck_rollout(r, ns, d)
  if (d.metadata.generation or 0) > ((d.status or {}).observedGeneration or 0) then return nil end
  local revs = self:revisions(r, ns, d)
  local newest = revs[#revs]
  local hash = newest and ((newest.template.metadata or {}).labels or {})["pod-template-hash"]
  if not hash then return nil end
  local sel = { "pod-template-hash=" .. hash }
  for k, v in pairs((d.spec.selector or {}).matchLabels or {}) do sel[#sel + 1] = k .. "=" .. v end
  table.sort(sel)
  for _, p in ipairs(self:list("pods", { namespace = ns, label_selector = table.concat(sel, ",") })) do
    for _, cs in ipairs((p.status or {}).containerStatuses or {}) do
      local w = (cs.state or {}).waiting
      if w and STUCK[w.reason] then
        return { op = "rollout_status", code = w.reason, pod = p.metadata.name, container = cs.name,
          message = ("deployment %q will not finish rolling out: pod %s container %s is %s (%d restarts)%s")
            :format(d.metadata.name, p.metadata.name, cs.name, w.reason, cs.restartCount or 0,
              w.message and (": " .. w.message) or "") }
      end
    end
  end
end

--- kubectl's status of a StatefulSet's rolling update (RollingUpdate only):
-- done once the spec is observed, every replica ready, and every pod at the
-- update revision (or, with a partition, the pods from it up).
function M.statefulset_status(s)
  local name, spec, st = s.metadata.name, s.spec or {}, s.status or {}
  local strategy = spec.updateStrategy or {}
  if (strategy.type or "RollingUpdate") ~= "RollingUpdate" then
    raise { op = "rollout_status", code = "unsupported",
      message = ("statefulset %q: rollout status is only available for RollingUpdate strategy type"):format(name) }
  end
  if (st.observedGeneration or 0) == 0 or (s.metadata.generation or 0) > st.observedGeneration then
    return "Waiting for statefulset spec update to be observed...", false
  end
  local want = spec.replicas or 1
  if (st.readyReplicas or 0) < want then
    return ("Waiting for %d pods to be ready..."):format(want - (st.readyReplicas or 0)), false
  end
  local partition = (strategy.rollingUpdate or {}).partition or 0
  if partition > 0 then
    if (st.updatedReplicas or 0) < want - partition then
      return ("Waiting for partitioned roll out to finish: %d out of %d new pods have been updated...")
        :format(st.updatedReplicas or 0, want - partition), false
    end
    return ("partitioned roll out complete: %d new pods have been updated..."):format(st.updatedReplicas or 0), true
  end
  if st.updateRevision ~= st.currentRevision then
    return ("waiting for statefulset rolling update to complete %d pods at revision %s...")
      :format(st.updatedReplicas or 0, tostring(st.updateRevision)), false
  end
  return ("statefulset rolling update complete %d pods at revision %s..."):format(st.currentReplicas or 0,
    tostring(st.currentRevision)), true
end

local ROLLOUT_STATUS = { Deployment = M.deployment_status, StatefulSet = M.statefulset_status }

--- Watches the deployment (or StatefulSet) until it is rolled out (returns {message, deployment}),
-- its progress deadline passes or `timeout` does (all raise). With
-- opts.fail_fast a deployment's wait also raises (code = the waiting reason, e.g.
-- "CrashLoopBackOff") as soon as a pod of the new ReplicaSet is stuck in a
-- state that waiting does not end (crash loop, image pull, bad config).
-- In a dry run the rollout would follow simulated writes (the deployment may
-- not even exist yet): it says what it would wait for and returns at once
-- ({message, dry_run = true}).
function Client:rollout_status(a, b)
  if require("gate").dry_run() then
    local t, name, opts = client.target_args(a, b, nil, false, "rollout_status")
    local msg = ("would wait up to %s for the rollout of %s in namespace %s"):format(
      duration.format(secs((opts or {}).timeout, "k8s.rollout_status timeout", 300)), name and (t .. "/" .. name) or t,
      self:ns(opts or {}))
    require("log").info("%s", msg)
    return { message = msg, dry_run = true }
  end
  local r, ns, name, obj, opts = self:workload(a, b, "rollout_status")
  local status_of = ROLLOUT_STATUS[r.kind]
  if not status_of then error("k8s.rollout_status: only deployments and statefulsets are supported", 2) end
  local timeout = secs(opts.timeout, "k8s.rollout_status timeout", 300)
  local progress = opts.progress
  if progress == nil or progress == true then progress = function(m) require("log").info("%s", m) end end
  local deadline = host.now() + timeout
  local last
  local function check(d)
    local msg, done = status_of(d)
    if msg ~= last and progress and not done then progress(msg) end
    require("runbook.output").waiting(done and "" or ("rollout of %s: %s"):format(name, msg), deadline - host.now())
    last = msg
    if done then return { message = msg, deployment = d } end
  end
  local res = check(obj)
  local checked = -math.huge
  local function stuck() -- at most every 2 s: it lists ReplicaSets and pods
    if not opts.fail_fast or r.kind ~= "Deployment" or res or host.now() - checked < 2 then return end
    checked = host.now()
    local e = self:stuck_rollout(r, ns, obj)
    if e then raise(e) end
  end
  while not res do
    stuck()
    local left = deadline - host.now()
    if left <= 0 then break end
    local w <close> = self:watch_open(r, { namespace = ns, name = name, timeout = left,
      resource_version = obj.metadata.resourceVersion })
    while not res do
      local ty, o = next_event(w, deadline)
      if ty == "DELETED" then
        raise { op = "rollout_status", code = "404",
          message = ("deployment %q was deleted while waiting for its rollout"):format(name) }
      elseif ty then obj = o; res = check(o)
      elseif o == "expired" then
        obj = self:call { path = path_of(r, ns, name), op = "rollout_status" }
        res = check(obj)
        break
      elseif host.now() >= deadline or o ~= "wait" then break end
      stuck()
    end
  end
  if res then return res end
  raise { op = "rollout_status", code = "timeout", retryable = true,
    message = ("timed out after %s waiting for the rollout of deployment %q: %s"):format(duration.format(timeout), name,
      tostring(last)) }
end

--- stop_workloads({"deploy/a", ...}, {namespace, timeout = "2m"}): scale each
-- to 0 and wait until none of their pods is left (writers stopped, consumers
-- out of their group). Returns what start_workloads needs: {{target,
-- namespace, replicas}...} with each one's replicas before. In a dry run
-- nothing is waited for.
function Client:stop_workloads(targets, opts)
  opts = opts or {}
  if type(targets) ~= "table" or #targets == 0 then error("k8s.stop_workloads: expected a list of workloads", 2) end
  local timeout = secs(opts.timeout, "k8s.stop_workloads timeout", 120)
  local saved, objs = {}, {}
  for i, t in ipairs(targets) do
    local _, ns, _, obj = self:workload(t, { namespace = opts.namespace }, "stop_workloads")
    saved[i], objs[i] = { target = t, namespace = ns, replicas = obj.spec.replicas or 1 }, obj
  end
  for _, s in ipairs(saved) do
    if s.replicas > 0 then self:scale(s.target, 0, { namespace = s.namespace }) end
  end
  if require("gate").dry_run() then return saved end
  local deadline = host.now() + timeout
  for i, s in ipairs(saved) do
    while true do
      local left = #self:pods_of(objs[i], s.namespace)
      if left == 0 then break end
      if host.now() >= deadline then
        raise { op = "stop_workloads", code = "timeout", retryable = true, message = ("%s still has %d pods after %s"):format(
          s.target, left, duration.format(timeout)) }
      end
      heartbeat.sleep(host, 0.5)
    end
  end
  return saved
end

--- start_workloads(saved, {timeout = "5m"}): scale each workload stop_workloads
-- stopped back to its replicas, then wait for each rollout (fail_fast).
function Client:start_workloads(saved, opts)
  opts = opts or {}
  for _, s in ipairs(saved) do
    if s.replicas > 0 then self:scale(s.target, s.replicas, { namespace = s.namespace }) end
  end
  if require("gate").dry_run() then return end
  for _, s in ipairs(saved) do
    if s.replicas > 0 then
      self:rollout_status(s.target, { namespace = s.namespace, timeout = opts.timeout or "5m", fail_fast = true,
        progress = false })
    end
  end
end

local REV = "deployment.kubernetes.io/revision"

-- The deployment's ReplicaSets (controller owner = its uid), with revisions.
function Client:revisions(r, ns, d)
  local sel = {}
  for k, v in pairs(((d.spec or {}).selector or {}).matchLabels or {}) do sel[#sel + 1] = k .. "=" .. v end
  table.sort(sel)
  local rss = self:list("replicasets.apps", { namespace = ns, label_selector = table.concat(sel, ",") })
  local out = {}
  for _, rs in ipairs(rss) do
    for _, ref in ipairs(rs.metadata.ownerReferences or {}) do
      if ref.controller and ref.uid == d.metadata.uid then
        local ann = rs.metadata.annotations or {}
        local images = {}
        for _, c in ipairs(rs.spec.template.spec.containers or {}) do images[#images + 1] = c.image end
        out[#out + 1] = { revision = tonumber(ann[REV] or "0") or 0, replicaset = rs.metadata.name,
          change_cause = ann["kubernetes.io/change-cause"], images = images, template = rs.spec.template,
          annotations = ann, created = rs.metadata.creationTimestamp, replicas = rs.spec.replicas }
      end
    end
  end
  table.sort(out, function(x, y) return x.revision < y.revision end)
  return out
end

function Client:rollout_history(a, b)
  local r, ns, _, d = self:workload(a, b, "rollout_history")
  return self:revisions(r, ns, d)
end

local SKIP_ANN = { ["kubectl.kubernetes.io/last-applied-configuration"] = true, [REV] = true,
  ["deployment.kubernetes.io/revision-history"] = true, ["deployment.kubernetes.io/desired-replicas"] = true,
  ["deployment.kubernetes.io/max-replicas"] = true, ["deprecated.deployment.rollback.to"] = true }

local function same(x, y) return cjson.encode { x } == cjson.encode { y } end
-- Comparable templates: JSON with sorted keys, without the pod-template-hash label.
local function canon(v)
  if type(v) ~= "table" then return v end
  local keys = {}
  for k in pairs(v) do keys[#keys + 1] = k end
  if #v > 0 then
    local out = {}
    for i, x in ipairs(v) do out[i] = canon(x) end
    return out
  end
  table.sort(keys, function(p, q) return tostring(p) < tostring(q) end)
  local out = {}
  for _, k in ipairs(keys) do out[#out + 1] = { k, canon(v[k]) } end
  return out
end

local RESTARTED_AT = "kubectl.kubernetes.io/restartedAt"

--- The deployment's last real change: the revision that introduced its
-- current template, looking past `rollout restart`s (a revision whose template
-- differs from the one before only in kubectl's restartedAt annotation), and
-- the revision before it, the one to roll back to. Returns {revision, images,
-- change_cause, created (epoch seconds; a ReplicaSet's creation, so a
-- rollback to an old template counts from when that template first ran),
-- age (seconds), restarts (restart revisions since), previous = {revision,
-- images, change_cause} or nil}.
function Client:last_change(a, b)
  local r, ns, name, d = self:workload(a, b, "last_change")
  local revs = self:revisions(r, ns, d)
  local function key(tmpl)
    local t = copy(tmpl)
    local md = t.metadata or {}
    if md.labels then md.labels["pod-template-hash"] = nil end
    if md.annotations then
      md.annotations[RESTARTED_AT] = nil
      if next(md.annotations) == nil then md.annotations = nil end
    end
    return cjson.encode { canon(t) }
  end
  local cur = key(d.spec.template)
  local i = #revs
  while i >= 1 and key(revs[i].template) ~= cur do i = i - 1 end -- a rollout not yet observed
  if i < 1 then
    raise { op = "last_change", code = "no_revision",
      message = ("no ReplicaSet of deployment %q has its current template yet"):format(name) }
  end
  local top = i
  while i > 1 and key(revs[i - 1].template) == cur do i = i - 1 end
  local rev, prev = revs[i], revs[i - 1]
  local created = require("k8s.config").parse_time(rev.created)
  return {
    revision = rev.revision, images = rev.images, change_cause = rev.change_cause, created = created,
    age = created and math.max(0, os.time() - created) or nil, restarts = top - i,
    previous = prev and { revision = prev.revision, images = prev.images, change_cause = prev.change_cause } or nil,
  }
end

--- Roll back to the previous revision or opts.to_revision, as kubectl does:
-- one JSON patch replacing the pod template and the annotations.
function Client:rollout_undo(a, b)
  local r, ns, name, d, opts = self:workload(a, b, "rollout_undo")
  local revs = self:revisions(r, ns, d)
  local to = opts.to_revision or 0
  local pick
  if to == 0 then
    pick = #revs >= 2 and revs[#revs - 1] or nil
    if not pick then
      raise { op = "rollout_undo", code = "no_revision", message = ("no rollout history found for deployment %q"):format(name) }
    end
  else
    for _, rv in ipairs(revs) do if rv.revision == to then pick = rv end end
    if not pick then
      raise { op = "rollout_undo", code = "no_revision",
        message = ("unable to find specified revision %d in history of deployment %q"):format(to, name) }
    end
  end
  local tmpl = copy(pick.template)
  if tmpl.metadata and tmpl.metadata.labels then tmpl.metadata.labels["pod-template-hash"] = nil end
  if same(canon(tmpl), canon(d.spec.template)) then
    return d, { summary = ("skipped rollback (current template already matches revision %d)"):format(pick.revision) }
  end
  local ann = copy((d.metadata.annotations) or {})
  for k, v in pairs(pick.annotations) do if not SKIP_ANN[k] then ann[k] = v end end
  return (write {
    op = "rollout_undo", target = target_of(r, ns, name),
    summary = ("roll back deployment %s to revision %d"):format(name, pick.revision), before = d,
    send = function()
      return self:call { method = "PATCH", path = path_of(r, ns, name), op = "rollout_undo",
        content_type = "application/json-patch+json",
        body = client.array { { op = "replace", path = "/spec/template", value = tmpl },
          { op = "replace", path = "/metadata/annotations", value = ann } },
        what = ('%s "%s"'):format(qualified(r), name), query = { fieldManager = "runbook" } }
    end,
  })
end

-- ---- set image / set env -------------------------------------------------------

--- set_image("deploy/x", {container = "image", ["*"] = "image"}): a strategic
-- merge patch of the named containers (init containers too), as kubectl sends.
function Client:set_image(ref, images, opts)
  if type(images) ~= "table" or next(images) == nil then
    error("k8s.set_image: expected {container = \"image\", ...}", 2)
  end
  local r, ns, name, obj = self:workload(ref, opts, "set_image")
  local spec, path = pod_spec(obj)
  local patch, found = {}, {}
  for _, field in ipairs { "initContainers", "containers" } do
    for _, ct in ipairs(spec[field] or {}) do
      local img = images[ct.name] or images["*"]
      if img then
        patch[field] = patch[field] or client.array()
        table.insert(patch[field], { name = ct.name, image = img })
        found[ct.name] = true
      end
    end
  end
  for cname in pairs(images) do
    if cname ~= "*" and not found[cname] then
      raise { op = "set_image", code = "404",
        message = ("unable to find container named %q in %s %s"):format(cname, r.singular, name) }
    end
  end
  local parts = {}
  for cname, img in pairs(images) do parts[#parts + 1] = cname .. "=" .. img end
  table.sort(parts)
  return (write {
    op = "set_image", target = target_of(r, ns, name),
    summary = ("set image of %s %s: %s"):format(r.singular, name, table.concat(parts, ", ")), before = obj,
    send = function()
      return self:call { method = "PATCH", path = path_of(r, ns, name), op = "set_image",
        content_type = "application/strategic-merge-patch+json", body = nest(path, patch),
        what = ('%s "%s"'):format(qualified(r), name), query = { fieldManager = "runbook" } }
    end,
  })
end

-- kubectl set env --from: a key becomes an environment name.
local function env_name(prefix, key)
  return (prefix or "") .. key:upper():gsub("[^%w_]", "_")
end

local function env_entry(name, v)
  if type(v) == "table" then
    if v.secret then return { name = name, valueFrom = { secretKeyRef = { name = v.secret, key = v.key or name } } } end
    if v.configmap then return { name = name, valueFrom = { configMapKeyRef = { name = v.configmap, key = v.key or name } } } end
    if v.field then return { name = name, valueFrom = { fieldRef = { fieldPath = v.field } } } end
    error(("k8s.set_env: %s: expected a string, false, {secret=, key=}, {configmap=, key=} or {field=}"):format(name), 4)
  end
  return { name = name, value = tostring(v) }
end

--- set_env("deploy/x", {NAME = "v", OLD = false, PW = {secret = "db", key = "password"}},
-- {container = "backend", from_secret = "db", prefix = "DB_"}): read, change, replace;
-- a 409 (someone wrote in between) is retried from a fresh read.
function Client:set_env(a, env, rest)
  if type(env) ~= "table" then error("k8s.set_env: expected {NAME = value, ...}", 2) end
  rest = rest or {}
  for attempt = 1, 5 do
    local r, ns, name, obj = self:workload(a, rest, "set_env")
    local want = {}
    for k, v in pairs(env) do want[#want + 1] = { k, v } end
    for _, src in ipairs { { rest.from_secret, "secrets", "secret" }, { rest.from_configmap, "configmaps", "configmap" } } do
      if src[1] then
        local o = self:get(src[2], src[1], { namespace = ns })
        local keys = {}
        for k in pairs(o.data or {}) do keys[#keys + 1] = k end
        table.sort(keys)
        for _, k in ipairs(keys) do want[#want + 1] = { env_name(rest.prefix, k), { [src[3]] = src[1], key = k } } end
      end
    end
    table.sort(want, function(x, y) return x[1] < y[1] end)
    local new = copy(obj)
    local spec = pod_spec(new)
    local touched = false
    for _, ct in ipairs(spec.containers or {}) do
      if not rest.container or rest.container == ct.name then
        touched = true
        local list = ct.env or {}
        for _, kv in ipairs(want) do
          local idx
          for i, e in ipairs(list) do if e.name == kv[1] then idx = i end end
          if kv[2] == false then
            if idx then table.remove(list, idx) end
          elseif idx then list[idx] = env_entry(kv[1], kv[2])
          else list[#list + 1] = env_entry(kv[1], kv[2]) end
        end
        ct.env = #list > 0 and client.array(list) or nil
      end
    end
    if not touched then
      raise { op = "set_env", code = "404",
        message = ("unable to find container named %q in %s %s"):format(tostring(rest.container), r.singular, name) }
    end
    local names = {}
    for _, kv in ipairs(want) do names[#names + 1] = kv[1] .. (kv[2] == false and "-" or "") end
    local ok, res = pcall(write, {
      op = "set_env", target = target_of(r, ns, name),
      summary = ("set env of %s %s: %s"):format(r.singular, name, table.concat(names, ", ")), before = obj,
      send = function()
        return self:call { method = "PUT", path = path_of(r, ns, name), op = "set_env", body = new,
          what = ('%s "%s"'):format(qualified(r), name), query = { fieldManager = "runbook" } }
      end,
    })
    if ok then return res end
    if not (type(res) == "table" and res.code == "409" and attempt < 5) then error(res, 0) end
  end
end

-- ---- who uses a Secret or ConfigMap -------------------------------------------

-- How a pod spec names a Secret ("secret") or ConfigMap ("configmap"): "volume",
-- "envFrom", "env" (each once, in that order), from every container and init
-- container, projected volumes included.
local function references(spec, kind, name)
  local ref, key = kind == "secret" and "secretRef" or "configMapRef", kind == "secret" and "secretKeyRef" or "configMapKeyRef"
  local found = {}
  for _, v in ipairs(spec.volumes or {}) do
    if kind == "secret" and v.secret and v.secret.secretName == name or kind == "configmap" and v.configMap and v.configMap.name == name then
      found.volume = true
    end
    for _, src in ipairs(v.projected and v.projected.sources or {}) do
      local s = kind == "secret" and src.secret or src.configMap
      if s and s.name == name then found.volume = true end
    end
  end
  for _, list in ipairs { spec.containers or {}, spec.initContainers or {} } do
    for _, c in ipairs(list) do
      for _, ef in ipairs(c.envFrom or {}) do if ef[ref] and ef[ref].name == name then found.envFrom = true end end
      for _, e in ipairs(c.env or {}) do
        if e.valueFrom and e.valueFrom[key] and e.valueFrom[key].name == name then found.env = true end
      end
    end
  end
  local how = {}
  for _, h in ipairs { "volume", "envFrom", "env" } do if found[h] then how[#how + 1] = h end end
  return how
end

-- Kinds whose pods read a Secret or ConfigMap: a rollout restart reloads the first three.
local USERS = { { "deployments", true }, { "statefulsets", true }, { "daemonsets", true }, { "cronjobs", false } }

--- users_of("secret/NAME" | "configmap/NAME", {namespace=}) -> {{kind, name, how, restartable}...}:
-- the workloads whose pod template names it (kind "deployments", ...; how
-- {"volume", "envFrom", "env"}); a kind the server does not serve is passed over.
function Client:users_of(a, b)
  local t, name, opts = client.target_args(a, b, nil, false, "users_of")
  local kind = ({ secret = "secret", secrets = "secret", configmap = "configmap", configmaps = "configmap", cm = "configmap" })[t]
  if not kind or not name then error("k8s.users_of: expected \"secret/NAME\" or \"configmap/NAME\"", 2) end
  local ns, out = self:ns(opts or {}), {}
  for _, u in ipairs(USERS) do
    local ok, items = pcall(self.list, self, u[1], { namespace = ns })
    if not ok and not (type(items) == "table" and items.code == "unknown_resource") then error(items, 0) end
    for _, o in ipairs(ok and items or {}) do
      local tmpl = u[1] == "cronjobs" and o.spec.jobTemplate.spec.template or o.spec.template
      local how = references(tmpl.spec or {}, kind, name)
      if #how > 0 then out[#out + 1] = { kind = u[1], name = o.metadata.name, how = how, restartable = u[2] } end
    end
  end
  return out
end

-- ---- pods, events ------------------------------------------------------------

local function ready(pod)
  local c = condition(pod, "Ready")
  return c and c.status == "True"
end
M.pod_ready = ready

-- Pods of a workload: by its selector.
function Client:pods_of(obj, ns)
  local sel = {}
  local s = obj.spec and obj.spec.selector
  for k, v in pairs((s and (s.matchLabels or (not s.matchExpressions and s))) or {}) do sel[#sel + 1] = k .. "=" .. v end
  table.sort(sel)
  return self:list("pods", { namespace = ns, label_selector = table.concat(sel, ",") })
end

local function event_time(e)
  return e.lastTimestamp or e.eventTime or (e.series and e.series.lastObservedTime) or e.firstTimestamp
    or e.metadata.creationTimestamp or ""
end
M.event_time = event_time

--- Events of a namespace or of one object ("deploy/x"), oldest first;
-- opts.type ("Warning"), opts.reason, opts.since (a duration).
function Client:events(a, b)
  local opts, t, name
  if type(a) == "table" then opts = a
  elseif type(a) == "string" then t, name, opts = client.target_args(a, b, nil, true, "events")
  else opts = {} end
  opts = opts or {}
  if opts.object then t, name = client.target_args(opts.object, nil, nil, true, "events") end
  local fields = {}
  if name then
    local r = self:resource(t)
    fields[#fields + 1] = "involvedObject.kind=" .. r.kind
    fields[#fields + 1] = "involvedObject.name=" .. name
  end
  if opts.type then fields[#fields + 1] = "type=" .. opts.type end
  if opts.reason then fields[#fields + 1] = "reason=" .. opts.reason end
  local evs = self:list("events", { namespace = opts.namespace, all_namespaces = opts.all_namespaces,
    field_selector = #fields > 0 and table.concat(fields, ",") or nil })
  local cutoff = opts.since and os.date("!%Y-%m-%dT%H:%M:%SZ", os.time() - duration.check(opts.since, "k8s.events since"))
  local out = {}
  for _, e in ipairs(evs) do
    if not cutoff or event_time(e) >= cutoff then out[#out + 1] = e end
  end
  table.sort(out, function(x, y) return event_time(x) < event_time(y) end)
  return client.array(out)
end

-- ---- wait -----------------------------------------------------------------------

local function condition_test(cond)
  if type(cond) == "function" then return cond end
  if type(cond) ~= "string" then error("k8s.wait: condition must be a string or a function", 3) end
  local ctype, want = cond:match("^condition=([^=]+)=?(.*)$")
  if not ctype then ctype, want = cond, "" end
  ctype = ctype:sub(1, 1):upper() .. ctype:sub(2)
  want = want ~= "" and want or "True"
  return function(obj)
    local c = condition(obj, ctype)
    if not c then return false end
    return c.status:lower() == want:lower()
  end
end

--- Wait until `cond` holds for the object ("pod/x", "deploy/x") or for every
-- object of a set ("pods" with opts.selector), or until it is deleted
-- (cond "delete"). cond: "Ready", "Available", "condition=Progressing=False",
-- or a function(obj) -> bool. Returns the objects; raises on timeout (default 30s).
function Client:wait(a, b, c)
  local t, name, cond, opts
  if type(a) == "string" and a:find("/") then t, name = a:match("^([^/]+)/(.+)$"); cond, opts = b, c
  else t, cond, opts = a, b, c end
  opts = opts or {}
  local r = self:resource(t)
  local ns = self:ns(opts)
  local deleting = cond == "delete" or cond == "deleted"
  local test = not deleting and condition_test(cond)
  local timeout = secs(opts.timeout, "k8s.wait timeout", 30)
  local deadline = host.now() + timeout
  local sel = { namespace = ns, label_selector = opts.selector,
    field_selector = name and ("metadata.name=" .. name) or opts.field_selector }
  local set, rv
  local function relist()
    local items, meta = self:list(r, sel)
    set, rv = {}, meta.resourceVersion
    for _, o in ipairs(items) do set[o.metadata.name] = o end
  end
  relist()
  if not deleting and next(set) == nil then
    raise { op = "wait", code = "404",
      message = name and ('%s "%s" not found'):format(qualified(r), name) or ("no matching %s found"):format(qualified(r)) }
  end
  local function satisfied()
    if deleting then return next(set) == nil end
    for _, o in pairs(set) do if not test(o) then return false end end
    return true
  end
  -- In a dry run what it waits for would follow a simulated write: say so, return the objects as they are.
  local simulated = require("gate").dry_run() and not satisfied()
  if simulated then
    require("log").info("would wait up to %s for %s of %s%s", duration.format(timeout),
      deleting and "the deletion" or tostring(cond), qualified(r), name and (" " .. name) or "")
  end
  while not simulated and not satisfied() do
    local left = deadline - host.now()
    if left <= 0 then
      local pending = {}
      for n in pairs(set) do pending[#pending + 1] = n end
      table.sort(pending)
      raise { op = "wait", code = "timeout", retryable = true,
        message = ("timed out after %s waiting for %s of %s %s"):format(duration.format(timeout),
          deleting and "deletion" or ("condition " .. tostring(cond)), qualified(r), table.concat(pending, ", ")) }
    end
    local w <close> = self:watch_open(r, { namespace = ns, label_selector = sel.label_selector,
      field_selector = sel.field_selector, resource_version = rv, timeout = left })
    while not satisfied() and host.now() < deadline do
      local ty, o = next_event(w, deadline)
      if ty == "DELETED" then set[o.metadata.name] = nil
      elseif ty then set[o.metadata.name] = o end
      if ty then rv = o.metadata.resourceVersion end
      if o == "expired" then relist() end
      if not ty and o ~= "wait" then break end
    end
  end
  local out = {}
  for _, o in pairs(set) do out[#out + 1] = o end
  table.sort(out, function(x, y) return x.metadata.name < y.metadata.name end)
  return out
end

-- ---- top, proxy --------------------------------------------------------------------

local SUFFIX = { n = 1e-9, u = 1e-6, m = 1e-3, [""] = 1, k = 1e3, K = 1e3, M = 1e6, G = 1e9, T = 1e12, P = 1e15,
  E = 1e18, Ki = 1024, Mi = 1024 ^ 2, Gi = 1024 ^ 3, Ti = 1024 ^ 4, Pi = 1024 ^ 5, Ei = 1024 ^ 6 }

--- A Kubernetes quantity ("250m", "128Mi", "1.5", "12345n") as a number.
function M.quantity(q)
  if type(q) == "number" then return q end
  local num, suf = tostring(q):match("^([%d%.eE+-]-)(%a*)$")
  local f = SUFFIX[suf or ""]
  if not num or num == "" or not f or not tonumber(num) then return nil end
  return tonumber(num) * f
end

--- A quantity times `factor`, in its own unit: ("256Mi", 2) -> "512Mi", ("500m", 1.5) -> "750m";
-- nil when q is not a plain number with an optional unit.
function M.scale_quantity(q, factor)
  local n, unit = tostring(q):match("^([%d.]+)(%a*)$")
  if not n or not tonumber(n) then return nil end
  local v = tonumber(n) * factor
  return (math.floor(v) == v and ("%d"):format(v) or ("%.1f"):format(v)) .. unit
end

--- Resource usage from the metrics API: top("pods"|"nodes", opts) ->
-- { {name, namespace, cpu_millicores, memory_bytes, containers}, ... } sorted by
-- opts.sort_by ("cpu" or "memory", highest first) or name.
function Client:top(kind, opts)
  opts = opts or {}
  local node = kind == "nodes" or kind == "node" or kind == "no"
  local r = self:resource(node and "nodes.metrics.k8s.io" or "pods.metrics.k8s.io")
  local items = self:list(r, { namespace = opts.namespace, all_namespaces = opts.all_namespaces,
    label_selector = opts.selector })
  local out = {}
  for _, m in ipairs(items) do
    local e = { name = m.metadata.name, namespace = m.metadata.namespace, cpu_millicores = 0, memory_bytes = 0 }
    local usages = node and { { name = m.metadata.name, usage = m.usage } } or m.containers or {}
    if not node then e.containers = {} end
    for _, ct in ipairs(usages) do
      local cpu = (M.quantity(ct.usage and ct.usage.cpu) or 0) * 1000
      local mem = M.quantity(ct.usage and ct.usage.memory) or 0
      e.cpu_millicores, e.memory_bytes = e.cpu_millicores + cpu, e.memory_bytes + mem
      if e.containers then e.containers[#e.containers + 1] = { name = ct.name, cpu_millicores = math.floor(cpu + 0.5), memory_bytes = math.floor(mem) } end
    end
    e.cpu_millicores, e.memory_bytes = math.floor(e.cpu_millicores + 0.5), math.floor(e.memory_bytes)
    out[#out + 1] = e
  end
  local key = opts.sort_by == "cpu" and "cpu_millicores" or opts.sort_by == "memory" and "memory_bytes"
  table.sort(out, function(x, y)
    if key and x[key] ~= y[key] then return x[key] > y[key] end
    return x.name < y.name
  end)
  return out
end

--- GET an app's HTTP endpoint through the API server's proxy:
-- proxy_get("svc/backend:8000", "/health") or ("pod/NAME:8000", path).
-- Returns {status, body, json}; opts.check raises for a status >= 400.
function Client:proxy_get(target, path, opts)
  opts = opts or {}
  local t, name = client.target_args(target, nil, nil, true, "proxy_get")
  local r = self:resource(t)
  if r.kind ~= "Service" and r.kind ~= "Pod" then error("k8s.proxy_get: the target must be a service or a pod", 2) end
  local ns = self:ns(opts)
  path = tostring(path or "/"):gsub("^/", "")
  local all = setmetatable({}, { __index = function() return true end })
  local body, status, ctype = self:call { path = path_of(r, ns, name, "proxy") .. "/" .. path, op = "proxy_get",
    raw = true, accept = "*/*", allow = all, timeout = opts.timeout, query = opts.query }
  local res = { status = status, body = body, content_type = ctype }
  if (ctype or ""):find("json") then res.json = client.decode(body) end
  if opts.check and status >= 400 then
    raise { op = "proxy_get", code = tostring(status), retryable = status >= 500, status = status,
      message = ("GET %s/%s/proxy/%s: HTTP %d: %s"):format(r.name, name, path, status, (body or ""):sub(1, 200)) }
  end
  return res
end

return M
