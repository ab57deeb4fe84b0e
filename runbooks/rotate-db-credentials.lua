-- rotate-db-credentials.lua: a new database password, without an outage.
--
-- Replaces seed 002 "Rotating Secrets / Database Credentials" (create
-- database-secrets-new, kubectl set env --from=secret, rollout status, curl
-- /health, delete the old secret). The password is generated here, set in
-- PostgreSQL, written into a new Secret (the old Secret's keys, the password
-- replaced wherever it appears), the deployments that read the old Secret are
-- pointed at the new one (a rolling restart), the new password is checked to
-- connect and the old one to be refused, and the old Secret is deleted when
-- nothing else reads it. A failure undoes every step: the old password, the
-- old Secret in the deployments. No password is ever printed.
--
--   runbook run rotate-db-credentials --step
--   runbook run rotate-db-credentials -p secret=todo-chatbot-secrets -p url_key=DATABASE_URL

name = "rotate-db-credentials"
description = "New PostgreSQL password: set it, put it in a new Secret, roll the deployments onto it, verify, delete the old Secret"
replaces = { "002-11", "001-15" }
version = "1.0.0"
on_failure = "undo"

param "secret" { default = "todo-chatbot-secrets", help = "the Secret holding the database URL (a name from an earlier rotation works too)" }
param "url_key" { default = "DATABASE_URL", help = "its key holding postgresql://USER:PASSWORD@HOST/DB" }
param "namespace" (steps.params.namespace)
param "connect_url" { secret = true, default = os.getenv("DATABASE_URL"),
  help = "how this runbook reaches the database with the current password (default $DATABASE_URL; the Secret's URL may be in-cluster only)" }
param "rollout_timeout" { type = "duration", default = "5m", help = "how long each deployment may take to roll onto the new Secret" }

local function ns(ctx) return { namespace = ctx.params.namespace } end

local credentials = rotation.db_credentials

-- Every place a Secret's name appears in a pod template: envFrom and env.valueFrom.
local function references(tmpl, name)
  local n = 0
  for _, list in ipairs { tmpl.spec.containers or {}, tmpl.spec.initContainers or {} } do
    for _, c in ipairs(list) do
      for _, ef in ipairs(c.envFrom or {}) do if ef.secretRef and ef.secretRef.name == name then n = n + 1 end end
      for _, e in ipairs(c.env or {}) do
        local r = e.valueFrom and e.valueFrom.secretKeyRef
        if r and r.name == name then n = n + 1 end
      end
    end
  end
  for _, v in ipairs(tmpl.spec.volumes or {}) do if v.secret and v.secret.secretName == name then n = n + 1 end end
  return n
end

-- The pod template with every reference to `from` renamed to `to`.
local function repoint(tmpl, from, to)
  for _, list in ipairs { tmpl.spec.containers or {}, tmpl.spec.initContainers or {} } do
    for _, c in ipairs(list) do
      for _, ef in ipairs(c.envFrom or {}) do if ef.secretRef and ef.secretRef.name == from then ef.secretRef.name = to end end
      for _, e in ipairs(c.env or {}) do
        local r = e.valueFrom and e.valueFrom.secretKeyRef
        if r and r.name == from then r.name = to end
      end
    end
  end
  for _, v in ipairs(tmpl.spec.volumes or {}) do if v.secret and v.secret.secretName == from then v.secret.secretName = to end end
  return tmpl
end

-- Objects of a kind, none when the server does not serve the kind.
local function list_served(ctx, kind)
  local ok, items = pcall(k8s.list, kind, ns(ctx))
  if ok then return items end
  if type(items) == "table" and items.code == "unknown_resource" then return {} end
  error(items, 0)
end

-- Deployments reading `secret`, and the other objects that name it (which would break if it went).
local function users_of(ctx, secret)
  local deployments, others = {}, {}
  for _, d in ipairs(k8s.list("deployments", ns(ctx))) do
    if references(d.spec.template, secret) > 0 then deployments[#deployments + 1] = d.metadata.name end
  end
  for _, kind in ipairs { "statefulsets", "daemonsets", "cronjobs" } do
    for _, o in ipairs(list_served(ctx, kind)) do
      local tmpl = kind == "cronjobs" and o.spec.jobTemplate.spec.template or o.spec.template
      if references(tmpl, secret) > 0 then others[#others + 1] = kind .. "/" .. o.metadata.name end
    end
  end
  return deployments, others
end

local function new_password()
  local f = assert(io.open("/dev/urandom", "rb"))
  local bytes = f:read(24)
  f:close()
  return secret.register((bytes:gsub(".", function(c) return ("%02x"):format(c:byte()) end)))
end

-- A Secret's keys, decoded, every value registered as a secret.
local function secret_data(ctx, name)
  local s = k8s.get("secret/" .. name, ns(ctx))
  local data = {}
  for k, v in pairs(s.data or {}) do data[k] = secret.register(base64.decode(v)) end
  return data, s
end

-- The password in a Secret's database URL.
local function password_in(ctx, name) return select(2, credentials(secret_data(ctx, name)[ctx.params.url_key])) end

-- connect_url with another password.
local function url_with(ctx, password) return rotation.with_password(ctx.params.connect_url, password) end

local function set_password(ctx, url, password)
  rotation.set_db_password(url, ctx.outputs["Find the credentials and their users"].user, password)
end

local function repoint_deployment(ctx, name, from, to)
  local d = k8s.get("deploy/" .. name, ns(ctx))
  repoint(d.spec.template, from, to)
  k8s.replace(d)
end

-- Points the deployments from one Secret to the other and waits for them. When
-- that fails part way, the deployments already pointed go back to `from` (the
-- step's own undo, as the engine undoes only the steps that finished).
local function roll(ctx, from, to)
  local names, done = ctx.outputs["Find the credentials and their users"].deployments, {}
  local ok, err = pcall(function()
    for _, name in ipairs(names) do
      repoint_deployment(ctx, name, from, to)
      done[#done + 1] = name
    end
    for _, name in ipairs(names) do
      k8s.rollout_status("deploy/" .. name, { namespace = ctx.params.namespace, timeout = ctx.params.rollout_timeout,
        fail_fast = true })
    end
  end)
  if ok then return end
  if #done > 0 then log.warn("pointing %s back at secret %s", table.concat(done, ", "), from) end
  for _, name in ipairs(done) do repoint_deployment(ctx, name, to, from) end
  error(err, 0)
end

step "Find the credentials and their users" {
  description = "The Secret's database URL and user; the deployments that read the Secret; the current password connects",
  run = function(ctx)
    local url = secret_data(ctx, ctx.params.secret)[ctx.params.url_key]
    if not url then error(("secret %s has no key %s"):format(ctx.params.secret, ctx.params.url_key), 0) end
    local user = credentials(url)
    if not user then
      error(("secret %s key %s is not a postgresql://USER:PASSWORD@... URL"):format(ctx.params.secret, ctx.params.url_key), 0)
    end
    if not ctx.params.connect_url then error("param connect_url: no URL to reach the database with (set DATABASE_URL)", 0) end
    local cu = credentials(ctx.params.connect_url)
    if cu ~= user then error(("param connect_url connects as %s, but the Secret's user is %s"):format(tostring(cu), user), 0) end
    local db <close> = pg.connect(ctx.params.connect_url, { connect_timeout = "10s" })
    db:value("SELECT 1")
    local deployments, others = users_of(ctx, ctx.params.secret)
    log.info("secret %s: user %s; read by deployments %s%s", ctx.params.secret, user,
      #deployments > 0 and table.concat(deployments, ", ") or "(none)",
      #others > 0 and ("; also named by " .. table.concat(others, ", ")) or "")
    local base = ctx.params.secret:gsub("%-%d%d%d%d%d%d%d%d%d%d%d%d%d%d$", "")
    return { user = user, deployments = deployments, others = others,
      new_secret = base .. "-" .. os.date("!%Y%m%d%H%M%S") }
  end,
}

step "Create the new Secret" {
  description = "The old Secret's keys with the old password replaced by a new random one, under a new name",
  needs = { "Find the credentials and their users" },
  run = function(ctx)
    local data, s = secret_data(ctx, ctx.params.secret)
    local old, new = select(2, credentials(data[ctx.params.url_key])), new_password()
    local out = {}
    for k, v in pairs(data) do out[k] = base64.encode((v:gsub(old:gsub("%p", "%%%0"), (new:gsub("%%", "%%%%"))))) end
    k8s.create { apiVersion = "v1", kind = "Secret", type = s.type,
      metadata = { name = ctx.outputs["Find the credentials and their users"].new_secret, namespace = ctx.params.namespace,
        labels = s.metadata.labels, annotations = { ["runbook/rotated-from"] = ctx.params.secret } },
      data = out }
  end,
  undo = function(ctx)
    k8s.delete("secret/" .. ctx.outputs["Find the credentials and their users"].new_secret,
      { namespace = ctx.params.namespace, missing_ok = true })
  end,
}

step "Set the new password in PostgreSQL" {
  description = "ALTER ROLE ... PASSWORD: from now on new connections need the new password (open ones keep working)",
  needs = { "Find the credentials and their users", "Create the new Secret" },
  confirm = true,
  run = function(ctx)
    -- a dry run has no new Secret to read: its ALTER ROLE (rolled back) carries a throwaway password
    local new = ctx.dry_run and new_password() or password_in(ctx, ctx.outputs["Find the credentials and their users"].new_secret)
    set_password(ctx, ctx.params.connect_url, new)
  end,
  undo = function(ctx)
    local new = password_in(ctx, ctx.outputs["Find the credentials and their users"].new_secret)
    set_password(ctx, url_with(ctx, new), password_in(ctx, ctx.params.secret))
  end,
}

step "Roll the deployments onto the new Secret" {
  description = "Each deployment reading the old Secret reads the new one instead (kubectl set env --from=secret): a rolling restart, waited for",
  needs = { "Find the credentials and their users", "Set the new password in PostgreSQL" },
  confirm = true,
  run = function(ctx) roll(ctx, ctx.params.secret, ctx.outputs["Find the credentials and their users"].new_secret) end,
  undo = function(ctx) roll(ctx, ctx.outputs["Find the credentials and their users"].new_secret, ctx.params.secret) end,
}

step "Verify" {
  description = "The new password connects, the old one is refused, and every deployment is healthy on the new Secret",
  needs = { "Find the credentials and their users", "Roll the deployments onto the new Secret" },
  run = function(ctx, f)
    if ctx.dry_run then log.info("would connect with the new password and check the old one is refused"); return end
    local db <close> = pg.connect(url_with(ctx, password_in(ctx, f.new_secret)), { connect_timeout = "10s" })
    log.info("the new password connects as %s", db:value("SELECT current_user"))
    local ok, err = pcall(pg.connect, url_with(ctx, password_in(ctx, ctx.params.secret)), { connect_timeout = "10s" })
    if ok then err:close(); error("the old password still connects", 0) end
    log.info("the old password is refused: %s", tostring(type(err) == "table" and err.message or err))
    for _, name in ipairs(f.deployments) do
      local h = k8s.deployment_health(ctx.params.namespace, name)
      if not h.healthy then error(("%s is not healthy on the new Secret: %s"):format(name, table.concat(h.problems, "; ")), 0) end
    end
    log.info("%d deployments healthy on %s", #f.deployments, f.new_secret)
  end,
}

step "Delete the old Secret" {
  description = "kubectl delete secret OLD, unless something besides the rolled deployments still names it",
  needs = { "Find the credentials and their users", "Verify" },
  confirm = true,
  run = function(ctx, f)
    local deployments, others = users_of(ctx, ctx.params.secret)
    if not ctx.dry_run and #deployments > 0 then others[#others + 1] = "deployments " .. table.concat(deployments, ", ") end
    if #others > 0 then
      log.warn("keeping secret %s: %s still name it (point them at %s, then delete it)", ctx.params.secret,
        table.concat(others, ", "), f.new_secret)
      return { deleted = false }
    end
    k8s.delete("secret/" .. ctx.params.secret, ns(ctx))
    log.info("the credentials now live in secret %s; rotate again with -p secret=%s", f.new_secret, f.new_secret)
    return { deleted = true }
  end,
}
