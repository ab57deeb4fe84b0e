--- helm: Helm 3 releases read from their release records, and `helm rollback`,
-- without the helm binary.
--
-- Helm 3 keeps each revision of a release in a Secret of type helm.sh/release.v1
-- named sh.helm.release.v1.NAME.vREVISION, labelled name, owner=helm, status and
-- version; its key `release` holds base64 of the gzip of the release's JSON
-- (helm's pkg/storage/driver). These functions read and write those Secrets
-- through the k8s library, so every write goes through its effect gate.
--
--   helm.releases{namespace=} -> {{name, namespace, revision, status, chart, app_version, updated,
--       age (seconds since updated), description}...}
--       the last revision of each release in the namespace, as `helm list --all` shows them
--   helm.history(NAME, {namespace=}) -> {{revision, status, chart, app_version, updated, age, description}...}
--       oldest first, as `helm history`
--   helm.get(NAME, {revision=, namespace=}) -> {name, namespace, revision, status, description,
--       first_deployed, updated, age, chart = {name, version, app_version}, values (the user's, as
--       `helm get values`), manifest (the rendered YAML), objects (its documents, decoded)}
--       the last revision without revision
--   helm.rollback(NAME, {revision=, namespace=, wait = false, timeout = "5m"})
--       -> {name, from, to, revision (the new one), objects = {"deployment/x"...}, deleted = {...}}
--       what `helm rollback NAME [REVISION]` does (helm's pkg/action/rollback.go): the
--       target revision's objects applied (server-side, forced, with helm's ownership
--       labels and annotations), the objects only the current revision has deleted,
--       with wait each Deployment and StatefulSet rolled out; then every deployed record
--       marked superseded and a new record, revision last + 1, deployed with the
--       target's chart, values and manifest and the description "Rollback to R". When
--       applying or waiting fails, the new record is written failed and the last one
--       superseded, as helm leaves them, and the error is raised. Without revision, the
--       one before the last. Hooks are not run (the records keep them).
--
-- Errors are structured (module "helm"): code "release_not_found", "revision_not_found",
-- "corrupt_record" (a record that is not base64 of gzip of JSON: the message names the
-- Secret), "rollback_failed".
local zlib = require("zlib")
local host = require("runbook.host")
local base64 = require("base64")
local client = require("k8s.client")
local k8s = require("k8s")

local M = {}

local raise = host.raiser "helm"
local TYPE = "helm.sh/release.v1"

local function check_name(name, fn)
  if type(name) ~= "string" or name == "" then
    error(("helm.%s: expected a release name, got %s"):format(fn, type(name)), 3)
  end
end

local function check_opts(opts, fn)
  if opts ~= nil and type(opts) ~= "table" then error(("helm.%s: expected an options table"):format(fn), 3) end
  return opts or {}
end

--- The release inside a record: Kubernetes' base64 (the k8s library hands data
-- as the API has it), helm's base64, gzip, JSON. A record from before helm
-- compressed its releases is plain JSON under the base64.
local function decode(secret)
  local name = secret.metadata.name
  local function corrupt(why)
    raise { op = "decode", code = "corrupt_record",
      message = ("release record %s/%s is corrupt: %s"):format(secret.metadata.namespace, name, why) }
  end
  local data = type(secret.data) == "table" and secret.data.release
  if type(data) ~= "string" then corrupt("it has no data key release") end
  local inner = base64.decode(data)
  local packed = inner and base64.decode(inner)
  if not packed then corrupt("its release is not base64") end
  if packed:sub(1, 3) == "\31\139\8" then
    local ok, text, eof = pcall(zlib.inflate(), packed)
    if not ok or not eof then corrupt("its release is not a whole gzip stream" .. (ok and "" or ": " .. tostring(text))) end
    packed = text
  end
  local rel = client.decode(packed)
  if type(rel) ~= "table" or type(rel.info) ~= "table" or math.type(rel.version) ~= "integer" then
    corrupt("its release is not a release's JSON")
  end
  return rel
end

--- A release as a record holds it: gzip (best compression) and base64 as helm
-- writes it; the Secret's data is that text, base64 again as the API wants it.
-- `over` is the record replaced: its resourceVersion makes the write fail when
-- someone changed the record since it was read.
local function record(rel, over)
  local gz = zlib.deflate(9, 31)(client.encode(rel), "finish")
  return {
    apiVersion = "v1", kind = "Secret", type = TYPE,
    metadata = { name = ("sh.helm.release.v1.%s.v%d"):format(rel.name, rel.version), namespace = rel.namespace,
      labels = { name = rel.name, owner = "helm", status = rel.info.status, version = tostring(rel.version) },
      resourceVersion = over and over.metadata.resourceVersion },
    data = { release = base64.encode(base64.encode(gz)) },
  }
end

-- Every record of a release (or of all with name nil), oldest revision first.
local function records(name, ns)
  local items = k8s.list("secrets", { namespace = ns, selector = name and { owner = "helm", name = name } or { owner = "helm" } })
  local out = {}
  for _, s in ipairs(items) do
    if s.type == TYPE then out[#out + 1] = { secret = s, release = decode(s) } end
  end
  table.sort(out, function(a, b) return a.release.version < b.release.version end)
  return out
end

local function history_of(name, ns, op)
  local list = records(name, ns)
  if #list == 0 then
    raise { op = op, code = "release_not_found",
      message = ("release %s not found in namespace %s (no helm.sh/release.v1 Secret labelled name=%s)"):format(name, ns, name) }
  end
  return list
end

local function ns_of(opts) return opts.namespace or k8s.client():ns(opts) end

-- Seconds since an RFC 3339 time as Go writes it ("2026-12-04T23:17:34.379239082Z",
-- "...+02:00"); nil when it is not one.
local function age(stamp)
  local date, zone = tostring(stamp):match("^(%d+%-%d+%-%d+T%d+:%d+:%d+)[.%d]*(.*)$")
  if not date then return nil end
  local y, mo, d, h, mi, sec = date:match("(%d+)-(%d+)-(%d+)T(%d+):(%d+):(%d+)")
  y, mo, d, h, mi, sec = tonumber(y), tonumber(mo), tonumber(d), tonumber(h), tonumber(mi), tonumber(sec)
  local off = 0
  if zone ~= "Z" then
    local sign, zh, zm = zone:match("^([+-])(%d%d):(%d%d)$")
    if not sign then return nil end
    off = (sign == "-" and -1 or 1) * (tonumber(zh) * 3600 + tonumber(zm) * 60)
  end
  -- days since 1970-01-01 of a Gregorian date (days_from_civil)
  if mo <= 2 then y = y - 1 end
  local era = y // 400
  local yoe = y - era * 400
  local doy = (153 * ((mo + 9) % 12) + 2) // 5 + d - 1
  local days = era * 146097 + yoe * 365 + yoe // 4 - yoe // 100 + doy - 719468
  return host.wallclock() - (days * 86400 + h * 3600 + mi * 60 + sec - off)
end

local function summary(rel)
  local meta = type(rel.chart) == "table" and type(rel.chart.metadata) == "table" and rel.chart.metadata or {}
  return { name = rel.name, namespace = rel.namespace, revision = rel.version, status = rel.info.status,
    chart = meta.name and (meta.name .. "-" .. tostring(meta.version)) or nil, app_version = meta.appVersion,
    updated = rel.info.last_deployed, age = age(rel.info.last_deployed), description = rel.info.description }
end

function M.releases(opts)
  opts = check_opts(opts, "releases")
  local last = {}
  for _, r in ipairs(records(nil, ns_of(opts))) do last[r.release.name] = r.release end
  local out = {}
  for _, rel in pairs(last) do out[#out + 1] = summary(rel) end
  table.sort(out, function(a, b) return a.name < b.name end)
  return out
end

function M.history(name, opts)
  check_name(name, "history")
  opts = check_opts(opts, "history")
  local out = {}
  for _, r in ipairs(history_of(name, ns_of(opts), "history")) do
    local s = summary(r.release)
    s.name, s.namespace = nil, nil
    out[#out + 1] = s
  end
  return out
end

local function find(list, revision, name, op)
  for _, r in ipairs(list) do
    if r.release.version == revision then return r end
  end
  local have = {}
  for _, r in ipairs(list) do have[#have + 1] = tostring(r.release.version) end
  raise { op = op, code = "revision_not_found",
    message = ("release %s has no revision %s (revisions: %s)"):format(name, tostring(revision), table.concat(have, ", ")) }
end

-- The manifest's documents: helm's `---` separated YAML, comments and empty ones dropped.
local function objects(manifest, name)
  if type(manifest) ~= "string" or manifest == "" then return {} end
  local ok, docs = pcall(require("lyaml").load, manifest, { all = true })
  if not ok then raise { op = "decode", code = "corrupt_record", message = ("release %s: its manifest is not YAML: %s"):format(name, tostring(docs)) } end
  local out = {}
  for _, d in ipairs(docs) do
    if type(d) == "table" and d.kind and type(d.metadata) == "table" and d.metadata.name then out[#out + 1] = d end
  end
  return out
end

function M.get(name, opts)
  check_name(name, "get")
  opts = check_opts(opts, "get")
  local list = history_of(name, ns_of(opts), "get")
  local rel = (opts.revision and find(list, opts.revision, name, "get") or list[#list]).release
  local s = summary(rel)
  local meta = type(rel.chart) == "table" and rel.chart.metadata or {}
  s.chart = { name = meta.name, version = meta.version, app_version = meta.appVersion }
  s.first_deployed, s.values, s.manifest = rel.info.first_deployed, rel.config or {}, rel.manifest or ""
  s.objects = objects(rel.manifest, name)
  return s
end

local function key(o) return o.kind .. "/" .. o.metadata.name end

-- What helm's setMetadataVisitor sets on each object it applies for a release.
local function owned(o, rel)
  o.metadata.labels = o.metadata.labels or {}
  o.metadata.annotations = o.metadata.annotations or {}
  o.metadata.labels["app.kubernetes.io/managed-by"] = "Helm"
  o.metadata.annotations["meta.helm.sh/release-name"] = rel.name
  o.metadata.annotations["meta.helm.sh/release-namespace"] = rel.namespace
  return o
end

local function now()
  local t = host.wallclock()
  return os.date("!%Y-%m-%dT%H:%M:%S", math.floor(t)) .. (".%09dZ"):format(math.floor((t % 1) * 1e9))
end

-- The target's objects applied, the current's others deleted, the workloads waited for.
local function perform(current, target, opts)
  local ns = target.namespace
  local want, names = {}, {}
  for _, o in ipairs(objects(target.manifest, target.name)) do
    want[key(o)] = true
    names[#names + 1] = key(o):lower()
    k8s.apply(owned(o, target), { namespace = ns, force = true, field_manager = "helm" })
  end
  local deleted = {}
  for _, o in ipairs(objects(current.manifest, current.name)) do
    if not want[key(o)] then
      k8s.delete(o.kind .. "/" .. o.metadata.name, { namespace = o.metadata.namespace or ns, missing_ok = true })
      deleted[#deleted + 1] = key(o):lower()
    end
  end
  if opts.wait then
    for _, o in ipairs(objects(target.manifest, target.name)) do
      if o.kind == "Deployment" or o.kind == "StatefulSet" then
        k8s.rollout_status(key(o):lower(), { namespace = ns, timeout = opts.timeout or "5m", fail_fast = true, progress = false })
      end
    end
  end
  return names, deleted
end

function M.rollback(name, opts)
  check_name(name, "rollback")
  opts = check_opts(opts, "rollback")
  if opts.revision ~= nil and math.type(opts.revision) ~= "integer" then
    error("helm.rollback: revision must be an integer", 2)
  end
  local list = history_of(name, ns_of(opts), "rollback")
  local last = list[#list]
  local current = last.release
  local to = opts.revision or current.version - 1
  local target = find(list, to, name, "rollback").release
  local rel = {
    name = name, namespace = current.namespace, chart = target.chart, config = target.config,
    info = { first_deployed = current.info.first_deployed, last_deployed = now(), deleted = "",
      status = "deployed", description = "Rollback to " .. to, notes = target.info.notes },
    version = current.version + 1, manifest = target.manifest, hooks = target.hooks, labels = target.labels,
  }
  local ok, names, deleted = pcall(perform, current, target, opts)
  if not ok then
    -- as helm leaves a failed rollback: the last record superseded, the new one failed
    local why = type(names) == "table" and names.message or tostring(names)
    current.info.status = "superseded"
    k8s.replace(record(current, last.secret))
    rel.info.status, rel.info.description = "failed", ("Rollback %q failed: %s"):format(name, why)
    k8s.create(record(rel))
    raise { op = "rollback", code = "rollback_failed",
      message = ("rollback of release %s to revision %d failed (revision %d recorded failed): %s"):format(name, to, rel.version, why) }
  end
  for _, r in ipairs(list) do
    if r.release.info.status == "deployed" then
      r.release.info.status = "superseded"
      k8s.replace(record(r.release, r.secret))
    end
  end
  k8s.create(record(rel))
  return { name = name, from = current.version, to = to, revision = rel.version, objects = names, deleted = deleted }
end

return M
