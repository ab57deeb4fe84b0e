--- Summaries runbooks decide on: deployment_health and namespace_health.
local client = require("k8s.client")
local verbs = require("k8s.verbs")

local Client = client.Client
local condition = verbs.condition

local M = {}

-- Waiting reasons that mean a pod will not get better by itself.
local BAD_WAITING = { CrashLoopBackOff = true, ImagePullBackOff = true, ErrImagePull = true,
  CreateContainerConfigError = true, CreateContainerError = true, InvalidImageName = true, RunContainerError = true }

local function container_health(cs)
  local st, last = cs.state or {}, (cs.lastState or {}).terminated
  local state = st.running and "running" or st.waiting and "waiting" or st.terminated and "terminated" or "unknown"
  return {
    name = cs.name, ready = cs.ready == true, restarts = cs.restartCount or 0, state = state, image = cs.image,
    waiting_reason = st.waiting and st.waiting.reason or nil,
    waiting_message = st.waiting and st.waiting.message or nil,
    terminated_reason = st.terminated and st.terminated.reason or nil,
    last_termination_reason = last and last.reason or nil,
    last_exit_code = last and last.exitCode or nil,
  }
end

local function pod_health(p)
  local st = p.status or {}
  local ph = { name = p.metadata.name, phase = st.phase or "Unknown", node = p.spec.nodeName,
    ready = verbs.pod_ready(p), restarts = 0, containers = {}, terminating = p.metadata.deletionTimestamp ~= nil }
  for _, cs in ipairs(st.containerStatuses or {}) do
    local c = container_health(cs)
    ph.containers[#ph.containers + 1] = c
    ph.restarts = ph.restarts + c.restarts
    ph.reason = ph.reason or c.waiting_reason or c.terminated_reason
    ph.last_termination_reason = ph.last_termination_reason or c.last_termination_reason
  end
  ph.reason = ph.reason or st.reason
  for _, c in ipairs(st.conditions or {}) do
    if c.type == "PodScheduled" and c.status == "False" then ph.unschedulable = c.message or c.reason or "Unschedulable" end
  end
  return ph
end

--- Whether a label selector ({matchLabels, matchExpressions}) selects these labels.
function M.matches(sel, labels)
  labels = labels or {}
  for k, v in pairs((sel or {}).matchLabels or {}) do
    if labels[k] ~= v then return false end
  end
  for _, e in ipairs((sel or {}).matchExpressions or {}) do
    local have, set = labels[e.key], {}
    for _, v in ipairs(e.values or {}) do set[v] = true end
    local ok = (e.operator == "In" and set[have]) or (e.operator == "NotIn" and not set[have])
      or (e.operator == "Exists" and have ~= nil) or (e.operator == "DoesNotExist" and have == nil)
    if not ok then return false end
  end
  return true
end

-- What deployment health needs of a pod: its labels and pod_health.
local function pod_entry(p)
  return { labels = p.metadata.labels or {}, health = pod_health(p) }
end

-- Pod entries and an index of them by label ("key=value" -> entries), so a
-- deployment's selector looks at the pods of its shortest matchLabels list
-- rather than at every pod of the namespace.
local function pod_set()
  local set = { all = {}, index = {} }
  function set.add(p)
    local e = pod_entry(p)
    set.all[#set.all + 1] = e
    for k, v in pairs(e.labels) do
      local key = k .. "=" .. v
      local l = set.index[key]
      if not l then l = {}; set.index[key] = l end
      l[#l + 1] = e
    end
  end
  function set.candidates(sel)
    local best
    for k, v in pairs((sel or {}).matchLabels or {}) do
      local l = set.index[k .. "=" .. v] or {}
      if not best or #l < #best then best = l end
    end
    return best or set.all
  end
  return set
end

--- The health of one deployment object, given a pod_set of its namespace's pods.
local function health_of(d, pods)
  local spec, st = d.spec or {}, d.status or {}
  local h = {
    name = d.metadata.name, namespace = d.metadata.namespace,
    desired = spec.replicas or 1, ready = st.readyReplicas or 0, available = st.availableReplicas or 0,
    updated = st.updatedReplicas or 0, replicas = st.replicas or 0, paused = spec.paused == true,
    conditions = {}, pods = {}, problems = {},
  }
  for _, c in ipairs(st.conditions or {}) do
    h.conditions[c.type] = { status = c.status, reason = c.reason, message = c.message }
  end
  local function problem(fmt, ...) h.problems[#h.problems + 1] = fmt:format(...) end
  for _, e in ipairs(pods.candidates(spec.selector)) do
    if M.matches(spec.selector, e.labels) then
      local ph = e.health
      h.pods[#h.pods + 1] = ph
      for _, c in ipairs(ph.containers) do
        if c.waiting_reason and BAD_WAITING[c.waiting_reason] then
          problem("pod %s: container %s is %s (%d restarts%s)", ph.name, c.name, c.waiting_reason, c.restarts,
            c.last_termination_reason and (", last terminated: " .. c.last_termination_reason) or "")
        elseif c.last_termination_reason == "OOMKilled" then
          problem("pod %s: container %s was OOMKilled (%d restarts)", ph.name, c.name, c.restarts)
        end
      end
      if ph.phase == "Pending" and #ph.containers == 0 then problem("pod %s is Pending%s", ph.name,
        (ph.unschedulable or ph.reason) and (": " .. (ph.unschedulable or ph.reason)) or "") end
    end
  end
  table.sort(h.pods, function(a, b) return a.name < b.name end)
  local prog = h.conditions.Progressing
  if prog and prog.reason == "ProgressDeadlineExceeded" then problem("rollout exceeded its progress deadline") end
  local avail = h.conditions.Available
  if avail and avail.status ~= "True" then problem("not Available: %s", avail.message or avail.reason or "") end
  if h.ready < h.desired then problem("%d of %d replicas ready", h.ready, h.desired) end
  if h.updated < h.desired then problem("%d of %d replicas updated", h.updated, h.desired) end
  h.healthy = #h.problems == 0
  return h
end

--- deployment_health(namespace, name): desired/ready/available/updated, the
-- conditions, every pod with phase, restarts, waiting and last termination
-- reasons, the problems found (strings) and healthy (a boolean). name may be a
-- target of another workload with replicas, "sts/NAME": a StatefulSet's health alike.
function Client:deployment_health(ns, name)
  if type(name) ~= "string" then ns, name = self.namespace, ns end
  local d = name:find("/", 1, true) and self:get(name, { namespace = ns }) or self:get("deployments", name, { namespace = ns })
  local pods = pod_set()
  for _, p in ipairs(self:pods_of(d, ns)) do pods.add(p) end
  return health_of(d, pods)
end

--- namespace_health(namespace): every deployment's health, node readiness,
-- and healthy when all deployments and nodes are.
function Client:namespace_health(ns)
  ns = ns or self.namespace
  -- page by page: the pods' entries first, then each deployment as its page comes
  local pods = pod_set()
  self:each("pods", { namespace = ns }, pods.add)
  local out = { namespace = ns, deployments = {}, nodes = {}, problems = {}, healthy = true }
  self:each("deployments", { namespace = ns }, function(d)
    local h = health_of(d, pods)
    out.deployments[#out.deployments + 1] = h
    for _, p in ipairs(h.problems) do out.problems[#out.problems + 1] = ("deployment %s: %s"):format(h.name, p) end
  end)
  local ok, nodes = pcall(self.list, self, "nodes")
  for _, n in ipairs(ok and nodes or {}) do
    local c = condition(n, "Ready")
    local node = { name = n.metadata.name, ready = c ~= nil and c.status == "True",
      reason = c and c.reason, message = c and c.message, unschedulable = (n.spec or {}).unschedulable == true }
    out.nodes[#out.nodes + 1] = node
    if not node.ready then out.problems[#out.problems + 1] = ("node %s is NotReady%s"):format(node.name,
      node.reason and (" (" .. node.reason .. ")") or "") end
  end
  if not ok then out.nodes_error = tostring(nodes) end
  out.healthy = #out.problems == 0
  return out
end

-- GET opts.path through the proxy of each Service of `services` (a list)
-- that selects pods labelled as one of `label_sets` (pod template labels),
-- each Service once. A refused or failing check is a result, not an error.
local function check_services(self, ns, services, label_sets, opts)
  local out = { ok = true, services = {} }
  for _, s in ipairs(services) do
    local sel, port = s.spec.selector, s.spec.ports and s.spec.ports[1] and s.spec.ports[1].port
    local pick = sel ~= nil and next(sel) ~= nil and port ~= nil and (s.metadata.labels or {})["dapr.io/enabled"] ~= "true"
    if pick then
      pick = false
      for _, labels in ipairs(label_sets) do
        local all = true
        for k, v in pairs(sel) do if labels[k] ~= v then all = false break end end
        if all then pick = true break end
      end
    end
    if pick then
      local row = { service = s.metadata.name, port = port }
      local ok, r = pcall(self.proxy_get, self, ("svc/%s:%d"):format(row.service, port), opts.path or "/health",
        { namespace = ns, timeout = opts.timeout or 10 })
      if not ok then
        require("runbook.host").check_deadline() -- a timed-out step or Ctrl-C is not a failed check
        row.ok, row.error = false, tostring(type(r) == "table" and r.message or r)
      else
        row.status, row.ok, row.json = r.status, r.status < 400, r.json
        if not row.ok then row.error = ("HTTP %d: %s"):format(r.status, r.json and r.json.message or (r.body or ""):sub(1, 120)) end
      end
      out.ok = out.ok and row.ok
      out.services[#out.services + 1] = row
    end
  end
  table.sort(out.services, function(x, y) return x.service < y.service end)
  return out
end

local function template_labels(d)
  return (((d.spec or {}).template or {}).metadata or {}).labels or {}
end

--- service_health(TARGET, {path = "/health", timeout = 10}): GET `path`
-- through the API server's proxy of every Service whose selector picks the
-- workload's pods (its first port; not the <app>-dapr Services the Dapr
-- operator makes, labelled dapr.io/enabled). A refused or failing check is a
-- result, not an error. -> {ok, services = {{service, port, status, ok, error, json}...}}
-- (ok is also true when no Service selects the pods: services is then empty).
function Client:service_health(a, b)
  local _, ns, _, d, opts = self:workload(a, b, "service_health")
  return check_services(self, ns, self:list("services", { namespace = ns }), { template_labels(d) }, opts)
end

--- services_health(namespace, {path = "/health", timeout = 10}): service_health
-- of every deployment of the namespace at once: one list of deployments, one
-- of Services, then one GET per Service picked (each once, however many
-- deployments it selects). -> {ok, services = {...}} as service_health.
function Client:services_health(ns, opts)
  if type(ns) == "table" then ns, opts = nil, ns end
  ns = ns or self.namespace
  local label_sets = {}
  self:each("deployments", { namespace = ns }, function(d) label_sets[#label_sets + 1] = template_labels(d) end)
  return check_services(self, ns, self:list("services", { namespace = ns }), label_sets, opts or {})
end

return M
