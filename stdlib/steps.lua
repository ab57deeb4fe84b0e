--- Steps that several shipped runbooks share, as step tables, and the params
-- they read, declared once:
--
--   param "namespace" (steps.params.namespace)
--   params (steps.params) { "deployment", "namespace" }
--   step "Stop writes" (steps.stop_writers { needs = { "Verify the backup set" } })
--   step "Start writes" (steps.start_writers { stopped = "Stop writes" })
--
-- Each step reads the params named below and takes the usual step fields
-- (description, needs, confirm ...) from its argument.
local M = {}

--- Params that mean the same in every runbook that declares them.
M.params = {
  deployment = { required = true, help = "the deployment, e.g. todo-chatbot-backend" },
  namespace = { default = "todo-chatbot", help = "Kubernetes namespace" },
  writers = { type = "list", default = "todo-chatbot-backend,todo-chatbot-recurring-task",
    help = "deployments that write to the database: scaled to 0 while the data is replaced" },
  -- as param "timeout", which stop_writers and start_writers read
  writers_timeout = { type = "duration", default = "2m", help = "how long the writers may take to stop, and to come back" },
  database_url = { secret = true, default = os.getenv("DATABASE_URL"), help = "the database (default $DATABASE_URL)" },
  prefix = { default = "todo", help = "name of the backup sets in dir (letters, digits, '-', '_', '.')" },
  container = { default = "", help = "the app container (default: each pod's default container)" },
  health_path = { default = "/health", help = "path the services answer health checks on (through the API server's service proxy)" },
  error_rate_window = { default = "1m", help = "PromQL rate window of the error rate" },
  log_since = { type = "duration", default = "15m", help = "how far back the logs are searched" },
  -- a consumer group, the topic it consumes and the deployment running its consumers
  group = { default = "recurring-task-service", help = "the consumer group" },
  topic = { default = "task-events", help = "the topic the group consumes" },
  consumers = { default = "todo-chatbot-recurring-task", help = "the deployment running the group's consumers" },
  -- for M.smoke_test
  smoke = { default = "", help = "a smoke-test command (sh -c on this host, not run in a dry run) that must exit 0; it gets "
    .. "TARGET_NAMESPACE, TARGET_DEPLOYMENT, TARGET_SERVICE and TARGET_PROXY (the Service's API server proxy path: "
    .. "kubectl get --raw \"$TARGET_PROXY/health\")" },
  smoke_paths = { type = "list", default = "", help = "paths GET through each Service selecting the pods (API server proxy) "
    .. "as a smoke test: each must answer below 400" },
  -- for M.deployments
  deployments = { type = "list", required = true, help = "deployments, or all: every deployment in the namespace" },
}

--- The params of a service whose metric is too high, which service_deployment,
-- measure_metric and verify_metric read:
--   params (steps.metric_params) { "service", "deployment", "namespace", "window", "hold", "every" }
M.metric_params = {
  service = { required = true, help = "the app whose metric is too high (its service label), e.g. backend" },
  deployment = { default = "", help = "the service's deployment (default todo-chatbot-SERVICE)" },
  namespace = M.params.namespace,
  window = { default = "5m", help = "PromQL rate window" },
  hold = { type = "duration", default = "5m", help = "how long the value must stay under its threshold after the fix" },
  every = { type = "duration", default = "15s", help = "how often the value is evaluated while verifying" },
}

-- A shared step: `build(args)` makes the step from the runbook's table `t`,
-- of which the fields named in `own` are build's arguments and the rest are
-- step fields (description, needs, confirm ...) that override build's.
local function shared(own, build)
  return function(t)
    local args, fields = {}, {}
    for k, v in pairs(t) do
      if own[k] then args[k] = v else fields[k] = v end
    end
    local spec = build(args)
    for k, v in pairs(fields) do spec[k] = v end
    return spec
  end
end

--- The deployments of param `writers` as targets.
function M.writers(ctx)
  local list = {}
  for i, d in ipairs(ctx.params.writers) do list[i] = "deploy/" .. d end
  if #list == 0 then error("param writers: name at least one deployment", 0) end
  return list
end

--- The deployments of param `deployments` (names, "deploy/NAME"s, or "all")
-- in param namespace, each as {name, replicas}; a name the namespace lacks is an error.
function M.deployments(ctx)
  local k8s, ns = require("k8s"), ctx.params.namespace
  local objs = {}
  if ctx.params.deployments[1] == "all" then
    objs = k8s.list("deployments", { namespace = ns })
    if #objs == 0 then error(("namespace %s has no deployments"):format(ns), 0) end
  else
    for _, name in ipairs(ctx.params.deployments) do
      objs[#objs + 1] = k8s.get("deploy/" .. name:gsub("^deploy/", ""), { namespace = ns })
    end
    if #objs == 0 then error("param deployments: name at least one deployment, or all", 0) end
  end
  local out = {}
  for i, d in ipairs(objs) do out[i] = { name = d.metadata.name, replicas = d.spec.replicas or 1 } end
  return out
end

--- The step's needs: the step `of` that found the deployments, and `after`, the
-- step that changed them.
local function found_and(a)
  return { a.of, a.after }
end

--- Wait for the rollout of each deployment in `ctx.outputs[t.of].deployments`
-- (t.of defaults to "Find the deployments"; param timeout each; kubectl rollout
-- status), giving up at once on one whose new pods crash-loop or cannot pull
-- their image. The step needs t.of and t.after.
M.wait_rollouts = shared({ of = true, after = true }, function(a)
  a.of = a.of or "Find the deployments"
  return {
    description = "kubectl rollout status of each; gives up at once when new pods crash-loop or cannot pull their image",
    needs = found_and(a),
    run = function(ctx)
      for _, d in ipairs(ctx.outputs[a.of].deployments) do
        require("k8s").rollout_status("deploy/" .. d.name, { namespace = ctx.params.namespace,
          timeout = ctx.params.timeout, fail_fast = true })
      end
    end,
  }
end)

-- What verify_deployments waits for: the wait's name, and whether the
-- deployment's health `h` (k8s.deployment_health) holds, with a note.
local settled = {
  replaced = {
    description = "Each deployment healthy, and none of the pods it ran before (the finding step's `pods`) is left",
    what = function(_, d) return d.name .. "'s old pods to go" end,
    holds = function(_, d, h)
      local old, left = {}, 0
      for _, name in ipairs(d.pods) do old[name] = true end
      for _, p in ipairs(h.pods) do left = left + (old[p.name] and 1 or 0) end
      return h.healthy and left == 0, ("%d old pods left"):format(left)
    end,
  },
  scaled = {
    description = "Each deployment healthy, with exactly param replicas pods, all ready (old pods gone)",
    what = function(ctx, d) return d.name .. "'s pods to number " .. ctx.params.replicas end,
    holds = function(ctx, _, h)
      local want = ctx.params.replicas
      return h.healthy and h.ready == want and #h.pods == want, ("%d pods"):format(#h.pods)
    end,
  },
}

--- Verify each deployment in `ctx.outputs[t.of].deployments` (as wait_rollouts):
-- wait (param timeout each) until it has `settled` as t.check says: "replaced"
-- (every pod it ran before gone) or "scaled" (exactly param replicas, ready).
M.verify_deployments = shared({ of = true, after = true, check = true }, function(a)
  a.of = a.of or "Find the deployments"
  local check = settled[a.check] or error("steps.verify_deployments: check must be replaced or scaled", 2)
  return {
    description = check.description,
    needs = found_and(a),
    run = function(ctx)
      for _, d in ipairs(ctx.outputs[a.of].deployments) do
        local h, note
        local held = require("time").wait_until({ timeout = ctx.params.timeout, what = check.what(ctx, d) }, function()
          h = require("k8s").deployment_health(ctx.params.namespace, d.name)
          local ok
          ok, note = check.holds(ctx, d, h)
          return ok
        end)
        if held then require("log").info("%s: %d of %d ready, %s%s", d.name, h.ready, h.desired, note,
          #h.problems > 0 and (": " .. table.concat(h.problems, "; ")) or "") end
      end
    end,
  }
end)

--- kubectl scale --replicas=<param replicas> of each deployment of
-- `t.deployments(ctx)` (a list of {name, replicas}; default: the output
-- `deployments` of the step "Find the deployments") not at it yet, refused if
-- its replicas changed in between; undo scales each back. Its outputs:
-- `deployments`, those it was given (for wait_rollouts and
-- verify_deployments with of = this step), and `scaled`.
M.scale = shared({ deployments = true }, function(a)
  local found = a.deployments or function(ctx) return ctx.outputs["Find the deployments"].deployments end
  return {
    description = "kubectl scale --replicas=N for each deployment not at N yet (undo: the replicas each had)",
    confirm = true,
    needs = not a.deployments and { "Find the deployments" } or nil,
    run = function(ctx)
      local list, scaled = found(ctx), {}
      for _, d in ipairs(list) do
        if d.replicas ~= ctx.params.replicas then
          require("k8s").scale("deploy/" .. d.name, ctx.params.replicas,
            { namespace = ctx.params.namespace, current_replicas = d.replicas })
          scaled[#scaled + 1] = d
        end
      end
      return { deployments = list, scaled = scaled }
    end,
    undo = function(ctx, out)
      for _, d in ipairs(out.scaled) do
        require("k8s").scale("deploy/" .. d.name, d.replicas, { namespace = ctx.params.namespace })
        require("log").info("%s back at %d replicas", d.name, d.replicas)
      end
    end,
  }
end)

--- Scale the writers (params writers, namespace, timeout) to 0 and wait until
-- their pods are gone, remembering their replicas; undo starts them again.
M.stop_writers = shared({}, function()
  return {
    description = "Scale the writer deployments to 0 and wait until their pods are gone (replicas remembered)",
    confirm = true,
    run = function(ctx)
      local saved = require("k8s").stop_workloads(M.writers(ctx),
        { namespace = ctx.params.namespace, timeout = ctx.params.timeout })
      for _, s in ipairs(saved) do require("log").info("%s stopped (was %d replicas)", s.target, s.replicas) end
      return { saved = saved }
    end,
    undo = function(ctx, out) require("k8s").start_workloads(out.saved, { timeout = ctx.params.timeout }) end,
  }
end)

--- Scale the writers the step `t.stopped` stopped back to their replicas and
-- wait for their rollouts (skipped with it when the operator kept them running).
M.start_writers = shared({ stopped = true }, function(a)
  local stopped = a.stopped
  return {
    description = "Scale the writers back to their replicas and wait for their rollouts",
    needs = { stopped },
    run = function(ctx)
      local saved = ctx.outputs[stopped].saved
      require("k8s").start_workloads(saved, { timeout = ctx.params.timeout })
      for _, s in ipairs(saved) do require("log").info("%s back at %d replicas", s.target, s.replicas) end
    end,
  }
end)

--- Keep the database (param database_url) as it is now, as a backup set
-- PREFIX..t.suffix-STAMP in param dir.
M.backup_database = shared({ suffix = true }, function(a)
  local suffix = a.suffix
  return {
    run = function(ctx)
      local backupset = require("backupset")
      local set = backupset.new(ctx.params.dir, ctx.params.prefix .. suffix)
      local m = backupset.seal(set, { database = backupset.dump_database(set, { url = ctx.params.database_url }) })
      require("log").info("the database as it was is kept in %s", set.final)
      return { path = set.final, files = #m.files }
    end,
  }
end)

--- Restore the database (param database_url) from the backup set
-- `t.set(ctx)` (pg_restore --clean --single-transaction).
M.restore_database = shared({ set = true }, function(a)
  local set_of = a.set
  return {
    description = "pg_restore --clean --single-transaction from the set; the restored row counts must equal the dump's",
    confirm = true,
    run = function(ctx)
      local path = set_of(ctx)
      local r = require("backupset").restore_database(path, { url = ctx.params.database_url })
      if not r.skipped then
        require("log").info("restored %s: writes made since the set was taken are not in the database", path)
      end
      return { path = path }
    end,
  }
end)

--- Each consumer group the set `t.set(ctx)` recorded (backup -p groups=)
-- back at its offsets of then, so that its consumers process again the
-- events the restored database lacks (backupset.replay_events). Runs while
-- the writers are stopped: the groups' consumers must be among them.
M.replay_events = shared({ set = true }, function(a)
  local set_of = a.set
  return {
    description = "Each consumer group the set recorded back at its offsets of then: the events since are processed again when the writers resume",
    confirm = true,
    when = function(ctx) return require("backupset").manifest(set_of(ctx)).offsets ~= nil end,
    run = function(ctx)
      local backupset = require("backupset")
      return backupset.replay_events(backupset.manifest(set_of(ctx)))
    end,
  }
end)

--- Wait for the rollout of `t.target(ctx)`, or of the deployment the step
-- `t.deployed` made (its output `name`), (kubectl rollout status) for at most
-- param `t.within` (default: timeout); gives up at once when its new pods
-- crash-loop or cannot pull their image.
M.rollout_status = shared({ target = true, within = true, deployed = true }, function(a)
  local deployed, within = a.deployed, a.within or "timeout"
  local target_of = a.target or function(ctx) return "deploy/" .. ctx.outputs[deployed].name end
  return {
    description = "kubectl rollout status; gives up at once when the new pods crash-loop or cannot pull their image",
    needs = deployed and { deployed },
    run = function(ctx)
      local r = require("k8s").rollout_status(target_of(ctx), { namespace = ctx.params.namespace,
        timeout = ctx.params[within], fail_fast = true })
      return { message = r.message }
    end,
  }
end)

--- kubectl set resources deploy/NAME -c CONTAINER --limits=memory=LIMIT
-- [--requests=memory=REQUEST], in param namespace: a new pod template, so the
-- pods roll (crashloop-triage, heap-dump).
function M.set_memory(ctx, name, container, limit, request)
  require("k8s").patch("deploy/" .. name, { spec = { template = { spec = { containers = { { name = container,
    resources = { limits = { memory = limit }, requests = request and { memory = request } or nil } } } } } } },
    { namespace = ctx.params.namespace })
end

--- The health of deployment `name` in param namespace (k8s.deployment_health);
-- raises "NAME is not healthy: ..." when it is not.
function M.healthy(ctx, name)
  local h = require("k8s").deployment_health(ctx.params.namespace, name)
  if not h.healthy then error(("%s is not healthy: %s"):format(name, table.concat(h.problems, "; ")), 0) end
  return h
end

--- The deployment of param deployment healthy and, unless `t.services` is
-- false, GET param health_path through each Service that selects its pods (API
-- server proxy). In a dry run, failures are reported, not raised.
M.verify_health = shared({ services = true }, function(a)
  local services = a.services ~= false
  return {
    description = "The deployment healthy, and GET health_path through each of its services (API server proxy)",
    retry = { attempts = 5, base = "1s", max = "5s" },
    run = function(ctx)
      local k8s, log = require("k8s"), require("log")
      local h = k8s.deployment_health(ctx.params.namespace, ctx.params.deployment)
      if not h.healthy and not ctx.dry_run then error("not healthy: " .. table.concat(h.problems, "; "), 0) end
      if not services then return { healthy = h.healthy } end
      local sh = k8s.service_health("deploy/" .. ctx.params.deployment,
        { namespace = ctx.params.namespace, path = ctx.params.health_path })
      local checked = {}
      for _, row in ipairs(sh.services) do
        log.info("%s %s: %s", row.service, ctx.params.health_path, row.ok and ("HTTP " .. row.status) or row.error)
        if not row.ok and not ctx.dry_run then error(row.service .. " " .. ctx.params.health_path .. ": " .. row.error, 0) end
        checked[#checked + 1] = row.service
      end
      if #checked == 0 then log.warn("no service selects %s's pods: only its pods' readiness was checked", ctx.params.deployment) end
      return { healthy = h.healthy, services = checked }
    end,
  }
end)

--- The restored database against the set: row counts against its manifest,
-- and each query of param t.queries (or of the list `t.queries(ctx)` gives) returns 0. `t.set(ctx)` is the set's
-- path; `t.kept` names the step that kept the database as it was (for the
-- message). In a dry run, nothing was restored: it shows the state now.
M.validate = shared({ set = true, queries = true, kept = true }, function(a)
  local set_of, queries, kept = a.set, a.queries, a.kept
  return {
    run = function(ctx)
      local backupset = require("backupset")
      local path = set_of(ctx)
      local problems = backupset.validate { manifest = backupset.verify(path), url = ctx.params.database_url,
        queries = type(queries) == "function" and queries(ctx) or backupset.queries(ctx.params[queries]) }
      if ctx.dry_run then
        require("log").info("now, before the restore: %s", #problems == 0 and "the database matches the set"
          or table.concat(problems, "; "))
      elseif #problems > 0 then
        local was = not ctx.skipped(kept) and ctx.outputs[kept].path
        error("the restored database is not valid: " .. table.concat(problems, "; ")
          .. (was and ("; the database before the restore is in " .. was) or ""), 0)
      else
        require("log").info("the database matches %s", path)
      end
      return { problems = problems }
    end,
  }
end)

--- The deployment of param service: param deployment, or todo-chatbot-SERVICE.
function M.service_deployment(ctx)
  return ctx.params.deployment ~= "" and ctx.params.deployment or "todo-chatbot-" .. ctx.params.service
end

--- kubectl top of deployment `name`'s pods (param namespace), each logged with
-- the app container's limits: {replicas, limits = {cpu, memory} (strings, as
-- written), pods = k8s.top's rows, highest CPU first}.
local function pod_usage(ctx, name)
  local k8s = require("k8s")
  local d = k8s.get("deploy/" .. name, { namespace = ctx.params.namespace })
  local sel = {}
  for k, v in pairs(d.spec.selector.matchLabels or {}) do sel[#sel + 1] = k .. "=" .. v end
  table.sort(sel)
  local limits = (d.spec.template.spec.containers[1].resources or {}).limits or {}
  local pods = k8s.top("pods", { namespace = ctx.params.namespace, selector = table.concat(sel, ","), sort_by = "cpu" })
  for _, p in ipairs(pods) do
    require("log").info("%s: cpu %dm, memory %dMi (limits: cpu %s, memory %s)", p.name, p.cpu_millicores,
      p.memory_bytes // (1024 * 1024), limits.cpu or "none", limits.memory or "none")
  end
  return { replicas = d.spec.replicas, limits = { cpu = limits.cpu, memory = limits.memory }, pods = pods }
end

-- The deployment a shared step reads: t.deployment(ctx), or param deployment.
local function deployment_of(a, ctx)
  return a.deployment and a.deployment(ctx) or ctx.params.deployment
end

--- kubectl top pods of the deployment (t.deployment(ctx), default param
-- deployment): each pod's CPU and memory against the limits (pod_usage).
M.resource_use = shared({ deployment = true }, function(a)
  return {
    description = "kubectl top pods: CPU and memory of each pod against the limits",
    run = function(ctx)
      local u = pod_usage(ctx, deployment_of(a, ctx))
      return { pods = #u.pods, replicas = u.replicas }
    end,
  }
end)

--- The deployment's ERROR records of the last t.since (a duration, or a
-- function of ctx giving one) in every pod, counted by message, the top five
-- shown. -> {errors = count, top = {{value, count}...}}
M.top_errors = shared({ deployment = true, since = true }, function(a)
  return {
    description = "kubectl logs --since | jq select(.level == \"ERROR\") | sort | uniq -c: which error, in every pod",
    run = function(ctx)
      local since = type(a.since) == "function" and a.since(ctx) or a.since
      local q = M.top_messages(ctx, { deployment = deployment_of(a, ctx), since = since, header = function(q)
        return ("%d ERROR records in the last %s across %d pod(s)%s"):format(q.count,
          type(since) == "number" and require("duration").format(since) or since, #q.pods, q.count > 0 and ":" or "")
      end })
      return { errors = q.count, top = q.by }
    end,
  }
end)

--- The records of deployment `o.deployment` (param namespace; `o.container`)
-- since `o.since` at `o.levels` (default "ERROR"), counted by message: the
-- line `o.header(q)` when given, then the top five logged. -> k8s.log_query's result
function M.top_messages(ctx, o)
  local q = require("k8s").log_query { target = "deploy/" .. o.deployment, namespace = ctx.params.namespace,
    since = o.since, container = o.container, where = { level = o.levels or "ERROR" }, count_by = "message", top = 5 }
  local log = require("log")
  if o.header then log.info("%s", o.header(q)) end
  for _, b in ipairs(q.by) do log.info("  %5d  %s", b.count, b.value) end
  return q
end

--- The records of deployment `o.deployment` (param namespace) of the last
-- `o.since` seconds (of `o.container`; those matching the Lua pattern
-- `o.match`, called `o.what`), counted by level, then their top ERROR and
-- WARNING messages, listed. -> {records, errors, by_level, top}
function M.log_levels(ctx, o)
  local q = require("k8s").log_query { target = "deploy/" .. o.deployment, namespace = ctx.params.namespace,
    since = o.since, container = o.container, match = o.match, count_by = "level" }
  local levels = {}
  for i, b in ipairs(q.by) do levels[i] = ("%s %d"):format(b.value, b.count) end
  require("log").info("%d %srecords in the last %s across %d pod(s)%s", q.count, o.what and (o.what .. " ") or "",
    require("duration").format(o.since), #q.pods, #levels > 0 and (": " .. table.concat(levels, ", ")) or "")
  local bad = M.top_messages(ctx, { deployment = o.deployment, since = o.since, container = o.container,
    levels = { "ERROR", "WARNING" }, header = function(t) return ("%d errors and warnings, by message:"):format(t.count) end })
  return { records = q.count, errors = bad.count, by_level = q.by, top = bad.by }
end

--- Watch deployment `name` (param namespace) for param observe: no pod may
-- restart once it is healthy, and it must be healthy at the end (raises
-- otherwise); `tick()`, when given, is called at each look (every second).
-- -> {healthy = true}
function M.watch_restarts(ctx, name, tick)
  local k8s, time = require("k8s"), require("time")
  local function restarts()
    local h = k8s.deployment_health(ctx.params.namespace, name)
    local n = 0
    for _, p in ipairs(h.pods) do if not p.terminating then n = n + p.restarts end end
    return n, h
  end
  local until_t = time.monotonic() + ctx.params.observe
  local base
  while true do
    local n, h = restarts()
    local settled = #h.problems == 0
    if settled then base = base or n end
    if base and n > base then error(("pods restarted again after the fix: %s"):format(table.concat(h.problems, "; ")), 0) end
    if tick then tick() end
    if time.monotonic() >= until_t then
      if not settled then error("not healthy after the fix: " .. table.concat(h.problems, "; "), 0) end
      require("log").info("%s: %d/%d ready, no restart in %s", name, h.ready, h.desired,
        require("duration").format(ctx.params.observe))
      return { healthy = true }
    end
    time.sleep(1)
  end
end

-- ---- one metric of a service, in Prometheus ----------------------------------

local Metric = {}
Metric.__index = Metric

--- A metric of the service of param service, for measure_metric and
-- verify_metric: `m.name` ("error rate"), `m.unit` ("percent" or "seconds"),
-- `m.max` the param of its threshold, `m.by` the labels of the overview of
-- every service, and `m.query(selector, window, by)` its PromQL (by nil: one
-- series). The steps read params namespace, service, window, hold and every.
function M.metric(m)
  return setmetatable(m, Metric)
end

--- The PromQL of the service's value (or, with `by`, the namespace's rows by those labels).
function Metric:promql(ctx, by)
  local selector = ('namespace="%s"'):format(ctx.params.namespace)
  if not by then selector = selector .. (',service="%s"'):format(ctx.params.service) end
  return self.query(selector, ctx.params.window, by)
end

function Metric:show(v)
  return require("prom").show(v == v and v or nil, self.unit)
end

--- Every service's value (logged, highest first) and the service's own against
-- the threshold: {value = n, high = <at or above it>}.
M.measure_metric = shared({ metric = true }, function(a)
  local m = a.metric
  return {
    run = function(ctx)
      local prom, log = require("prom"), require("log")
      local rows = prom.query(m:promql(ctx, m.by), { allow_empty = true })
      local function key(r) return r.value == r.value and r.value or -1 end
      table.sort(rows, function(x, y) return key(x) > key(y) end)
      for _, r in ipairs(rows) do
        local labels = {}
        for l in m.by:gmatch("[%w_]+") do labels[#labels + 1] = r.labels[l] end
        log.info("%s: %s", table.concat(labels, " "), m:show(r.value))
      end
      local v = prom.value(m:promql(ctx))
      local high = v >= ctx.params[m.max]
      log.info("%s: %s %s over %s (threshold %s)%s", ctx.params.service, m.name, m:show(v), ctx.params.window,
        m:show(ctx.params[m.max]), high and "" or ": under the threshold, nothing to fix")
      return { value = v, high = high }
    end,
  }
end)

--- After one rate window (so only the time since the fix counts, when the
-- step `t.measured` found it high), the service's value stays under the
-- threshold for param hold (prom.verify): {value = n}.
M.verify_metric = shared({ metric = true, measured = true }, function(a)
  local m, measured = a.metric, a.measured
  return {
    needs = { measured },
    run = function(ctx)
      if ctx.outputs[measured].high and not ctx.dry_run then
        require("time").sleep(require("duration").parse(ctx.params.window) or 0)
      end
      local name = ctx.params.service .. " " .. m.name
      local r = require("prom").verify { name = name, query = m:promql(ctx), unit = m.unit,
        below = ctx.params[m.max], hold = ctx.params.hold, every = ctx.params.every }
      return { value = r.values and r.values[name] }
    end,
  }
end)

--- The smoke test of the deployment `t.target(ctx)` names, in param namespace
-- (deploy, blue-green-switch), when param smoke or smoke_paths is given: GET
-- each path of smoke_paths (or health_path) through every Service that
-- selects its pods, each below 400, then the command of param smoke (sh -c,
-- through the gate) with the deployment and its first Service in its
-- environment. A dry run says what it would do.
M.smoke_test = shared({ target = true }, function(a)
  local target = a.target
  return {
    description = "GET each of smoke_paths through the Services of its pods, then the smoke command; all must pass",
    when = function(ctx) return ctx.params.smoke ~= "" or #ctx.params.smoke_paths > 0 end,
    run = function(ctx)
      local k8s, log, name, ns = require("k8s"), require("log"), target(ctx), ctx.params.namespace
      local paths = #ctx.params.smoke_paths > 0 and ctx.params.smoke_paths or { ctx.params.health_path }
      if ctx.dry_run then
        log.info("would GET %s through the Services of %s%s", table.concat(paths, ", "), name,
          ctx.params.smoke ~= "" and (" and run the smoke command: " .. ctx.params.smoke) or "")
        return
      end
      local first
      for _, path in ipairs(paths) do
        local sh = k8s.service_health("deploy/" .. name, { namespace = ns, path = path })
        if #sh.services == 0 then error(("smoke test: no Service selects the pods of %s"):format(name), 0) end
        for _, row in ipairs(sh.services) do
          if not row.ok then error(("smoke test: %s %s: %s"):format(row.service, path, row.error), 0) end
          log.info("smoke test: %s %s: HTTP %d", row.service, path, row.status)
        end
        first = first or sh.services[1]
      end
      if ctx.params.smoke == "" then return { paths = paths } end
      local r = require("exec").run { shell = ctx.params.smoke, check = false, env = { TARGET_NAMESPACE = ns,
        TARGET_DEPLOYMENT = name, TARGET_SERVICE = first.service,
        TARGET_PROXY = ("/api/v1/namespaces/%s/services/%s:%d/proxy"):format(ns, first.service, first.port) } }
      local out = (r.stdout .. r.stderr):gsub("%s+$", "")
      if out ~= "" then log.info("smoke test: %s", out) end
      if r.status ~= 0 then
        error("smoke test: the command " .. (r.signal and ("was killed by signal " .. r.signal)
          or ("exited with status " .. r.status)), 0)
      end
      return { paths = paths, command = r.status }
    end,
  }
end)

-- ---- a new version beside a live deployment (blue-green-switch, canary-deployment)

--- `image` with its tag replaced by `tag`.
function M.retag(image, tag)
  return image:gsub(":[^:/]+$", "") .. ":" .. tag
end

--- The Deployment `o.name` beside the live deployment `o.from` (namespace
-- o.namespace): its pod template with the first container's image at o.tag,
-- and its pods' label o.split changed by o.relabel(value), so that the live
-- Service never selects them (o.what names them in the error); o.replicas,
-- and o.cause as the change-cause. Returns the manifest, the pods' labels and
-- the image.
function M.sibling_deployment(o)
  local tmpl = require("k8s").get("deploy/" .. o.from, { namespace = o.namespace }).spec.template
  local labels = tmpl.metadata.labels or {}
  if not labels[o.split] then
    error(("the pods of %s have no label %s to set %s apart with (see split_label)"):format(o.from, o.split, o.what), 0)
  end
  labels[o.split] = o.relabel(labels[o.split])
  labels["pod-template-hash"] = nil
  local app = tmpl.spec.containers[1]
  app.image = M.retag(app.image, o.tag)
  return {
    apiVersion = "apps/v1", kind = "Deployment",
    metadata = { name = o.name, namespace = o.namespace, labels = labels,
      annotations = { ["kubernetes.io/change-cause"] = o.cause } },
    spec = { replicas = o.replicas, selector = { matchLabels = labels },
      template = { metadata = { labels = labels, annotations = tmpl.metadata.annotations }, spec = tmpl.spec } },
  }, labels, app.image
end

--- A Service for the deployment the step `t.deployed` made (its outputs
-- `name` and `labels`: the Service has its name and selects its pods), with
-- the ports of the live Service (output `ports` of the step `t.live`). One that
-- exists already (an earlier color's) is kept; undo deletes one it created.
M.sibling_service = shared({ deployed = true, live = true }, function(a)
  local deployed, live = a.deployed, a.live
  return {
    description = "A Service named like the new deployment, selecting its pods, with the live Service's ports",
    needs = { live, deployed },
    run = function(ctx)
      local k8s = require("k8s")
      local d = ctx.outputs[deployed]
      if k8s.get("svc/" .. d.name, { namespace = ctx.params.namespace, missing_ok = true }) then
        require("log").info("service %s exists", d.name)
        return { created = false }
      end
      local ports = {}
      for _, p in ipairs(ctx.outputs[live].ports) do
        ports[#ports + 1] = { name = p.name, port = p.port, targetPort = p.targetPort, protocol = p.protocol }
      end
      k8s.create { apiVersion = "v1", kind = "Service",
        metadata = { name = d.name, namespace = ctx.params.namespace, labels = d.labels },
        spec = { selector = d.labels, ports = ports } }
      return { created = true }
    end,
    undo = function(ctx, out)
      if out.created then
        require("k8s").delete("svc/" .. ctx.outputs[deployed].name, { namespace = ctx.params.namespace, missing_ok = true })
      end
    end,
  }
end)

-- ---- Dapr (dapr-pubsub-check, dapr-control-plane) ------------------------------

--- The params the Dapr steps read:
--   params (steps.dapr_params) { "namespace", "pubsub", "app_id", ... }
M.dapr_params = {
  namespace = M.params.namespace,
  system_namespace = { default = "dapr-system", help = "the namespace of Dapr's control plane" },
  pubsub = { default = "kafka-pubsub", help = "the pub/sub component's name" },
  app_id = { default = "backend", help = "the app whose sidecar publishes (DAPR_HTTP_ENDPOINT is its sidecar)" },
  topic = { default = "task-events", help = "the topic the test event goes to" },
  topics = { type = "list", default = "task-events,task-updates,reminders", help = "topics that must exist on the brokers" },
  test_publish = { type = "boolean", default = true, help = "publish a test event through the sidecar and look for it on Kafka" },
  publish_timeout = { type = "duration", default = "10s", help = "how long to look for the test event on the topic" },
  log_since = { type = "duration", default = "15m", help = "how far back the Dapr logs are read for errors" },
}

-- The control plane's workloads by component, as Dapr's Helm chart names and labels them (app=NAME).
M.DAPR_CONTROL_PLANE = {
  { component = "operator", name = "dapr-operator" }, { component = "placement", name = "dapr-placement-server" },
  { component = "sentry", name = "dapr-sentry" }, { component = "injector", name = "dapr-sidecar-injector" },
}

-- A check step's problems go in its outputs (so a resumed run still has them
-- for the verdict); problem() logs one and adds it to the list.
local function collector()
  local problems = {}
  return problems, function(fmt, ...)
    local p = fmt:format(...)
    problems[#problems + 1] = p
    require("log").warn("%s", p)
  end
end

--- Every pod annotated dapr.io/enabled in param namespace has a daprd
-- container, and it is ready: {pods, ready, missing = {pod names without daprd}, problems}.
M.dapr_sidecars = shared({}, function()
  return {
    description = "Every pod annotated dapr.io/enabled has a daprd container, and it is ready",
    run = function(ctx)
      local problems, problem = collector()
      local s = require("dapr").sidecar_status(ctx.params.namespace)
      local ready, missing = 0, {}
      for _, p in ipairs(s.pods) do
        if p.problem then problem("pod %s (app %s): %s", p.pod, tostring(p.app_id), p.problem)
        else ready = ready + 1 end
        if not p.injected then missing[#missing + 1] = p.pod end
      end
      require("log").info("%d of %d pods have a ready daprd sidecar", ready, #s.pods)
      return { pods = #s.pods, ready = ready, missing = missing, problems = problems }
    end,
  }
end)

--- kubectl get components: every Dapr component of param namespace with its
-- type; param pubsub is deployed as pubsub.kafka, and the Kafka brokers answer.
M.dapr_component = shared({}, function()
  return {
    description = "kubectl get components: each with its type; the pub/sub component is deployed as pubsub.kafka and its brokers are reachable",
    run = function(ctx)
      local problems, problem = collector()
      local k8s = require("k8s")
      local all = {}
      for _, comp in ipairs(k8s.list("components.dapr.io", { namespace = ctx.params.namespace })) do
        all[#all + 1] = ("%s (%s)"):format(comp.metadata.name, tostring((comp.spec or {}).type))
      end
      require("log").info("components in %s: %s", ctx.params.namespace, #all > 0 and table.concat(all, ", ") or "none")
      local c = k8s.get("components.dapr.io/" .. ctx.params.pubsub,
        { namespace = ctx.params.namespace, missing_ok = true })
      if not c then
        problem("component %s is not deployed in %s (kubectl get components -n %s)", ctx.params.pubsub,
          ctx.params.namespace, ctx.params.namespace)
        return { deployed = false, problems = problems }
      end
      if c.spec.type ~= "pubsub.kafka" then problem("component %s is %s, not pubsub.kafka", ctx.params.pubsub, tostring(c.spec.type)) end
      local brokers
      for _, m in ipairs(c.spec.metadata or {}) do if m.name == "brokers" then brokers = m.value end end
      require("log").info("component %s: %s, brokers %s", ctx.params.pubsub, c.spec.type, tostring(brokers))
      local down = {}
      for _, b in ipairs(require("kafka").brokers { probe_timeout = "3s" }) do
        if not b.reachable then down[#down + 1] = ("%s:%d (%s)"):format(b.host, b.port, tostring(b.reason)) end
      end
      if #down > 0 then problem("Kafka brokers not answering: %s", table.concat(down, ", ")) end
      return { deployed = true, brokers = brokers, problems = problems }
    end,
  }
end)

--- kafka-topics --list: every topic of param topics exists.
M.dapr_topics = shared({}, function()
  return {
    description = "kafka-topics --list: the topics the apps publish to and subscribe to exist",
    run = function(ctx)
      local problems, problem = collector()
      local have = {}
      for _, t in ipairs(require("kafka").topics()) do have[t.name] = t.partitions end
      for _, t in ipairs(ctx.params.topics) do
        if not have[t] then problem("topic %s does not exist on the brokers", t)
        else require("log").info("topic %s: %d partitions", t, have[t]) end
      end
      return { problems = problems }
    end,
  }
end)

--- The sidecar of param app_id: healthz, outbound, the component loaded, its
-- subscriptions; with param test_publish, an event published through it and
-- read back from Kafka by its key.
M.dapr_publish = shared({}, function()
  return {
    description = "The app's sidecar: healthz, outbound, the component loaded, its subscriptions; then POST /v1.0/publish and read the event back from Kafka",
    run = function(ctx)
      local kafka, log = require("kafka"), require("log")
      local problems, problem = collector()
      local before = kafka.watermarks(ctx.params.topic)
      local rep = require("dapr").check_app(ctx.params.app_id, {
        components = { [ctx.params.pubsub] = "pubsub.kafka" },
        test_publish = ctx.params.test_publish and {
          pubsub = ctx.params.pubsub, topic = ctx.params.topic,
          confirm = function(ev) -- the event, keyed by its check id, read from the partitions' old ends
            local from = {}
            for p, w in pairs(before) do from[p] = w.high end
            for m in kafka.consume { topic = ctx.params.topic, from_offsets = from, timeout = ctx.params.publish_timeout } do
              if m.key == ev.check_id then
                log.info("test event %s is on %s partition %d offset %d", ev.check_id, ctx.params.topic, m.partition, m.offset)
                return true
              end
            end
            return false
          end,
        } or nil,
      })
      log.info("sidecar %s (%s): healthz %s, outbound %s, runtime %s", rep.app_id, rep.endpoint, tostring(rep.healthy),
        tostring(rep.outbound), tostring(rep.runtime_version))
      log.info("subscriptions: %s", #rep.subscriptions > 0 and table.concat(rep.subscriptions, ", ") or "none")
      for _, p in ipairs(rep.problems) do problem("%s", p) end
      return { publish = rep.publish, subscriptions = rep.subscriptions, problems = problems }
    end,
  }
end)

-- The message of a Dapr log line (logfmt msg="..."), or the line.
local function dapr_message(line)
  return line:match('msg="(.-)"%s') or line
end

--- The errors (level=error or fatal) since param log_since in the logs of the
-- control plane's components `t.components` (names of DAPR_CONTROL_PLANE, in
-- param system_namespace; kubectl logs -l app=dapr-operator) and of every daprd
-- sidecar in param namespace (kubectl logs POD -c daprd), and how many lines of
-- param app_id's sidecars name pub/sub (| grep -i pubsub):
-- {components = {{name, errors, top}...}, pubsub_lines, problems}.
M.dapr_logs = shared({ components = true }, function(a)
  local wanted = {}
  for _, c in ipairs(a.components) do wanted[c] = true end
  return {
    description = "kubectl logs -l app=dapr-... -n dapr-system and -c daprd: the errors of the control plane and the sidecars; the app's daprd lines about pub/sub",
    run = function(ctx)
      local k8s, log = require("k8s"), require("log")
      local problems, problem = collector()
      local out = { components = {}, pubsub_lines = 0, problems = problems }
      for _, c in ipairs(M.DAPR_CONTROL_PLANE) do
        if wanted[c.component] then
          local lines = k8s.logs { selector = "app=" .. c.name, namespace = ctx.params.system_namespace,
            since = ctx.params.log_since }
          local counts, errors = {}, 0
          for _, l in ipairs(lines) do
            if l:match("level=error") or l:match("level=fatal") then
              errors = errors + 1
              local m = dapr_message(l)
              counts[m] = (counts[m] or 0) + 1
            end
          end
          local top = {}
          for m, n in pairs(counts) do top[#top + 1] = { message = m, count = n } end
          table.sort(top, function(x, y) return x.count > y.count or x.count == y.count and x.message < y.message end)
          out.components[#out.components + 1] = { name = c.name, lines = #lines, errors = errors, top = top }
          if errors > 0 then
            problem("%s logged %d errors in the last %s, most often (%dx): %s", c.name, errors,
              require("duration").format(ctx.params.log_since), top[1].count, top[1].message)
          else log.info("%s: %d lines in the last %s, no errors", c.name, #lines, require("duration").format(ctx.params.log_since)) end
        end
      end
      for _, p in ipairs(k8s.list("pods", { namespace = ctx.params.namespace })) do
        local has_daprd = false
        for _, c in ipairs(p.spec.containers or {}) do has_daprd = has_daprd or c.name == "daprd" end
        if has_daprd then
          local app = (p.metadata.annotations or {})["dapr.io/app-id"] == ctx.params.app_id
          local lines = k8s.logs("pod/" .. p.metadata.name,
            { namespace = ctx.params.namespace, container = "daprd", since = ctx.params.log_since })
          local errors, first = 0, nil
          for _, l in ipairs(lines) do
            if app and l:lower():find("pubsub", 1, true) then out.pubsub_lines = out.pubsub_lines + 1 end
            if l:match("level=error") or l:match("level=fatal") then
              errors, first = errors + 1, first or dapr_message(l)
            end
          end
          if errors > 0 then problem("pod %s daprd logged %d errors, the first: %s", p.metadata.name, errors, first) end
        end
      end
      log.info("the daprd sidecars logged no errors but those named; %d lines of %s's name pub/sub in the last %s",
        out.pubsub_lines, ctx.params.app_id,
        require("duration").format(ctx.params.log_since))
      return out
    end,
  }
end)

return M
