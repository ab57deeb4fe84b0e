-- config-update.lua: set one key of a ConfigMap or a Secret, restart the
-- deployments that read it, wait for them, verify; the old value back on failure.
--
-- Replaces seed 001 "Configuration Management" (kubectl edit configmap, then
-- restart the pods) and does seed 002 "Update Configuration" for ConfigMaps and
-- Secrets (kubectl edit, then kubectl rollout restart of the deployments that
-- read it, found here from their pod templates: envFrom, env, volumes). The
-- value is a secret param: never printed, and the old one is kept in this
-- process only, for the undo. When the restarted pods do not come up, the old
-- value goes back and the deployments are restarted onto it (on_failure = "undo").
--
--   runbook run config-update -p object=configmap/todo-chatbot-config -p key=LOG_LEVEL -p value=INFO
--   runbook run config-update -p object=secret/todo-chatbot-secrets -p key=SMTP_PASSWORD -p value=... --step

name = "config-update"
description = "Set a key of a ConfigMap or Secret, restart the deployments that read it, wait, verify; the old value back on failure"
replaces = { "001-5" }
version = "1.0.0"
on_failure = "undo"

param "object" { required = true, help = "the ConfigMap or Secret: configmap/NAME or secret/NAME" }
param "key" { required = true, help = "the key to set" }
param "value" { required = true, secret = true, help = "its new value (never printed)" }
param "namespace" (steps.params.namespace)
param "timeout" { type = "duration", default = "5m", help = "how long each deployment's rollout may take" }

-- The key's value before the change (false: it had none), in this process only.
local previous

--- "configmap" or "secret", and the object's name.
local function object(ctx)
  local kind, name = ctx.params.object:lower():match("^(%a+)/(.+)$")
  kind = ({ cm = "configmap", configmap = "configmap", secret = "secret" })[kind or ""]
  if not kind then error(("param object: expected configmap/NAME or secret/NAME, got %q"):format(ctx.params.object), 0) end
  return kind, name
end

--- The key's value in the object now (a Secret's decoded and registered), or false.
local function current(ctx)
  local kind, name = object(ctx)
  local data = k8s.get(kind .. "/" .. name, { namespace = ctx.params.namespace }).data or {}
  local v = data[ctx.params.key]
  if v == nil then return false end
  return kind == "secret" and secret.register(base64.decode(v)) or v
end

--- Set the key to `v` (false: remove it).
local function set(ctx, v)
  local kind, name = object(ctx)
  if v and kind == "secret" then v = base64.encode(v) end
  k8s.patch(kind .. "/" .. name, { data = { [ctx.params.key] = v or json.null } }, { namespace = ctx.params.namespace,
    type = "merge", summary = ("set %s in %s %s"):format(ctx.params.key, kind, name) })
end

local function restart(ctx, deployments)
  for _, d in ipairs(deployments) do k8s.rollout_restart("deploy/" .. d.name, { namespace = ctx.params.namespace }) end
end

step "Find the users" {
  description = "The key's value now, and the deployments whose pod templates read the object (envFrom, env, volumes)",
  run = function(ctx)
    local kind, name = object(ctx)
    previous = current(ctx)
    local deployments, names, others = {}, {}, {}
    for _, u in ipairs(k8s.users_of(kind .. "/" .. name, { namespace = ctx.params.namespace })) do
      if u.kind == "deployments" then
        deployments[#deployments + 1], names[#names + 1] = { name = u.name }, u.name
      else
        others[#others + 1] = u.kind .. "/" .. u.name
      end
    end
    log.info("%s %s: key %s %s; read by %s", kind, name, ctx.params.key, previous and "set" or "not set yet",
      #names > 0 and table.concat(names, ", ") or "no deployment")
    if #others > 0 then log.warn("also read by %s: restart them yourself", table.concat(others, ", ")) end
    return { deployments = deployments }
  end,
}

step "Change the key" {
  description = "kubectl patch: the key set to the new value (undo: the old value, and the users restarted onto it)",
  confirm = true,
  needs = { "Find the users" },
  run = function(ctx)
    if previous == ctx.params.value then log.info("%s already has that value", ctx.params.key) end
    set(ctx, ctx.params.value)
  end,
  undo = function(ctx)
    if previous == nil then error("the old value was read by another process: set it back by hand", 0) end
    set(ctx, previous)
    restart(ctx, ctx.outputs["Find the users"].deployments)
    log.info("%s back to its old value; its users restarted onto it", ctx.params.key)
  end,
}

step "Restart the users" {
  description = "kubectl rollout restart of each deployment that reads the object",
  needs = { "Find the users", "Change the key" },
  run = function(ctx) restart(ctx, ctx.outputs["Find the users"].deployments) end,
}

step "Wait for the rollouts" (steps.wait_rollouts { of = "Find the users", needs = { "Find the users", "Restart the users" } })

step "Verify" {
  description = "The object holds the new value, and every deployment that reads it is healthy",
  needs = { "Find the users", "Restart the users" },
  run = function(ctx)
    if not ctx.dry_run and current(ctx) ~= ctx.params.value then
      error(("%s does not hold the new value of %s (changed since?)"):format(ctx.params.object, ctx.params.key), 0)
    end
    for _, d in ipairs(ctx.outputs["Find the users"].deployments) do
      local h = k8s.deployment_health(ctx.params.namespace, d.name)
      if not h.healthy and not ctx.dry_run then
        error(("%s is not healthy: %s"):format(d.name, table.concat(h.problems, "; ")), 0)
      end
      log.info("%s: %d of %d ready", d.name, h.ready, h.desired)
    end
  end,
}
