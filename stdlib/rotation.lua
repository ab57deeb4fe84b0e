--- rotation: a new value for a key of a Kubernetes Secret, undoable without
-- keeping the old value anywhere but the cluster (used by rotate-secret and
-- security-incident).
--
--   rotation.generate(length, charset) -> value   uniform over the charset
--       ("alnum", "hex", "base64", "urlsafe"), from /dev/urandom, registered as a secret
--   rotation.set{namespace, secret, key, value} -> {copy, had_key}   the old value
--       copied into a Secret NAME-before-STAMP-KEY, then the key set (both gated)
--   rotation.restore{namespace, secret, key, copy}   the old value back (a key
--       that was new removed), the copy deleted
--   rotation.holds_new{namespace, secret, key, copy} -> boolean   the key differs from the copy
--   rotation.restart(refs, {namespace, timeout})   a rolling restart of each, then waits for each
--   rotation.readers(namespace, secret) -> restartable refs, other refs  (k8s.users_of)
--   rotation.db_credentials(url) -> user, password   of a postgresql://USER:PASSWORD@... URL (nil if not one)
--   rotation.with_password(url, password) -> url     the URL with another password
--   rotation.set_db_password(url, user, password)    ALTER ROLE user PASSWORD, connected by url (a gated write)
local k8s = require("k8s")
local base64 = require("base64")
local json = require("json")
local secret = require("secret")

local M = {}

M.CHARSETS = {
  alnum = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789",
  hex = "0123456789abcdef",
  base64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/",
  urlsafe = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_",
}

-- Bytes past the last whole multiple of #chars are dropped, not folded (no modulo bias).
function M.generate(length, charset)
  local chars = M.CHARSETS[charset or "alnum"]
  if not chars then error(("rotation.generate: unknown charset %s"):format(tostring(charset)), 2) end
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

local function copy_name(o)
  return (o.secret .. "-before-" .. os.date("!%Y%m%d%H%M%S") .. "-" .. o.key:lower():gsub("[^%w]", "-")):sub(1, 253)
end

function M.set(o)
  local s = k8s.get("secret/" .. o.secret, { namespace = o.namespace })
  local old = s.data and s.data[o.key]
  if old and base64.decode(old) == o.value then error(("secret %s key %s: the new value is the current one"):format(o.secret, o.key), 2) end
  local copy = copy_name(o)
  k8s.create { apiVersion = "v1", kind = "Secret", type = "Opaque",
    metadata = { name = copy, namespace = o.namespace, annotations = { ["runbook/rotated-from"] = o.secret .. "/" .. o.key } },
    data = { value = old } }
  k8s.patch("secret/" .. o.secret, { data = { [o.key] = base64.encode(o.value) } }, { namespace = o.namespace, type = "merge" })
  return { copy = copy, had_key = old ~= nil }
end

function M.restore(o)
  local c = k8s.get("secret/" .. o.copy, { namespace = o.namespace, missing_ok = true })
  if not c then error(("the copy %s of the old value is gone: secret %s keeps the new value"):format(o.copy, o.secret), 2) end
  -- a JSON merge patch's null removes a key the Secret did not have before
  k8s.patch("secret/" .. o.secret, { data = { [o.key] = c.data and c.data.value or json.null } }, { namespace = o.namespace, type = "merge" })
  k8s.delete("secret/" .. o.copy, { namespace = o.namespace, missing_ok = true })
end

function M.holds_new(o)
  local s = k8s.get("secret/" .. o.secret, { namespace = o.namespace })
  local c = k8s.get("secret/" .. o.copy, { namespace = o.namespace })
  return s.data ~= nil and s.data[o.key] ~= nil and not (c.data and c.data.value == s.data[o.key])
end

function M.restart(refs, o)
  for _, ref in ipairs(refs) do k8s.rollout_restart(ref, { namespace = o.namespace }) end
  for _, ref in ipairs(refs) do k8s.rollout_status(ref, { namespace = o.namespace, timeout = o.timeout, fail_fast = true }) end
end

function M.readers(namespace, name)
  local restartable, others = {}, {}
  for _, u in ipairs(k8s.users_of("secret/" .. name, { namespace = namespace })) do
    local ref = u.kind .. "/" .. u.name
    table.insert(u.restartable and restartable or others, ref)
  end
  return restartable, others
end

function M.db_credentials(url)
  local user, pass = tostring(url):match("^postgres%a*://([^:@/]+):([^@/]*)@")
  if not user then return nil end
  local function dec(v) return (v:gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end)) end
  return dec(user), dec(pass)
end

function M.with_password(url, password)
  return (url:gsub("^(postgres%a*://[^:@/]+:)[^@/]*@", "%1" .. password:gsub("%%", "%%%%") .. "@", 1))
end

function M.set_db_password(url, user, password)
  local pg = require("pg")
  local db <close> = pg.connect(url, { connect_timeout = "10s" })
  db:exec(("ALTER ROLE %s PASSWORD '%s'"):format(pg.quote_ident(user), password:gsub("'", "''")))
end

return M
