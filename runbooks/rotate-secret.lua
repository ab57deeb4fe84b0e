-- rotate-secret.lua: one key of a Kubernetes Secret gets a new value, and every pod that reads it.
--
-- Replaces seed 002 "Rotating Secrets / Kubernetes Secrets" (NEW=$(openssl
-- rand -base64 32); kubectl create secret --dry-run=client -o yaml | kubectl
-- apply; kubectl rollout restart) and the API-key part of seed 001
-- "Certificate and Secret Rotation". The value is generated (length, charset)
-- or given (param value, secret); the old one is kept in a copy of the
-- Secret until the rotation is verified; the deployments, statefulsets and
-- daemonsets whose pods read the Secret (volumes, envFrom, env valueFrom) are
-- restarted and waited for; an optional check (an HTTP GET through the API
-- server's service proxy) must pass. Any failure puts the old value back and
-- restarts the workloads again. No value is ever printed.
--
--   runbook run rotate-secret -p secret=api-keys -p key=api-key --step
--   runbook run rotate-secret -p secret=api-keys -p key=api-key -p length=48 -p charset=hex \
--     -p check=svc/todo-chatbot-backend:8000/health

name = "rotate-secret"
description = "A new value for one key of a Secret (generated or given), the workloads that read it restarted and verified, the old value back on failure"
version = "1.0.0"
replaces = { "002-13", "001-15" }
on_failure = "undo"

param "secret" { required = true, help = "the Secret's name" }
param "key" { required = true, help = "the key to rotate (a new key is added)" }
param "namespace" (steps.params.namespace)
param "value" { secret = true, help = "the new value (default: generated)" }
param "length" { type = "integer", default = 32, help = "generated value: its length in characters" }
param "charset" { type = { "alnum", "hex", "base64", "urlsafe" }, default = "alnum", help = "generated value: its characters" }
param "check" { help = "svc/NAME:PORT/PATH: a GET through the API server's service proxy that must answer below 400 after the restarts" }
param "rollout_timeout" { type = "duration", default = "5m", help = "how long each restarted workload may take" }

local FIND = "Find the Secret and its users"

local function ns(ctx) return { namespace = ctx.params.namespace } end

step(FIND) {
  description = "The Secret and the key; the workloads whose pods read the Secret (volumes, envFrom, env)",
  run = function(ctx)
    local p = ctx.params
    if p.length < 8 then error("param length: at least 8 characters", 0) end
    local s = k8s.get("secret/" .. p.secret, ns(ctx))
    local has = s.data and s.data[p.key] ~= nil
    local restartable, others = {}, {}
    for _, u in ipairs(k8s.users_of("secret/" .. p.secret, ns(ctx))) do
      local ref = u.kind .. "/" .. u.name
      if u.restartable then restartable[#restartable + 1] = ref else others[#others + 1] = ref end
      log.info("%s reads it (%s)", ref, table.concat(u.how, ", "))
    end
    if not has then log.warn("secret %s has no key %s yet: it will be added", p.secret, p.key) end
    if #others > 0 then log.info("%s get the new value on their next run", table.concat(others, ", ")) end
    return { users = restartable, others = others }
  end,
}

step "Set the new value" {
  description = "The old value kept in a copy of the Secret (NAME-before-STAMP-KEY), then the key set to the new one",
  needs = { FIND },
  confirm = true,
  run = function(ctx)
    local p = ctx.params
    local value = p.value or rotation.generate(p.length, p.charset)
    local r = rotation.set { namespace = p.namespace, secret = p.secret, key = p.key, value = value }
    log.info("secret %s key %s: a new value of %d characters", p.secret, p.key, #value)
    return r
  end,
  undo = function(ctx, out)
    local p, users = ctx.params, ctx.outputs[FIND].users
    rotation.restore { namespace = p.namespace, secret = p.secret, key = p.key, copy = out.copy }
    log.warn("secret %s key %s: the old value is back%s", p.secret, p.key,
      #users > 0 and ("; restarting " .. table.concat(users, ", ")) or "")
    rotation.restart(users, { namespace = p.namespace, timeout = p.rollout_timeout })
  end,
}

step "Restart the workloads that use it" {
  description = "A rolling restart of each deployment, statefulset and daemonset reading the Secret, waited for (gives up at once on a crash loop)",
  needs = { FIND, "Set the new value" },
  confirm = true,
  run = function(ctx, found)
    rotation.restart(found.users, { namespace = ctx.params.namespace, timeout = ctx.params.rollout_timeout })
    if #ctx.outputs[FIND].users == 0 then log.info("no workload reads secret %s: nothing to restart", ctx.params.secret) end
    return { restarted = ctx.outputs[FIND].users }
  end,
}

step "Verify" {
  description = "The Secret holds a new value, every restarted workload is healthy, and the check answers",
  needs = { FIND, "Set the new value", "Restart the workloads that use it" },
  run = function(ctx, f)
    local p = ctx.params
    if ctx.dry_run then log.info("would read secret %s back and check %s", p.secret, p.check or "the workloads' health"); return end
    if not rotation.holds_new { namespace = p.namespace, secret = p.secret, key = p.key, copy = ctx.outputs["Set the new value"].copy } then
      error(("secret %s key %s does not hold the new value"):format(p.secret, p.key), 0)
    end
    for _, ref in ipairs(f.users) do
      local kind, name = ref:match("^(.-)/(.*)$")
      if kind == "deployments" then
        local h = k8s.deployment_health(p.namespace, name)
        if not h.healthy then error(("%s is not healthy with the new value: %s"):format(ref, table.concat(h.problems, "; ")), 0) end
      end
    end
    if p.check then
      local target, path = p.check:match("^(svc/[^/]+)(/.*)$")
      if not target then error(("param check: %q is not svc/NAME:PORT/PATH"):format(p.check), 0) end
      local r = k8s.proxy_get(target, path, ns(ctx))
      if r.status >= 400 then error(("check %s answered %d with the new value"):format(p.check, r.status), 0) end
      log.info("check %s: %d", p.check, r.status)
    end
    log.info("secret %s key %s rotated; %d workloads restarted", p.secret, p.key, #f.users)
  end,
}

step "Delete the copy of the old value" {
  description = "The old value is no longer needed once the new one is verified",
  needs = { "Set the new value", "Verify" },
  run = function(ctx, set)
    k8s.delete("secret/" .. set.copy, { namespace = ctx.params.namespace, missing_ok = true })
  end,
}
