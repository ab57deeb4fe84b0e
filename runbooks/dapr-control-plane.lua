-- dapr-control-plane.lua: is Dapr's control plane healthy, and are the sidecars injected?
--
-- Replaces seed 001 "Dapr-Specific Issues" and seed 002 "Check Dapr
-- Installation", "Check Dapr Components", "Dapr Sidecar Not Injected" and
-- "Dapr Pub/Sub Not Working": `dapr status -k` and `kubectl get pods -n
-- dapr-system` (each of the operator, placement, sentry and sidecar injector
-- ready, its version and restarts), `kubectl logs -l app=dapr-operator` and the
-- others' logs (their errors), the pods annotated dapr.io/enabled without a
-- daprd container, and dapr-pubsub-check's checks (the component and its
-- brokers, the topics, the sidecar's healthz and a test event, the daprd lines
-- about pub/sub). Then it fixes what the seeds fix: `kubectl rollout restart`
-- of the unhealthy control-plane workloads (or all of them, as seed 002 does),
-- and `kubectl delete pod` of the pods without a sidecar so that the injector,
-- working again, injects their replacements. Each fix asks first; the last
-- step checks that it held.
--
--   runbook run dapr-control-plane --step
--   runbook run dapr-control-plane -p restart=all     # seed 002: restart every dapr-system workload

name = "dapr-control-plane"
description = "Dapr's control plane (operator, placement, sentry, injector): health, logs, sidecar injection and pub/sub; restart what fails, re-create pods without sidecars"
replaces = { "001-10", "002-17", "002-18", "002-19", "002-20" }
version = "1.0.0"

params (steps.dapr_params) { "namespace", "system_namespace", "pubsub", "app_id", "topic", "topics", "test_publish",
  "publish_timeout", "log_since" }
param "restart" { default = "unhealthy", values = { "unhealthy", "all", "none" },
  help = "which control-plane workloads to restart: those unhealthy or logging errors, all (seed 002), none" }
param "timeout" { type = "duration", default = "2m", help = "how long each restart and the re-created pods may take" }

local function sys(ctx) return { namespace = ctx.params.system_namespace } end

-- The control plane's workload of a component: "deploy/NAME" or "sts/NAME" (placement is a
-- StatefulSet in Dapr's chart), or nil when neither exists.
local function target_of(ctx, name)
  for _, kind in ipairs { "deploy", "sts" } do
    if k8s.get(kind .. "/" .. name, { namespace = ctx.params.system_namespace, missing_ok = true }) then
      return kind .. "/" .. name
    end
  end
end

-- "1.14.4" from the first container's image.
local function version_of(h)
  local c = (h.pods[1] or {}).containers or {}
  return c[1] and c[1].image and c[1].image:match(":([^:/]+)$") or "?"
end

step "Check the control plane" {
  description = "dapr status -k: each of the operator, placement, sentry and sidecar injector there, ready, its version and restarts",
  run = function(ctx)
    local rows, problems = {}, {}
    for _, c in ipairs(steps.DAPR_CONTROL_PLANE) do
      local target = target_of(ctx, c.name)
      local row = { name = c.name, target = target, problems = {} }
      if not target then
        row.problems[1] = ("not installed in %s (no deployment or statefulset %s)"):format(ctx.params.system_namespace, c.name)
      else
        local h = k8s.deployment_health(ctx.params.system_namespace, target)
        row.ready, row.desired, row.version, row.restarts = h.ready, h.desired, version_of(h), 0
        for _, p in ipairs(h.pods) do row.restarts = row.restarts + p.restarts end
        for _, p in ipairs(h.problems) do row.problems[#row.problems + 1] = p end
        -- an unhealthy workload's pod whose container ended: the last lines it wrote (kubectl logs --previous)
        for _, p in ipairs(h.pods) do
          if not h.healthy and p.last_termination_reason then
            local last = k8s.logs("pod/" .. p.name, { namespace = ctx.params.system_namespace, previous = true, tail = 3 })
            row.problems[#row.problems + 1] = ("pod %s ended %s; its last lines: %s"):format(p.name,
              p.last_termination_reason, #last > 0 and table.concat(last, " / ") or "(none)")
          end
        end
        if h.desired == 0 then row.problems[#row.problems + 1] = ("scaled to 0 (kubectl scale %s -n %s --replicas=1)")
          :format(target, ctx.params.system_namespace) end
      end
      row.healthy = #row.problems == 0
      log.info("%-24s %-8s %s/%s ready  version %s  restarts %s", c.name, row.healthy and "healthy" or "UNHEALTHY",
        tostring(row.ready or 0), tostring(row.desired or 0), tostring(row.version or "-"), tostring(row.restarts or 0))
      for _, p in ipairs(row.problems) do
        problems[#problems + 1] = c.name .. ": " .. p
        log.warn("%s: %s", c.name, p)
      end
      rows[#rows + 1] = row
    end
    return { workloads = rows, problems = problems }
  end,
}

step "Read the Dapr logs" (steps.dapr_logs { components = { "operator", "placement", "sentry", "injector" } })
step "Check the sidecars" (steps.dapr_sidecars {})
step "Check the component" (steps.dapr_component {})
step "Check the topics" (steps.dapr_topics {})
step "Check the sidecar and publish" (steps.dapr_publish {})

step "Restart the control plane" {
  description = "kubectl rollout restart of the control-plane workloads that are unhealthy or log errors (param restart), and wait for each",
  needs = { "Check the control plane", "Read the Dapr logs" },
  confirm = true,
  run = function(ctx)
    local errors = {}
    for _, c in ipairs(ctx.outputs["Read the Dapr logs"].components) do errors[c.name] = c.errors end
    local restarted = {}
    for _, w in ipairs(ctx.outputs["Check the control plane"].workloads) do
      local why = not w.healthy and "unhealthy" or (errors[w.name] or 0) > 0 and "logs errors"
        or ctx.params.restart == "all" and "restart=all"
      if w.target and (w.desired or 0) > 0 and why and ctx.params.restart ~= "none" then
        log.info("restarting %s (%s)", w.target, why)
        k8s.rollout_restart(w.target, sys(ctx))
        restarted[#restarted + 1] = w.target
      end
    end
    -- a rollout that fails (new pods crash-looping) is named and left to Verify: the others go on
    local failed = {}
    for _, t in ipairs(restarted) do
      local ok, err = pcall(k8s.rollout_status, t, { namespace = ctx.params.system_namespace,
        timeout = ctx.params.timeout, fail_fast = true })
      if not ok then
        failed[#failed + 1] = t
        log.warn("%s did not roll out: %s", t, tostring(err))
      end
    end
    if #restarted == 0 then log.info("nothing to restart (restart=%s)", ctx.params.restart) end
    return { restarted = restarted, failed = failed, at = os.time() }
  end,
}

-- Whether the sidecar injector can inject: its workload ready (after the restart, a new pod).
local function injector_ready(ctx)
  local h = k8s.deployment_health(ctx.params.system_namespace, target_of(ctx, "dapr-sidecar-injector") or "dapr-sidecar-injector")
  return h.healthy, h
end

-- Whether the injector logged errors and has not been restarted since.
local function injector_failing(ctx)
  local restarted = not ctx.skipped("Restart the control plane") and ctx.outputs["Restart the control plane"].restarted or {}
  for _, t in ipairs(restarted) do
    if t:match("/dapr%-sidecar%-injector$") then return false end
  end
  for _, c in ipairs(ctx.outputs["Read the Dapr logs"].components) do
    if c.name == "dapr-sidecar-injector" then return c.errors > 0 end
  end
  return false
end

step "Re-create the pods without a sidecar" {
  description = "kubectl delete pod of each pod annotated dapr.io/enabled without daprd, once the injector is ready; wait for their replacements to have a ready daprd",
  needs = { "Check the sidecars", "Read the Dapr logs" },
  uses = { "Restart the control plane" },
  confirm = true,
  run = function(ctx)
    local missing = ctx.outputs["Check the sidecars"].missing
    if #missing == 0 then
      log.info("every Dapr-enabled pod has its daprd container")
      return { deleted = {} }
    end
    local ok, h = injector_ready(ctx)
    if not ok then
      error(("the sidecar injector is not ready (%s): pods re-created now would come back without daprd")
        :format(table.concat(h.problems, "; ")), 0)
    end
    if injector_failing(ctx) then
      error("the sidecar injector logs errors and was not restarted: pods re-created now would come back without daprd", 0)
    end
    for _, pod in ipairs(missing) do
      k8s.delete("pod/" .. pod, { namespace = ctx.params.namespace, missing_ok = true })
    end
    if not ctx.dry_run then
      time.wait_until({ timeout = ctx.params.timeout, what = "the re-created pods to run a ready daprd" }, function()
        local s = dapr.sidecar_status(ctx.params.namespace)
        for _, p in ipairs(s.pods) do
          if p.problem then return false end
        end
        return true
      end)
    end
    log.info("re-created %d pods: %s", #missing, table.concat(missing, ", "))
    return { deleted = missing }
  end,
}

local FINDINGS = { "Check the component", "Check the topics", "Check the sidecar and publish" }

step "Verify" {
  description = "The control plane healthy with no errors logged since the restart, every Dapr-enabled pod with a ready daprd, and pub/sub as found",
  uses = { "Restart the control plane", "Check the control plane", "Check the sidecars", "Read the Dapr logs",
    table.unpack(FINDINGS) },
  run = function(ctx)
    local problems = {}
    local function add(list) for _, p in ipairs(list) do problems[#problems + 1] = p end end
    if ctx.dry_run then
      -- nothing was fixed: what the checks found is what there is
      for _, name in ipairs { "Check the control plane", "Read the Dapr logs", "Check the sidecars" } do
        if not ctx.skipped(name) then add(ctx.outputs[name].problems) end
      end
    else
      for _, c in ipairs(steps.DAPR_CONTROL_PLANE) do
        local target = target_of(ctx, c.name)
        if not target then problems[#problems + 1] = c.name .. ": not installed"
        else
          local h = k8s.deployment_health(ctx.params.system_namespace, target)
          for _, p in ipairs(h.problems) do problems[#problems + 1] = c.name .. ": " .. p end
          local r = not ctx.skipped("Restart the control plane") and ctx.outputs["Restart the control plane"]
          local since = r and #r.restarted > 0 and math.max(1, os.time() - r.at) or ctx.params.log_since
          for _, l in ipairs(k8s.logs { selector = "app=" .. c.name, namespace = ctx.params.system_namespace, since = since }) do
            if l:match("level=error") or l:match("level=fatal") then
              problems[#problems + 1] = c.name .. " still logs errors: " .. (l:match('msg="(.-)"%s') or l)
              break
            end
          end
        end
      end
      for _, p in ipairs(dapr.sidecar_status(ctx.params.namespace).pods) do
        if p.problem then problems[#problems + 1] = ("pod %s: %s"):format(p.pod, p.problem) end
      end
    end
    for _, name in ipairs(FINDINGS) do
      if ctx.skipped(name) then log.warn("%s was skipped: not checked", name) else add(ctx.outputs[name].problems) end
    end
    if #problems > 0 then
      error(("%d problem%s with Dapr:\n  %s"):format(#problems, #problems == 1 and "" or "s", table.concat(problems, "\n  ")), 0)
    end
    log.info("Dapr's control plane is healthy, every Dapr-enabled pod in %s has a ready sidecar, pub/sub %s works",
      ctx.params.namespace, ctx.params.pubsub)
    return { ok = true }
  end,
}
