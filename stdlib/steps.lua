--- Steps that several shipped runbooks share, as step tables, and the params
-- they read, declared once:
--
--   param "namespace" (steps.params.namespace)
--   step "Stop writes" (steps.stop_writers { needs = { "Verify the backup set" } })
--   step "Start writes" (steps.start_writers { stopped = "Stop writes" })
--
-- Each step reads the params named below and takes the usual step fields
-- (description, needs, confirm ...) from its argument.
local M = {}

--- Params that mean the same in every runbook that declares them.
M.params = {
  namespace = { default = "todo-chatbot", help = "Kubernetes namespace" },
  writers = { default = "todo-chatbot-backend,todo-chatbot-recurring-task",
    help = "comma-separated deployments that write to the database: scaled to 0 while the data is replaced" },
  -- as param "timeout", which stop_writers and start_writers read
  writers_timeout = { type = "duration", default = "2m", help = "how long the writers may take to stop, and to come back" },
  database_url = { secret = true, default = os.getenv("DATABASE_URL"), help = "the database (default $DATABASE_URL)" },
  prefix = { default = "todo", help = "name of the backup sets in dir" },
  container = { default = "", help = "the container (default: each pod's default container)" },
  -- for service_deployment, measure_metric and verify_metric
  service_deployment = { default = "", help = "the service's deployment (default todo-chatbot-SERVICE)" },
  window = { default = "5m", help = "PromQL rate window" },
  hold = { type = "duration", default = "5m", help = "how long the value must stay under its threshold after the fix" },
  every = { type = "duration", default = "15s", help = "how often the value is evaluated while verifying" },
  -- for M.deployments
  deployments = { required = true, help = "comma-separated deployments, or all: every deployment in the namespace" },
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

--- The deployments of param `writers` (comma-separated names) as targets.
function M.writers(ctx)
  local list = {}
  for d in ctx.params.writers:gmatch("[^,%s]+") do list[#list + 1] = "deploy/" .. d end
  if #list == 0 then error("param writers: name at least one deployment", 0) end
  return list
end

--- The deployments of param `deployments` (names, "deploy/NAME"s, or "all")
-- in param namespace, each as {name, replicas}; a name the namespace lacks is an error.
function M.deployments(ctx)
  local k8s, ns = require "k8s", ctx.params.namespace
  local objs = {}
  if ctx.params.deployments == "all" then
    objs = k8s.list("deployments", { namespace = ns })
    if #objs == 0 then error(("namespace %s has no deployments"):format(ns), 0) end
  else
    for name in ctx.params.deployments:gmatch("[^,%s]+") do
      objs[#objs + 1] = k8s.get("deploy/" .. name:gsub("^deploy/", ""), { namespace = ns })
    end
    if #objs == 0 then error("param deployments: name at least one deployment, or all", 0) end
  end
  local out = {}
  for i, d in ipairs(objs) do out[i] = { name = d.metadata.name, replicas = d.spec.replicas or 1 } end
  return out
end

--- Wait for the rollout of each deployment in `ctx.outputs[t.of].deployments`
-- (param timeout each; kubectl rollout status), giving up at once on one
-- whose new pods crash-loop or cannot pull their image.
M.wait_rollouts = shared({ of = true }, function(a)
  local of = a.of
  return {
    description = "kubectl rollout status of each; gives up at once when new pods crash-loop or cannot pull their image",
    run = function(ctx)
      for _, d in ipairs(ctx.outputs[of].deployments) do
        require("k8s").rollout_status("deploy/" .. d.name, { namespace = ctx.params.namespace,
          timeout = ctx.params.timeout, fail_fast = true })
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
      local backupset = require "backupset"
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

--- Wait for the rollout of `t.target(ctx)` (kubectl rollout status) for at
-- most param `t.within` (default: timeout); gives up at once when its new
-- pods crash-loop or cannot pull their image.
M.rollout_status = shared({ target = true, within = true }, function(a)
  local target_of, within = a.target, a.within or "timeout"
  return {
    description = "kubectl rollout status; gives up at once when the new pods crash-loop or cannot pull their image",
    run = function(ctx)
      local r = require("k8s").rollout_status(target_of(ctx), { namespace = ctx.params.namespace,
        timeout = ctx.params[within], fail_fast = true })
      return { message = r.message }
    end,
  }
end)

--- The restored database against the set: row counts against its manifest,
-- and each query of param t.queries returns 0. `t.set(ctx)` is the set's
-- path; `t.kept` names the step that kept the database as it was (for the
-- message). In a dry run, nothing was restored: it shows the state now.
M.validate = shared({ set = true, queries = true, kept = true }, function(a)
  local set_of, queries, kept = a.set, a.queries, a.kept
  return {
    run = function(ctx)
      local backupset = require "backupset"
      local path = set_of(ctx)
      local problems = backupset.validate { manifest = backupset.verify(path), url = ctx.params.database_url,
        queries = backupset.queries(ctx.params[queries]) }
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
      local prom, log = require "prom", require "log"
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

--- The Service `name` selecting `labels`, with the ports `ports` of another Service.
function M.service_for(name, namespace, labels, ports)
  local list = {}
  for _, p in ipairs(ports) do
    list[#list + 1] = { name = p.name, port = p.port, targetPort = p.targetPort, protocol = p.protocol }
  end
  return { apiVersion = "v1", kind = "Service", metadata = { name = name, namespace = namespace, labels = labels },
    spec = { selector = labels, ports = list } }
end

return M
