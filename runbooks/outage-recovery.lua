-- outage-recovery.lua: bring a namespace's services back after an outage.
--
-- Replaces seed 000 "Complete Outage", seed 002 "Complete Service Outage" and
-- seed 003 "Complete System Recovery": instead of restarting everything and
-- watching `kubectl get pods`, it looks first, restarts only what is
-- unhealthy, rolls back what a restart did not fix when it changed recently
-- (a whole Helm release, as `helm rollback` does, when its last revision is the
-- recent change that renders them), and checks each service's /health through
-- the API server before saying so.
--
--   runbook run runbooks/outage-recovery.lua -p namespace=todo-chatbot --step
--   runbook run outage-recovery --dry-run          # what it would do, nothing changes

name = "outage-recovery"
description = "Assess a namespace, restart what is unhealthy, roll back recent changes that still fail, verify /health"
replaces = { "000-14", "001-7", "002-24" }
version = "1.0.0"

param "namespace" (steps.params.namespace)
param "health_path" (steps.params.health_path)
param "rollout_timeout" { type = "duration", default = "2m", help = "how long to wait for each restart or rollback to roll out" }
param "changed_within" { type = "duration", default = "24h",
  help = "roll back a deployment still failing after its restart only when its last change (past restarts) is this recent" }
param "rollback" { type = "boolean", default = true, help = "roll back recently changed deployments that still fail (false: report them only)" }
param "settle" { type = "duration", default = "30s", help = "how long the final verification waits for the namespace to become healthy" }
param "events_since" { type = "duration", default = "30m", help = "how far back to read Warning events" }
param "from_pod" { default = "", help = "also check PostgreSQL and Redis from inside this workload's pod, with its env (e.g. deploy/todo-chatbot-backend)" }
param "pg_connections_warn" { type = "number", default = 0.8, help = "warn when PostgreSQL connections reach this share of max_connections" }
param "max_error_rate" { type = "number", default = 0.01, help = "once healthy, the namespace's 5xx share must stay below this (Prometheus; skipped without PROMETHEUS_URL)" }
param "error_rate_window" (steps.params.error_rate_window)
param "error_rate_hold" { type = "duration", default = "1m", help = "how long the error rate must hold: recovered means serving, not only answering /health" }

-- The outcome goes to Slack when SLACK_WEBHOOK is set (channel SLACK_CHANNEL, default #incidents).
local SLACK = os.getenv("SLACK_WEBHOOK")
if SLACK and SLACK ~= "" then
  local slack = { slack = { webhook = SLACK, channel = os.getenv("SLACK_CHANNEL") or "#incidents" } }
  notify = { on_success = slack, on_failure = slack }
end

-- Waiting reasons a restart cannot fix: the new image or its configuration is wrong.
local NOT_BY_RESTART = { ImagePullBackOff = true, ErrImagePull = true, InvalidImageName = true,
  CreateContainerConfigError = true, CreateContainerError = true }

local function ns_opts(ctx) return { namespace = ctx.params.namespace } end

-- The first waiting reason a restart cannot fix, among a deployment's pods.
local function unfixable_by_restart(h)
  for _, p in ipairs(h.pods) do
    for _, c in ipairs(p.containers) do
      if c.waiting_reason and NOT_BY_RESTART[c.waiting_reason] then
        return ("pod %s container %s is %s"):format(p.name, c.name, c.waiting_reason)
      end
    end
  end
end

-- GET health_path of every service in front of each deployment, through the
-- API server's service proxy: {deployment = {ok, services = {...}}}, and how many fail.
local function check_services(ctx, deps)
  local out, failing = {}, 0
  for _, d in ipairs(deps) do
    local sh = k8s.service_health("deploy/" .. d.name, { namespace = ctx.params.namespace, path = ctx.params.health_path })
    for _, row in ipairs(sh.services) do
      if row.ok then log.info("%s %s: HTTP %d", row.service, ctx.params.health_path, row.status)
      else failing = failing + 1; log.warn("%s %s: %s", row.service, ctx.params.health_path, row.error) end
    end
    out[d.name] = sh
  end
  return out, failing
end

-- Every deployment's health, as step outputs keep it.
local function deployments_now(ctx)
  local h = k8s.namespace_health(ctx.params.namespace)
  local deps = {}
  for _, d in ipairs(h.deployments) do
    deps[#deps + 1] = { name = d.name, healthy = d.healthy, problems = d.problems, ready = d.ready, desired = d.desired,
      unfixable = unfixable_by_restart(d) }
  end
  return h, deps
end

-- The Helm release whose last revision is recent and renders failing deployments
-- (seed 000's `helm rollback`): the release and the names of those deployments.
local function recent_release(ctx, failing)
  for _, rel in ipairs(helm.releases { namespace = ctx.params.namespace }) do
    if rel.status == "deployed" and rel.revision > 1 and rel.age and rel.age <= ctx.params.changed_within then
      local rendered, hit = {}, {}
      for _, o in ipairs(helm.get(rel.name, { namespace = ctx.params.namespace }).objects) do
        if o.kind == "Deployment" then rendered[o.metadata.name] = true end
      end
      for _, d in ipairs(failing) do
        if rendered[d.name] then hit[#hit + 1] = d.name end
      end
      if #hit > 0 then return rel, hit end
    end
  end
end

-- Wait for each named rollout; {name = "ok" | "dry run" | error text}.
local function wait_rollouts(ctx, names)
  local out = {}
  for _, name in ipairs(names) do
    local ok, r = pcall(k8s.rollout_status, "deploy/" .. name,
      { namespace = ctx.params.namespace, timeout = ctx.params.rollout_timeout, fail_fast = true, progress = false })
    out[name] = ok and (r.dry_run and "dry run" or "ok") or tostring(type(r) == "table" and r.message or r)
    if not ok then log.warn("%s: %s", name, out[name]) elseif not r.dry_run then log.info("%s rolled out", name) end
  end
  return out
end

step "Assess the cluster" {
  description = "API server reachable, node readiness, each deployment's health with reasons, recent Warning events",
  retry = { attempts = 3, base = "2s" },
  run = function(ctx)
    local ns = ctx.params.namespace
    k8s.get("namespaces/" .. ns) -- the API answers and the namespace exists, or the step fails saying which
    local h, deps = deployments_now(ctx)
    for _, n in ipairs(h.nodes) do
      if n.ready then log.info("node %s Ready", n.name)
      else log.warn("node %s NotReady (%s): %s", n.name, n.reason or "?", n.message or "") end
    end
    if h.nodes_error then log.warn("nodes could not be read: %s", h.nodes_error) end
    local unhealthy = {}
    for _, d in ipairs(deps) do
      if d.healthy then log.info("deployment %s: %d/%d ready", d.name, d.ready, d.desired)
      else
        unhealthy[#unhealthy + 1] = d.name
        log.warn("deployment %s: %s", d.name, table.concat(d.problems, "; "))
      end
    end
    -- Warning events grouped by object and reason, most frequent first (seed 000 step 3)
    local groups, order = {}, {}
    for _, e in ipairs(k8s.events { namespace = ns, type = "Warning", since = ctx.params.events_since }) do
      local key = ("%s/%s %s"):format(e.involvedObject.kind, e.involvedObject.name, e.reason)
      if not groups[key] then groups[key] = { n = 0 }; order[#order + 1] = key end
      groups[key].n, groups[key].message = groups[key].n + (e.count or 1), e.message
    end
    table.sort(order, function(a, b) return groups[a].n > groups[b].n end)
    for i = 1, math.min(#order, 10) do
      log.info("event %s x%d: %s", order[i], groups[order[i]].n, groups[order[i]].message or "")
    end
    local notready = {}
    for _, n in ipairs(h.nodes) do if not n.ready then notready[#notready + 1] = n.name end end
    log.info("%d of %d deployments unhealthy, %d of %d nodes NotReady, %d kinds of Warning events in %s",
      #unhealthy, #deps, #notready, #h.nodes, #order, duration.format(ctx.params.events_since))
    return { deployments = deps, unhealthy = unhealthy, nodes_notready = notready, warning_kinds = #order }
  end,
}

step "Check dependencies" {
  description = "PostgreSQL connections against max_connections, Redis PING, Kafka brokers, Dapr sidecars",
  run = function(ctx)
    local r = checks.dependencies { namespace = ctx.params.namespace, pg_connections_warn = ctx.params.pg_connections_warn,
      from_pod = ctx.params.from_pod ~= "" and ctx.params.from_pod or nil }
    local deps, down = r.dependencies, r.down
    if #down > 0 then
      log.warn("dependencies down: %s; apps that crash because of them will not be rolled back", table.concat(down, ", "))
    end
    return { dependencies = deps, down = down }
  end,
}

step "Restart unhealthy deployments" {
  description = "rollout restart of each unhealthy deployment a restart can help (not those that cannot pull their image or read their config)",
  needs = { "Assess the cluster" },
  run = function(ctx)
    local restarted, left = {}, {}
    for _, d in ipairs(ctx.outputs["Assess the cluster"].deployments) do
      if not d.healthy then
        if d.unfixable then
          left[#left + 1] = d.name
          log.info("not restarting %s: %s (a restart cannot fix that)", d.name, d.unfixable)
        else
          k8s.rollout_restart("deploy/" .. d.name, ns_opts(ctx))
          restarted[#restarted + 1] = d.name
        end
      end
    end
    if #restarted == 0 then log.info("nothing to restart") end
    return { restarted = restarted, not_restarted = left }
  end,
}

step "Wait for rollouts" {
  description = "Wait until each restarted deployment has rolled out; stop waiting on one whose new pods crash-loop",
  needs = { "Restart unhealthy deployments" },
  idempotent = true,
  run = function(ctx, restart)
    return { rollouts = wait_rollouts(ctx, restart.restarted) }
  end,
}

step "Verify service health" {
  description = "GET each service's health path through the API server's service proxy, and read deployment health again",
  idempotent = true,
  run = function(ctx)
    local _, deps = deployments_now(ctx)
    local health = check_services(ctx, deps)
    local failing = {}
    for _, d in ipairs(deps) do
      local bad = {}
      for _, row in ipairs(health[d.name].services) do
        if not row.ok then bad[#bad + 1] = row.service .. " " .. row.error end
      end
      if not d.healthy or #bad > 0 then
        failing[#failing + 1] = { name = d.name, problems = d.problems, unfixable = d.unfixable,
          services = #bad > 0 and table.concat(bad, "; ") or nil }
      end
    end
    log.info("%d deployments still failing", #failing)
    return { health = health, failing = failing }
  end,
}

step "Roll back recent changes that still fail" {
  description = "helm rollback of a release whose recent last revision renders deployments still failing; rollout undo,"
    .. " past restarts, of each other deployment still failing whose last change is recent; then wait for them",
  needs = { "Verify service health", "Check dependencies" },
  confirm = true,
  run = function(ctx, health)
    local failing = health.failing
    if #failing == 0 or not ctx.params.rollback then
      log.info(#failing == 0 and "nothing is failing: nothing to roll back"
        or "rollback=false: not rolling back " .. #failing .. " failing deployments")
      return { rolled_back = {}, not_rolled_back = {}, rollouts = {} }
    end
    local deps_down = #ctx.outputs["Check dependencies"].down > 0
    local rolled, kept, release, in_release = {}, {}, nil, {}
    local rel, hit = recent_release(ctx, failing)
    if rel then
      local unfixable = false
      for _, name in ipairs(hit) do in_release[name] = true end
      for _, d in ipairs(failing) do unfixable = unfixable or (in_release[d.name] and d.unfixable ~= nil) end
      if deps_down and not unfixable then
        local why = ("a dependency is down; %s may be failing because of that, not because of release %s revision %d")
          :format(table.concat(hit, ", "), rel.name, rel.revision)
        for _, name in ipairs(hit) do kept[#kept + 1] = { name = name, reason = why } end
        log.warn("not rolling back release %s: %s", rel.name, why)
      else
        log.info("release %s revision %d (%s ago) renders %s, which still fail: helm rollback to revision %d", rel.name,
          rel.revision, duration.format(rel.age), table.concat(hit, ", "), rel.revision - 1)
        local r = helm.rollback(rel.name, { namespace = ctx.params.namespace })
        release = { name = rel.name, from = r.from, to = r.to, revision = r.revision, deployments = hit }
      end
    end
    local others = {} -- the failing deployments the release does not render (or none is recent)
    for _, d in ipairs(failing) do
      if not in_release[d.name] then others[#others + 1] = d end
    end
    for _, d in ipairs(others) do
      local c = k8s.last_change("deploy/" .. d.name, ns_opts(ctx))
      local why
      if not c.previous then why = "no earlier revision to roll back to"
      elseif not c.age or c.age > ctx.params.changed_within then
        why = ("its last change (revision %d) is %s old"):format(c.revision, duration.format(c.age or 0))
      elseif deps_down and not d.unfixable then
        why = "a dependency is down; its pods may be failing because of that, not because of revision " .. c.revision
      end
      if why then
        kept[#kept + 1] = { name = d.name, reason = why }
        log.warn("not rolling back %s: %s", d.name, why)
      else
        log.info("%s: revision %d (%s, %s ago) still fails; rolling back to revision %d (%s)", d.name, c.revision,
          table.concat(c.images, ", "), duration.format(c.age), c.previous.revision, table.concat(c.previous.images, ", "))
        k8s.rollout_undo("deploy/" .. d.name, { namespace = ctx.params.namespace, to_revision = c.previous.revision })
        rolled[#rolled + 1] = { name = d.name, from = c.revision, to = c.previous.revision, images = c.previous.images }
      end
    end
    local names = {}
    for _, r in ipairs(rolled) do names[#names + 1] = r.name end
    for _, name in ipairs(release and release.deployments or {}) do names[#names + 1] = name end
    return { rolled_back = rolled, release = release, not_rolled_back = kept, rollouts = wait_rollouts(ctx, names) }
  end,
}

-- The namespace's error rate held under max_error_rate (a metric gate), after
-- one rate window when this run restarted or rolled back something; a broken
-- gate or no data is a problem that remains, not a failed step.
local RESTART = "Restart unhealthy deployments"

local function error_rate_problem(ctx)
  local rolled = not ctx.skipped("Roll back recent changes that still fail")
    and #ctx.outputs["Roll back recent changes that still fail"].rolled_back > 0
  local ok, err = pcall(checks.error_rate, { name = ctx.params.namespace .. " error rate", below = ctx.params.max_error_rate,
    selector = ('namespace="%s"'):format(ctx.params.namespace), window = ctx.params.error_rate_window,
    hold = ctx.params.error_rate_hold, every = "5s",
    settle = rolled or not ctx.skipped(RESTART) and #ctx.outputs[RESTART].restarted > 0 })
  if ok then return nil end
  if type(err) ~= "table" or (err.code ~= "gate_failed" and err.code ~= "no_data") then error(err, 0) end
  return err.message
end

step "Final verification" {
  description = "Every deployment healthy, every service's health path answering, and the error rate held under max_error_rate",
  uses = { RESTART, "Roll back recent changes that still fail" }, -- through error_rate_problem
  idempotent = true,
  run = function(ctx)
    -- Pods of replaced ReplicaSets take a moment to go: give the namespace
    -- `settle` to become healthy before reading it for the verdict.
    local deadline = time.monotonic() + (ctx.dry_run and 0 or ctx.params.settle)
    while not k8s.namespace_health(ctx.params.namespace).healthy and time.monotonic() < deadline do time.sleep(1) end
    local h, deps = deployments_now(ctx)
    local health, failing_services = check_services(ctx, deps)
    local problems = {}
    for _, d in ipairs(deps) do
      for _, p in ipairs(d.problems) do problems[#problems + 1] = d.name .. ": " .. p end
    end
    table.sort(problems)
    for _, p in ipairs(problems) do log.warn("%s", p) end
    local services = 0
    for _, d in ipairs(deps) do
      for _, row in ipairs(health[d.name].services) do
        services = services + 1
        if not row.ok then problems[#problems + 1] = row.service .. " " .. ctx.params.health_path .. ": " .. row.error end
      end
    end
    if #problems == 0 then
      local problem = error_rate_problem(ctx)
      if problem then problems[#problems + 1] = problem end
    end
    local notready = {}
    for _, n in ipairs(h.nodes) do if not n.ready then notready[#notready + 1] = n.name end end
    if #notready > 0 then
      log.warn("nodes NotReady: %s (replace or drain them; this runbook does not)", table.concat(notready, ", "))
    end
    local recovered = #problems == 0
    if recovered then
      log.info("recovered: all %d deployments healthy, all %d services answer %s", #deps, services, ctx.params.health_path)
    else
      log.warn("not recovered: %d problems remain", #problems)
    end
    return { recovered = recovered, problems = problems, failing_services = failing_services, nodes_notready = notready }
  end,
}

step "Report" {
  description = "Post the outcome to Slack (when a webhook is set) and point to the run's report; fail the run when not recovered",
  needs = { "Final verification" }, uses = { "Restart unhealthy deployments", "Roll back recent changes that still fail", "Check dependencies" },
  run = function(ctx, final)
    local restarted = ctx.skipped(RESTART) and {} or ctx.outputs[RESTART].restarted
    local rolled = {}
    local ROLLBACK = "Roll back recent changes that still fail"
    local declined = ctx.skipped(ROLLBACK)
    for _, r in ipairs(declined and {} or ctx.outputs[ROLLBACK].rolled_back) do
      rolled[#rolled + 1] = ("%s (revision %d -> %d)"):format(r.name, r.from, r.to)
    end
    local release = not declined and ctx.outputs[ROLLBACK].release
    if release then
      rolled[#rolled + 1] = ("release %s (revision %d -> %d, recorded as %d)"):format(release.name, release.from, release.to, release.revision)
    end
    local would = ctx.dry_run and "would have " or ""
    local lines = {
      ("%s%s in %s%s"):format(ctx.dry_run and "Dry run: " or "", final.recovered and "recovered" or "NOT recovered",
        ctx.params.namespace, final.recovered and (": every deployment healthy, every service answers " .. ctx.params.health_path) or ""),
      would .. "restarted: " .. (#restarted > 0 and table.concat(restarted, ", ") or "none"),
      would .. "rolled back: " .. (#rolled > 0 and table.concat(rolled, ", ") or "none")
        .. (declined == "operator" and " (the operator declined the rollback)"
          or declined == "needs" and " (the rollback was skipped with a step it needs)" or ""),
    }
    for _, p in ipairs(final.problems) do lines[#lines + 1] = "problem: " .. p end
    local down = ctx.skipped("Check dependencies") and {} or ctx.outputs["Check dependencies"].down
    if #down > 0 then lines[#lines + 1] = "dependencies down: " .. table.concat(down, ", ") end
    lines[#lines + 1] = "timeline: runbook report " .. ctx.run_id
    for _, l in ipairs(lines) do log.info("%s", l) end
    if not final.recovered and not ctx.dry_run then -- the failure notification carries the whole report
      error(("not recovered: %d problems remain\n%s"):format(#final.problems, table.concat(lines, "\n")), 0)
    end
    return { recovered = final.recovered, report = "runbook report " .. ctx.run_id }
  end,
}
