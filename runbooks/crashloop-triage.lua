-- crashloop-triage.lua: why a deployment's pods keep restarting, and the fix.
--
-- Replaces seed 004 "Pod Crash Loop" and "Out of Memory (OOM)": the pods'
-- reasons and restarts, their previous container's logs, the configuration
-- they need (image, ConfigMaps and Secrets, resource limits), the recent
-- change and Warning events; then one fix, offered as a step that asks first:
-- roll back past the change that brought the crash, or raise the memory limit
-- of a container that is OOM-killed. It verifies the fix held.
--
-- Also seed 000 "Pod Not Starting": a Pending pod the scheduler cannot place
-- (its FailedScheduling message; a rollback when a change brought it), a
-- PersistentVolumeClaim that is not bound, and an image the registry refuses
-- for want of credentials (the pod's imagePullSecrets checked): the last two
-- are named with what to create, and not fixed.
--
--   runbook run crashloop-triage -p deployment=todo-chatbot-backend --step
--   runbook run crashloop-triage -p deployment=todo-chatbot-backend -p fix=none    # diagnose only

name = "crashloop-triage"
description = "Diagnose a crash-looping, OOM-killed or not-starting deployment (reasons, previous logs, config, claims, pull secrets) and offer the fix"
replaces = { "000-6", "001-7", "004-3", "004-5" }
version = "1.0.0"

params (steps.params) { "deployment", "namespace" }
param "tail" { type = "integer", default = 20, help = "log lines to show per container (current and previous)" }
param "fix" { type = { "auto", "rollback", "memory", "restart", "none" }, default = "auto",
  help = "the fix to offer: auto (from the diagnosis), or force one; none only diagnoses" }
param "memory_factor" { type = "number", default = 2, help = "an OOM-killed container's memory limit is multiplied by this" }
param "observe" { type = "duration", default = "15s", help = "after the fix, how long the pods must stay up without a restart" }
param "timeout" { type = "duration", default = "3m", help = "how long the fix may take to roll out" }

local STUCK_IMAGE = { ImagePullBackOff = true, ErrImagePull = true, InvalidImageName = true }
-- What a registry's refusal says, in containerd's and Docker's words.
local AUTH_FAILURE = { "authorization failed", "pull access denied", "unauthorized", "no basic auth credentials" }

local function auth_failure(message)
  local m = (message or ""):lower()
  for _, w in ipairs(AUTH_FAILURE) do if m:find(w, 1, true) then return true end end
  return false
end

local function target(ctx) return "deploy/" .. ctx.params.deployment end
local function ns(ctx) return { namespace = ctx.params.namespace } end

step "Find the failing pods" {
  description = "kubectl get pods / describe: each pod's phase, containers' states and reasons, restarts, last termination",
  run = function(ctx)
    local h = k8s.deployment_health(ctx.params.namespace, ctx.params.deployment)
    local failing, oom, image, crash, auth, pending = {}, false, false, false, false, {}
    for _, p in ipairs(h.pods) do
      if p.unschedulable and not p.terminating then
        failing[#failing + 1] = { pod = p.name, state = "Pending", reason = "Unschedulable", message = p.unschedulable }
        pending[#pending + 1] = p.unschedulable
        log.warn("pod %s: Pending, not scheduled: %s", p.name, p.unschedulable)
      end
      for _, c in ipairs(p.containers) do
        local bad = c.waiting_reason and c.waiting_reason ~= "ContainerCreating" or c.last_termination_reason or not c.ready
        if bad and not p.terminating then
          failing[#failing + 1] = { pod = p.name, container = c.name, restarts = c.restarts, state = c.state,
            reason = c.waiting_reason, last = c.last_termination_reason, exit_code = c.last_exit_code }
          log.warn("pod %s container %s: %s%s, %d restarts%s", p.name, c.name, c.state,
            c.waiting_reason and (" (" .. c.waiting_reason .. ")") or "", c.restarts,
            c.last_termination_reason and (", last terminated: %s, exit code %s"):format(c.last_termination_reason,
              tostring(c.last_exit_code)) or "")
          oom = oom or c.last_termination_reason == "OOMKilled"
          image = image or STUCK_IMAGE[c.waiting_reason or ""] == true
          auth = auth or (STUCK_IMAGE[c.waiting_reason or ""] and auth_failure(c.waiting_message))
          crash = crash or c.waiting_reason == "CrashLoopBackOff"
        end
      end
    end
    if #failing == 0 then log.info("%s: %d/%d ready, no container failing", ctx.params.deployment, h.ready, h.desired) end
    return { failing = failing, oom = oom, image_pull = image, image_auth = auth, crash_loop = crash,
      unschedulable = pending, healthy = h.healthy }
  end,
}

step "Read the logs" {
  description = "kubectl logs --previous (the container that crashed) and the current logs, for the failing containers",
  needs = { "Find the failing pods" },
  when = function(ctx) return #ctx.outputs["Find the failing pods"].failing > 0 end,
  run = function(ctx)
    local errors, seen = {}, {}
    for i, f in ipairs(ctx.outputs["Find the failing pods"].failing) do
      if not f.container then goto next end   -- a pod never scheduled has no logs
      if i > 3 then log.info("(logs of %d more containers not shown)", #ctx.outputs["Find the failing pods"].failing - 3); break end
      for _, previous in ipairs { true, false } do
        local ok, lines = pcall(k8s.logs, "pod/" .. f.pod,
          { namespace = ctx.params.namespace, container = f.container, previous = previous, tail = ctx.params.tail })
        local which = previous and "previous" or "current"
        if not ok then
          log.info("%s/%s %s logs: %s", f.pod, f.container, which, tostring(type(lines) == "table" and lines.message or lines))
        elseif #lines > 0 then
          log.info("%s/%s %s logs (last %d lines):", f.pod, f.container, which, #lines)
          for _, l in ipairs(lines) do
            log.info("  %s", l)
            if (l:match("ERROR") or l:match("Error") or l:match("Killed")) and not seen[l] then
              seen[l] = true
              errors[#errors + 1] = l
            end
          end
        end
      end
      ::next::
    end
    return { error_lines = { table.unpack(errors, 1, math.min(#errors, 10)) } }
  end,
}

step "Check the configuration" {
  description = "The image, the ConfigMaps, Secrets, PersistentVolumeClaims and image pull secrets the pods need (do they exist, are the claims bound?), resource limits, the last change, Warning events",
  needs = { "Find the failing pods" },
  run = function(ctx)
    local d = k8s.get(target(ctx), ns(ctx))
    local missing, containers, claims, pull = {}, {}, {}, {}
    local pod_spec = d.spec.template.spec
    -- kubectl get pvc: a claim that is not Bound keeps its pods Pending; its last Warning says why.
    for _, v in ipairs(pod_spec.volumes or {}) do
      local name = v.persistentVolumeClaim and v.persistentVolumeClaim.claimName
      if name then
        local pvc = k8s.get("pvc/" .. name, { namespace = ctx.params.namespace, missing_ok = true })
        local phase = pvc and (pvc.status or {}).phase or "missing"
        if phase ~= "Bound" then
          local why = pvc and ("storage class %s"):format(pvc.spec.storageClassName or "(default)") or "it does not exist"
          for _, e in ipairs(k8s.events { namespace = ctx.params.namespace, type = "Warning", since = "1h" }) do
            if e.involvedObject.kind == "PersistentVolumeClaim" and e.involvedObject.name == name then why = why .. ": " .. (e.message or "") end
          end
          claims[#claims + 1] = ("persistentvolumeclaim %s is %s (%s)"):format(name, phase, why)
          log.warn("%s", claims[#claims])
        else
          log.info("persistentvolumeclaim %s: Bound to %s", name, pvc.spec.volumeName or "?")
        end
      end
    end
    -- The pull secrets: each must exist and be a kubernetes.io/dockerconfigjson Secret.
    for _, ref in ipairs(pod_spec.imagePullSecrets or {}) do
      local sec = k8s.get("secret/" .. ref.name, { namespace = ctx.params.namespace, missing_ok = true })
      local bad = not sec and ("secret %s (imagePullSecrets) does not exist"):format(ref.name)
        or sec.type ~= "kubernetes.io/dockerconfigjson"
          and ("secret %s (imagePullSecrets) is of type %s, not kubernetes.io/dockerconfigjson"):format(ref.name, tostring(sec.type))
      if bad then
        pull[#pull + 1] = bad
        log.warn("%s", bad)
      end
    end
    local function need(kind, name, key, optional)
      if optional then return end
      local o = k8s.get(kind .. "/" .. name, { namespace = ctx.params.namespace, missing_ok = true })
      if not o then missing[#missing + 1] = ("%s %s does not exist"):format(kind, name)
      elseif key and not ((o.data or {})[key] or (o.binaryData or {})[key]) then
        missing[#missing + 1] = ("%s %s has no key %s"):format(kind, name, key)
      end
    end
    for _, c in ipairs(d.spec.template.spec.containers) do
      for _, ef in ipairs(c.envFrom or {}) do
        if ef.configMapRef then need("configmap", ef.configMapRef.name, nil, ef.configMapRef.optional) end
        if ef.secretRef then need("secret", ef.secretRef.name, nil, ef.secretRef.optional) end
      end
      for _, e in ipairs(c.env or {}) do
        local vf = e.valueFrom or {}
        if vf.configMapKeyRef then need("configmap", vf.configMapKeyRef.name, vf.configMapKeyRef.key, vf.configMapKeyRef.optional) end
        if vf.secretKeyRef then need("secret", vf.secretKeyRef.name, vf.secretKeyRef.key, vf.secretKeyRef.optional) end
      end
      local res = c.resources or {}
      local limits, requests = res.limits or {}, res.requests or {}
      containers[#containers + 1] = { name = c.name, image = c.image, memory_limit = limits.memory, memory_request = requests.memory }
      log.info("container %s: image %s, memory request %s limit %s, cpu request %s limit %s", c.name, c.image,
        requests.memory or "-", limits.memory or "-", requests.cpu or "-", limits.cpu or "-")
    end
    for _, m in ipairs(missing) do log.warn("%s", m) end
    local change = k8s.last_change(target(ctx), ns(ctx))
    log.info("last change: revision %d (%s), %s ago%s", change.revision, table.concat(change.images, ", "),
      duration.format(change.age or 0), change.previous and (", before it revision %d"):format(change.previous.revision) or "")
    local prefix, pull_refused = ctx.params.deployment .. "-", false
    for _, e in ipairs(k8s.events { namespace = ctx.params.namespace, type = "Warning", since = "1h" }) do
      local obj = e.involvedObject.name or ""
      if obj == ctx.params.deployment or obj:sub(1, #prefix) == prefix then
        log.info("event %s %s x%d: %s", e.involvedObject.kind, obj, e.count or 1, e.message or "")
        pull_refused = pull_refused or (e.reason == "Failed" and auth_failure(e.message))
      end
    end
    return { containers = containers, missing = missing, claims = claims, pull_secrets = pull, pull_secret_count = #(pod_spec.imagePullSecrets or {}),
      pull_refused = pull_refused, change = { revision = change.revision, age = change.age,
      previous = change.previous and change.previous.revision or nil, previous_images = change.previous and change.previous.images } }
  end,
}

step "Diagnose" {
  description = "Name the cause and the fix to offer: more memory for OOM kills, a rollback for crashes and bad images",
  needs = { "Find the failing pods", "Check the configuration" },
  run = function(ctx, pods, cfg)
    local fix, detail = ctx.params.fix, {}
    local app = cfg.containers[1]
    local auto, why
    if #pods.failing == 0 then auto, why = "none", "no container is failing"
    elseif #cfg.claims > 0 then
      auto, why = "none", "pods are Pending: " .. table.concat(cfg.claims, "; ") ..
        ": fix the claim's storage class or provide a volume; no automatic fix"
    elseif pods.image_auth or pods.image_pull and (cfg.pull_refused or #cfg.pull_secrets > 0) then
      auto, why = "none", "the registry refuses to pull the image without credentials (ErrImagePull: authorization failed); " ..
        (#cfg.pull_secrets > 0 and table.concat(cfg.pull_secrets, "; ")
          or cfg.pull_secret_count == 0 and "the pods name no imagePullSecrets" or "the pull secret's credentials are refused") ..
        ": create or fix a kubernetes.io/dockerconfigjson Secret with the registry's auth; no automatic fix"
    elseif #cfg.missing > 0 then
      auto, why = "none", "configuration the pods need is missing (" .. table.concat(cfg.missing, "; ") ..
        "): create it, then restart; no automatic fix"
    elseif #pods.unschedulable > 0 then
      auto, why = "rollback", ("pods are Pending, the scheduler cannot place them (%s) since revision %d, %s ago"):format(
        pods.unschedulable[1], cfg.change.revision, duration.format(cfg.change.age or 0))
    elseif pods.oom then auto, why = "memory", "the app container is OOM-killed at its memory limit " .. tostring(app.memory_limit)
    elseif pods.image_pull or pods.crash_loop then
      auto, why = "rollback", (pods.image_pull and "the image cannot be pulled" or "the containers crash on start")
        .. (" since revision %d, %s ago"):format(cfg.change.revision, duration.format(cfg.change.age or 0))
    else auto, why = "restart", "containers are not ready without a known cause" end
    if fix == "auto" then fix = auto else why = why .. "; fix chosen with -p fix=" .. fix end
    if fix == "memory" then
      detail.container = app.name
      detail.memory_limit = app.memory_limit and k8s.scale_quantity(app.memory_limit, ctx.params.memory_factor)
      if not detail.memory_limit then
        fix, why = "none", "the app container has no readable memory limit to raise: set one in the chart"
      else
        log.info("offered fix: raise %s's memory limit %s -> %s", app.name, app.memory_limit, detail.memory_limit)
      end
    elseif fix == "rollback" then
      if not cfg.change.previous then fix, why = "none", why .. "; but there is no earlier revision to roll back to"
      else
        detail.revision = cfg.change.previous
        log.info("offered fix: roll back to revision %d (%s)", cfg.change.previous, table.concat(cfg.change.previous_images, ", "))
      end
    elseif fix == "restart" then log.info("offered fix: rollout restart")
    end
    log[fix == "none" and "warn" or "info"]("diagnosis: %s", why)
    return { fix = fix, why = why, detail = detail }
  end,
}

step "Apply the fix" {
  description = "The diagnosed fix (raise the memory limit, roll back, or restart), after asking",
  needs = { "Diagnose" },
  confirm = true,
  when = function(ctx) return ctx.outputs["Diagnose"].fix ~= "none" end,
  run = function(ctx, dx)
    if dx.fix == "memory" then
      steps.set_memory(ctx, ctx.params.deployment, dx.detail.container, dx.detail.memory_limit)
    elseif dx.fix == "rollback" then
      k8s.rollout_undo(target(ctx), { namespace = ctx.params.namespace, to_revision = dx.detail.revision })
    else
      k8s.rollout_restart(target(ctx), ns(ctx))
    end
    return { fix = dx.fix }
  end,
}

step "Verify the fix" {
  description = "The rollout finishes, and for `observe` no pod restarts and the deployment stays healthy",
  needs = { "Diagnose", "Apply the fix" },
  when = function(ctx) return ctx.outputs["Diagnose"].fix ~= "none" end,
  run = function(ctx)
    if ctx.dry_run then log.info("would wait for the rollout and watch the pods for %s", duration.format(ctx.params.observe)); return end
    k8s.rollout_status(target(ctx), { namespace = ctx.params.namespace, timeout = ctx.params.timeout, fail_fast = true })
    return steps.watch_restarts(ctx, ctx.params.deployment)
  end,
}
