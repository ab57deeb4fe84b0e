-- config-update.lua: set one key of a ConfigMap, a Secret or a Dapr component,
-- restart the deployments that read it, wait for them, verify; the old value
-- back on failure.
--
-- Replaces seed 001 "Configuration Management" (kubectl edit configmap, then
-- restart the pods) and seed 002 "Update Configuration" (kubectl edit configmap
-- or component, then kubectl rollout restart of the deployments that read it:
-- for a ConfigMap or Secret those whose pod templates name it in envFrom, env
-- or volumes; for a component, a metadata item, the Dapr-enabled deployments
-- in its scopes). The value is a secret param: never printed, and the old one
-- is kept in this process only, for the undo. When the restarted pods do not come up, the old
-- value goes back and the deployments are restarted onto it (on_failure = "undo").
--
--   runbook run config-update -p object=configmap/todo-chatbot-config -p key=LOG_LEVEL -p value=INFO
--   runbook run config-update -p object=secret/todo-chatbot-secrets -p key=SMTP_PASSWORD -p value=... --step
--   runbook run config-update -p object=component/kafka-pubsub -p key=maxMessageBytes -p value=2097152

name = "config-update"
description = "Set a key of a ConfigMap, Secret or Dapr component, restart the deployments that read it, wait, verify; the old value back on failure"
replaces = { "001-5", "002-3" }
version = "1.0.0"
on_failure = "undo"

param "object" { required = true, help = "configmap/NAME, secret/NAME or component/NAME (a Dapr component)" }
param "key" { required = true, help = "the key to set (a component's metadata item)" }
param "value" { required = true, secret = true, help = "its new value (never printed)" }
param "namespace" (steps.params.namespace)
param "timeout" { type = "duration", default = "5m", help = "how long each deployment's rollout may take" }

-- The key's value before the change (false: it had none), in this process only.
local previous

--- "configmap", "secret" or "component", and the object's name.
local function object(ctx)
  local kind, name = ctx.params.object:lower():match("^(%a+)/(.+)$")
  kind = ({ cm = "configmap", configmap = "configmap", secret = "secret", component = "component" })[kind or ""]
  if not kind then
    error(("param object: expected configmap/NAME, secret/NAME or component/NAME, got %q"):format(ctx.params.object), 0)
  end
  return kind, name, k8s.get(kind .. "/" .. name, { namespace = ctx.params.namespace })
end

--- A component's metadata items, and the index of the one named `key` (nil: none).
local function items(c, key)
  local list = c.spec.metadata or {}
  for i, m in ipairs(list) do
    if m.name == key then return list, i end
  end
  return list
end

--- The key's value in the object now (a Secret's decoded and registered), or false.
local function current(ctx)
  local kind, _, o = object(ctx)
  if kind == "component" then
    local list, i = items(o, ctx.params.key)
    if i and list[i].secretKeyRef then error(("%s is a secretKeyRef: change the Secret it names"):format(ctx.params.key), 0) end
    return i and list[i].value or false
  end
  local v = (o.data or {})[ctx.params.key]
  if v == nil then return false end
  return kind == "secret" and secret.register(base64.decode(v)) or v
end

--- Set the key to `v` (false: remove it).
local function set(ctx, v)
  local kind, name, o = object(ctx)
  local patch
  if kind == "component" then
    local list, i = items(o, ctx.params.key)
    if not v then
      table.remove(list, i)
    elseif i then
      list[i].value = v
    else
      list[#list + 1] = { name = ctx.params.key, value = v }
    end
    patch = { spec = { metadata = #list > 0 and list or k8s.array() } }
  else
    patch = { data = { [ctx.params.key] = v and (kind == "secret" and base64.encode(v) or v) or json.null } }
  end
  k8s.patch(kind .. "/" .. name, patch, { namespace = ctx.params.namespace, type = "merge",
    summary = ("set %s in %s %s"):format(ctx.params.key, kind, name) })
end

--- The deployments a component reaches: Dapr-enabled, and in its scopes when it has any.
local function dapr_users(c, namespace)
  local scoped = {}
  for _, app in ipairs(c.scopes or {}) do scoped[app] = true end
  local out = {}
  for _, d in ipairs(k8s.list("deployments", { namespace = namespace })) do
    local a = d.spec.template.metadata and d.spec.template.metadata.annotations or {}
    if a["dapr.io/enabled"] == "true" and (next(scoped) == nil or scoped[a["dapr.io/app-id"]]) then
      out[#out + 1] = { kind = "deployments", name = d.metadata.name }
    end
  end
  return out
end

local function restart(ctx, deployments)
  for _, d in ipairs(deployments) do k8s.rollout_restart("deploy/" .. d.name, { namespace = ctx.params.namespace }) end
end

step "Find the users" {
  description = "The key's value now, and the deployments that read the object (envFrom, env, volumes; a component's scopes)",
  run = function(ctx)
    local kind, name, o = object(ctx)
    previous = current(ctx)
    local users = kind == "component" and dapr_users(o, ctx.params.namespace)
      or k8s.users_of(kind .. "/" .. name, { namespace = ctx.params.namespace })
    local deployments, names, others = {}, {}, {}
    for _, u in ipairs(users) do
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

step "Wait for the rollouts" (steps.wait_rollouts { of = "Find the users", after = "Restart the users" })

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
