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

local CHARSETS = {
  alnum = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789",
  hex = "0123456789abcdef",
  base64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/",
  urlsafe = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_",
}

local FIND = "Find the Secret and its users"

local function ns(ctx) return { namespace = ctx.params.namespace } end

-- `length` characters of `chars`, each drawn uniformly from /dev/urandom
-- (bytes past the last whole multiple of #chars are dropped, not folded).
local function generate(length, chars)
  local f <close> = assert(io.open("/dev/urandom", "rb"))
  local out, limit = {}, 256 - 256 % #chars
  while #out < length do
    for b in f:read(length * 2):gmatch(".") do
      local v = b:byte()
      if v < limit and #out < length then out[#out + 1] = chars:sub(v % #chars + 1, v % #chars + 1) end
    end
  end
  return secret.register(table.concat(out))
end

-- The restartable users, restarted, then waited for.
local function restart(ctx, users)
  for _, ref in ipairs(users) do k8s.rollout_restart(ref, ns(ctx)) end
  for _, ref in ipairs(users) do
    k8s.rollout_status(ref, { namespace = ctx.params.namespace, timeout = ctx.params.rollout_timeout, fail_fast = true })
  end
end

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
    return { users = restartable, others = others, had_key = has, resource_version = s.metadata.resourceVersion,
      copy = p.secret .. "-before-" .. os.date("!%Y%m%d%H%M%S") }
  end,
}

step "Set the new value" {
  description = "The old value kept in a copy of the Secret (NAME-before-STAMP), then the key set to the new one",
  needs = { FIND },
  confirm = true,
  run = function(ctx)
    local p, f = ctx.params, ctx.outputs[FIND]
    local value = p.value or generate(p.length, CHARSETS[p.charset])
    local s = k8s.get("secret/" .. p.secret, ns(ctx))
    if f.had_key and base64.decode(s.data[p.key]) == value then error("the new value is the current one", 0) end
    k8s.create { apiVersion = "v1", kind = "Secret", type = "Opaque",
      metadata = { name = f.copy, namespace = p.namespace, annotations = { ["runbook/rotated-from"] = p.secret .. "/" .. p.key } },
      data = { value = f.had_key and s.data[p.key] or nil } }
    k8s.patch("secret/" .. p.secret, { data = { [p.key] = base64.encode(value) } }, { namespace = p.namespace, type = "merge" })
    log.info("secret %s key %s: a new value of %d characters", p.secret, p.key, #value)
  end,
  undo = function(ctx)
    local p, f = ctx.params, ctx.outputs[FIND]
    local copy = k8s.get("secret/" .. f.copy, { namespace = p.namespace, missing_ok = true })
    if not copy then error(("the copy %s of the old value is gone: secret %s keeps the new value"):format(f.copy, p.secret), 0) end
    local old = copy.data and copy.data.value
    -- a JSON merge patch's null removes a key the Secret did not have before
    k8s.patch("secret/" .. p.secret, { data = { [p.key] = old or json.null } }, { namespace = p.namespace, type = "merge" })
    log.warn("secret %s key %s: the old value is back%s", p.secret, p.key,
      #f.users > 0 and ("; restarting " .. table.concat(f.users, ", ")) or "")
    restart(ctx, f.users)
    k8s.delete("secret/" .. f.copy, { namespace = p.namespace, missing_ok = true })
  end,
}

step "Restart the workloads that use it" {
  description = "A rolling restart of each deployment, statefulset and daemonset reading the Secret, waited for (gives up at once on a crash loop)",
  needs = { FIND, "Set the new value" },
  confirm = true,
  run = function(ctx)
    restart(ctx, ctx.outputs[FIND].users)
    if #ctx.outputs[FIND].users == 0 then log.info("no workload reads secret %s: nothing to restart", ctx.params.secret) end
    return { restarted = ctx.outputs[FIND].users }
  end,
}

step "Verify" {
  description = "The Secret holds a new value, every restarted workload is healthy, and the check answers",
  needs = { FIND, "Restart the workloads that use it" },
  run = function(ctx)
    local p, f = ctx.params, ctx.outputs[FIND]
    if ctx.dry_run then log.info("would read secret %s back and check %s", p.secret, p.check or "the workloads' health"); return end
    local s, copy = k8s.get("secret/" .. p.secret, ns(ctx)), k8s.get("secret/" .. f.copy, ns(ctx))
    if not (s.data and s.data[p.key]) or copy.data and copy.data.value == s.data[p.key] then
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
  needs = { FIND, "Verify" },
  run = function(ctx)
    k8s.delete("secret/" .. ctx.outputs[FIND].copy, { namespace = ctx.params.namespace, missing_ok = true })
  end,
}
