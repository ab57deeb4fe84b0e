--- backupset: one backup of a system as a directory with one manifest, shared
-- by the backup, restore and data-corruption runbooks.
--
-- A set is ROOT/PREFIX-YYYYMMDDTHHMMSSZ/ holding database.dump (pg.dump, custom
-- format, with its own database.dump.manifest.json of per-table row counts),
-- k8s/KIND.yaml (the namespace's configuration), kafka/TOPIC.jsonl (topics) and
-- manifest.json: every file with its sha256 and size, the row counts, what was
-- taken and when. It is written under ROOT/.PREFIX-STAMP.partial and renamed
-- into place once complete, so a set that has its final name is whole. The
-- set's directory is mode 0700: it holds the database's rows.
--
--   backupset.preflight{root=, url=}         -> {db_bytes, db_pretty, free_bytes, free_pretty, enough}
--   backupset.new(root, prefix)              -> set (a plain table: root, partial, final, name, stamp)
--   backupset.dump_database(set, {url=, format=})   -> {files, tables, database, server_version}
--   backupset.dump_kubernetes(set, {namespace=, secrets=false, passphrase=}) -> {files, objects = {kind = n}, encrypted}
--   backupset.dump_topics(set, {topic...})   -> {files, topics = {topic = messages}}
--   backupset.record_offsets({"GROUP:TOPIC"...}) -> {groups}: consumer offsets, read before the dump
--   backupset.seal(set, parts)               -> manifest: writes manifest.json, renames into place
--   backupset.list(root, prefix)             -> sets, newest first: {name, path}
--   backupset.prune(root, prefix, keep, {pending=}) -> removed paths (each a gated delete)
--   backupset.manifest(path)                 -> the set's manifest.json, read, not verified
--   backupset.verify(path)                   -> manifest; raises code "checksum_mismatch",
--                                               "missing_file" or "bad_manifest" naming the file
--   backupset.latest(root, prefix)           -> path of the newest set, or nil
--   backupset.find(root, prefix, {set=, before=}) -> the set to restore (a path, or the newest before a time)
--   backupset.restore_database(path, {url=}) -> pg.restore's result (row counts checked)
--   backupset.restore_kubernetes(path, manifest, {namespace=, files=, hold=, passphrase=}) -> {namespace, created, applied, held}
--   backupset.read_kubernetes(path, file, passphrase) -> the objects of k8s/FILE.yaml(.enc)
--   backupset.encrypt(text, passphrase), backupset.decrypt(data, passphrase, what): openssl enc's format (M.ENCRYPTION)
--   backupset.restore_topics(path, manifest, {topics = {"NAME" | "NAME=TARGET"...}}) -> {restored, kept}
--   backupset.replay_events(manifest)        -> {groups = {group = n}, total}: each recorded group set back
--   backupset.validate{manifest=, url=, queries = {sql...}} -> problems (empty when valid)
--
-- Writes (directories, dumps, files, renames, deletes) go through the effect
-- gate: in a dry run nothing is written and the functions say what they would do.
local library_effect = require("runbook.effect").library
local host = require("runbook.host")
local json = require("json")
local exec = require("exec")
local fs = require("fs")
local lfs = require("lfs")
local pg = require("pg")
local log = require("log")

local M = {}

local raise = host.raiser "backupset"

local function pretty(bytes)
  local units, n, i = { "B", "KiB", "MiB", "GiB", "TiB" }, bytes, 1
  while n >= 1024 and i < #units do n, i = n / 1024, i + 1 end
  return i == 1 and ("%d B"):format(n) or ("%.1f %s"):format(n, units[i])
end
M.pretty = pretty

--- Free bytes on the filesystem holding `dir` (or its nearest existing parent).
function M.free_bytes(dir)
  local at = dir
  while lfs.attributes(at, "mode") ~= "directory" do
    local parent = at:match("^(.*)/[^/]+/?$")
    at = (parent == nil or parent == "") and (at:sub(1, 1) == "/" and "/" or ".") or parent
    if at == "." or at == "/" then break end
  end
  local r = exec.read { "df", "-P", "-B1", "--", at }
  local avail = r.stdout:match("\n%S+%s+%d+%s+%d+%s+(%d+)")
  if not avail then raise { op = "preflight", code = "df",
    message = "cannot read the free space of " .. at .. " from df" } end
  return math.tointeger(tonumber(avail))
end

--- Connectivity, the database's size and the free space where the set goes.
-- A custom-format dump is compressed, so the database's size is a safe upper bound.
function M.preflight(opts)
  local db <close> = pg.connect(opts.url, { connect_timeout = "10s" })
  local bytes, db_pretty = db:database_size()
  local free = M.free_bytes(opts.root)
  return { db_bytes = bytes, db_pretty = db_pretty, free_bytes = free, free_pretty = pretty(free),
    enough = free > bytes, server_version = db:value("SHOW server_version") }
end

function M.stamp() return os.date("!%Y%m%dT%H%M%SZ") end

-- True when the set's partial directory exists (it does not in a dry run).
local function written(set) return lfs.attributes(set.partial, "mode") == "directory" end

local function check_prefix(prefix)
  if type(prefix) ~= "string" or not prefix:match("^[%w_.-]+$") then
    error(("backupset: prefix %q must be letters, digits, '-', '_' or '.'"):format(tostring(prefix)), 3)
  end
end

--- A new set: its partial directory is created now (through the gate).
function M.new(root, prefix)
  check_prefix(prefix)
  local stamp = M.stamp()
  -- a set taken in the same second as the previous one: take the next second
  while lfs.attributes(root .. "/" .. prefix .. "-" .. stamp) or lfs.attributes(root .. "/." .. prefix .. "-" .. stamp .. ".partial") do
    host.sleep(0.1)
    stamp = M.stamp()
  end
  local name = prefix .. "-" .. stamp
  local set = { root = root, prefix = prefix, stamp = stamp, name = name,
    partial = root .. "/." .. name .. ".partial", final = root .. "/" .. name,
    created_at = os.date("!%Y-%m-%dT%H:%M:%SZ") }
  fs.mkdir(set.partial)
  -- the set holds the database's rows (and Secrets when asked): its owner only
  if written(set) then exec.run { "chmod", "0700", "--", set.partial } end
  return set
end

--- pg.dump (custom format by default) into the set: pg.dump checks that
-- pg_restore can read it and records the row counts of its snapshot.
function M.dump_database(set, opts)
  opts = opts or {}
  local file = set.partial .. "/database.dump"
  local m = pg.dump { url = opts.url, file = file, format = opts.format or "custom" }
  if m.skipped then return { files = {}, skipped = true } end
  log.info("database %s dumped: %s, %d tables, sha256 %s", m.database or "?", pretty(m.size),
    (function() local n = 0; for _ in pairs(m.tables or {}) do n = n + 1 end; return n end)(), m.sha256:sub(1, 12))
  return { files = { "database.dump", "database.dump.manifest.json" }, tables = m.tables, database = m.database,
    server_version = m.server_version, pg_dump_seconds = m.pg_dump_seconds }
end

-- Kinds a namespace's configuration is made of, and the file each goes to.
M.KINDS = {
  { type = "deployments.apps", file = "deployments" }, { type = "services", file = "services" },
  { type = "configmaps", file = "configmaps" }, { type = "horizontalpodautoscalers.autoscaling", file = "hpas" },
  { type = "ingresses.networking.k8s.io", file = "ingresses" }, { type = "components.dapr.io", file = "dapr-components" },
  { type = "subscriptions.dapr.io", file = "dapr-subscriptions" },
  { type = "serviceaccounts", file = "serviceaccounts" },
  { type = "networkpolicies.networking.k8s.io", file = "networkpolicies" },
  { type = "statefulsets.apps", file = "statefulsets" }, { type = "daemonsets.apps", file = "daemonsets" },
  { type = "cronjobs.batch", file = "cronjobs" },
}

-- The order a restore applies them in: what others name (accounts, Secrets,
-- ConfigMaps, Dapr components) before what names them, Services before the
-- workloads behind them, autoscalers and ingresses last.
M.RESTORE_ORDER = { "serviceaccounts", "secrets", "configmaps", "dapr-components", "dapr-subscriptions",
  "networkpolicies", "services", "deployments", "statefulsets", "daemonsets", "cronjobs", "hpas", "ingresses" }

-- What the server adds to an object, which an apply of the backup must not carry.
local function clean(obj)
  local md = obj.metadata or {}
  obj.metadata = { name = md.name, namespace = md.namespace, labels = md.labels, annotations = md.annotations }
  if md.annotations then
    md.annotations["kubectl.kubernetes.io/last-applied-configuration"] = nil
    md.annotations["deployment.kubernetes.io/revision"] = nil
    if next(md.annotations) == nil then obj.metadata.annotations = nil end
  end
  obj.status = nil
  if obj.kind == "Service" and obj.spec then obj.spec.clusterIP, obj.spec.clusterIPs = nil, nil end
  return obj
end

-- Encrypted files are what `openssl enc -aes-256-cbc -pbkdf2 -iter 100000 -md sha256`
-- writes ("Salted__", an 8-byte salt, the ciphertext), so that openssl can
-- decrypt them without this program; their integrity is the manifest's sha256.
M.ENCRYPTION = { cipher = "aes-256-cbc", kdf = "pbkdf2", md = "sha256", iter = 100000, format = "openssl enc",
  decrypt = "openssl enc -d -aes-256-cbc -pbkdf2 -iter 100000 -md sha256 -pass env:BACKUP_PASSPHRASE -in FILE" }

local function key_iv(passphrase, salt)
  local kiv = require("runbook.tls").pbkdf2(passphrase, salt, M.ENCRYPTION.iter, M.ENCRYPTION.md, 48)
  return kiv:sub(1, 32), kiv:sub(33, 48)
end

--- `text` encrypted with the passphrase (M.ENCRYPTION).
function M.encrypt(text, passphrase)
  local salt = require("openssl.rand").bytes(8)
  local key, iv = key_iv(passphrase, salt)
  local out = require("runbook.tls").cipher(M.ENCRYPTION.cipher, key, iv, text, true)
  if not out then raise { op = "encrypt", code = "encrypt", message = "the cipher refused to encrypt" } end
  return "Salted__" .. salt .. out
end

--- The plaintext of M.encrypt's output; raises code "decrypt" naming `what`
-- when the passphrase is wrong or the data damaged.
function M.decrypt(data, passphrase, what)
  local function fail() raise { op = "decrypt", code = "decrypt",
    message = ("%s cannot be decrypted: a wrong passphrase, or a damaged file"):format(what) } end
  if type(passphrase) ~= "string" or passphrase == "" then
    raise { op = "decrypt", code = "no_passphrase", message = what .. " is encrypted: give the passphrase (BACKUP_PASSPHRASE)" }
  end
  if data:sub(1, 8) ~= "Salted__" or #data < 32 then fail() end
  local key, iv = key_iv(passphrase, data:sub(9, 16))
  return require("runbook.tls").cipher(M.ENCRYPTION.cipher, key, iv, data:sub(17), false) or fail()
end

--- The namespace's configuration as YAML, one file per kind (secrets only
-- with secrets = true: the file then holds them, base64 as the API gives them).
-- With opts.passphrase each file is encrypted (k8s/KIND.yaml.enc, M.ENCRYPTION)
-- and no plaintext touches the disk.
function M.dump_kubernetes(set, opts)
  local k8s = require("k8s")
  local ns = opts.namespace
  local kinds = { table.unpack(M.KINDS) }
  if opts.secrets then kinds[#kinds + 1] = { type = "secrets", file = "secrets" } end
  local out = { files = {}, objects = {}, encrypted = opts.passphrase ~= nil }
  if written(set) then fs.mkdir(set.partial .. "/k8s") end
  for _, kind in ipairs(kinds) do
    local ok, items = pcall(k8s.list, kind.type, { namespace = ns })
    local unserved = not ok and type(items) == "table" and items.code == "unknown_resource" -- a kind this cluster lacks
    if not ok and not unserved then
      log.warn("%s in %s not backed up: %s", kind.file, ns, tostring(type(items) == "table" and items.message or items))
    elseif ok and #items > 0 then
      local docs = {}
      for i, obj in ipairs(items) do docs[i] = clean(obj) end
      out.objects[kind.file] = #items
      local rel = "k8s/" .. kind.file .. ".yaml" .. (opts.passphrase and ".enc" or "")
      local text = require("runbook.yaml").dump(table.unpack(docs))
      local w = fs.write(set.partial .. "/" .. rel, opts.passphrase and M.encrypt(text, opts.passphrase) or text)
      if not w.skipped then out.files[#out.files + 1] = rel end
      log.info("%d %s from %s", #items, kind.file, ns)
    end
  end
  return out
end

--- Each topic's messages as JSON Lines (kafka.backup_topic).
function M.dump_topics(set, topics)
  local kafka = require("kafka")
  local out = { files = {}, topics = {} }
  if #topics == 0 then return out end
  if written(set) then fs.mkdir(set.partial .. "/kafka") end
  for _, topic in ipairs(topics) do
    local rel = "kafka/" .. topic .. ".jsonl"
    local r = kafka.backup_topic { topic = topic, file = set.partial .. "/" .. rel }
    out.topics[topic] = r.messages
    if r.written then out.files[#out.files + 1] = rel; out.files[#out.files + 1] = rel .. ".manifest.json" end
    log.info("topic %s: %d messages", topic, r.messages or 0)
  end
  return out
end

--- The committed offsets of consumer groups, {"GROUP:TOPIC"...}, read
-- before the database is dumped: a restore can then set each group back to
-- them, and its consumers process again the events the restored rows lack
-- (at least once: one processed between this read and the dump's snapshot
-- is processed twice). -> {groups = {group = {topic = {["0"] = offset...}}}}
function M.record_offsets(list)
  local kafka = require("kafka")
  local out = { files = {}, groups = {} }
  for _, item in ipairs(list) do
    local group, topic = item:match("^([^:]+):(.+)$")
    if not group then error(("backupset.record_offsets: %q is not GROUP:TOPIC"):format(item), 2) end
    local per = {}
    for _, p in ipairs(kafka.lag { group = group, topics = { topic } }.partitions) do
      if p.committed then per[tostring(p.partition)] = p.committed end
    end
    out.groups[group] = out.groups[group] or {}
    out.groups[group][topic] = per
    log.info("group %s on %s: committed offsets of %d partitions recorded", group, topic, (function()
      local n = 0; for _ in pairs(per) do n = n + 1 end; return n end)())
  end
  return out
end

--- Writes manifest.json (every file's sha256 and size, and what each part
-- recorded) and renames the partial directory to the set's final name.
function M.seal(set, parts)
  local manifest = { name = set.name, created_at = set.created_at, sealed_at = os.date("!%Y-%m-%dT%H:%M:%SZ"),
    files = {}, database = nil, kubernetes = nil, kafka = nil }
  for _, part in pairs(parts) do
    for _, rel in ipairs(part.files or {}) do
      local path = set.partial .. "/" .. rel
      local sha, size = host.sha256_file(path)
      if not sha then raise { op = "seal", code = "missing_file", message = path .. ": " .. tostring(size) } end
      manifest.files[#manifest.files + 1] = { path = rel, sha256 = sha, size = size }
    end
  end
  table.sort(manifest.files, function(a, b) return a.path < b.path end)
  if parts.database and parts.database.tables then
    manifest.database = { name = parts.database.database, server_version = parts.database.server_version,
      dump = "database.dump", tables = parts.database.tables }
  end
  if parts.kubernetes then
    manifest.kubernetes = { namespace = parts.kubernetes.namespace, objects = parts.kubernetes.objects,
      encrypted = parts.kubernetes.encrypted and M.ENCRYPTION or nil }
  end
  if parts.kafka then manifest.kafka = { topics = parts.kafka.topics } end
  if parts.offsets then manifest.offsets = parts.offsets.groups end
  fs.write(set.partial .. "/manifest.json", json.encode(manifest) .. "\n")
  fs.rename(set.partial, set.final)
  manifest.path = set.final
  return manifest
end

--- The complete sets under root (partial ones are not listed), newest first.
function M.list(root, prefix)
  check_prefix(prefix)
  local sets = {}
  if lfs.attributes(root, "mode") ~= "directory" then return sets end
  for entry in lfs.dir(root) do
    local stamp = entry:sub(#prefix + 2)
    if entry:sub(1, #prefix + 1) == prefix .. "-" and stamp:match("^%d%d%d%d%d%d%d%dT%d%d%d%d%d%dZ$")
        and lfs.attributes(root .. "/" .. entry, "mode") == "directory" then
      sets[#sets + 1] = { name = entry, path = root .. "/" .. entry, stamp = stamp }
    end
  end
  table.sort(sets, function(a, b) return a.stamp > b.stamp end)
  return sets
end

function M.latest(root, prefix)
  local sets = M.list(root, prefix)
  return sets[1] and sets[1].path
end

--- The set to restore: opts.set (a path) if given, else the newest PREFIX set
-- in root taken before opts.before ("2026-11-22T10:00:00Z" or a set's stamp),
-- else the newest. Raises code "no_backup" saying what was looked for.
function M.find(root, prefix, opts)
  opts = opts or {}
  if opts.set and opts.set ~= "" then return (opts.set:gsub("/+$", "")) end
  local before = opts.before and opts.before ~= "" and opts.before:gsub("[-:]", ""):gsub("%.%d+", "") or nil
  if before and not before:match("^%d%d%d%d%d%d%d%dT%d%d%d%d%d%dZ$") then
    error(("backupset.find: before %q is not a time like 2026-11-22T10:00:00Z"):format(opts.before), 2)
  end
  for _, s in ipairs(M.list(root, prefix)) do
    if not before or s.stamp < before then return s.path end
  end
  raise { op = "find", code = "no_backup",
    message = ("no %s backup set in %s%s"):format(prefix, root, before and (" taken before " .. opts.before) or "") }
end

-- Every file under dir, deepest first, then the directories.
local function tree(dir, files, dirs)
  for entry in lfs.dir(dir) do
    if entry ~= "." and entry ~= ".." then
      local p = dir .. "/" .. entry
      if lfs.attributes(p, "mode") == "directory" then tree(p, files, dirs) else files[#files + 1] = p end
    end
  end
  dirs[#dirs + 1] = dir
end

--- Removes the set directory at `path` and everything in it: one gated delete.
function M.remove(path)
  local files, dirs = {}, {}
  tree(path, files, dirs)
  local bytes = 0
  for _, f in ipairs(files) do bytes = bytes + (lfs.attributes(f, "size") or 0) end
  return library_effect {
    module = "fs", op = "remove", target = path,
    summary = ("delete backup set %s (%d files, %s)"):format(path, #files, pretty(bytes)),
    perform = function()
      for _, f in ipairs(files) do
        local ok, err = os.remove(f)
        if not ok then raise { op = "remove", code = "io", message = err } end
      end
      for _, d in ipairs(dirs) do
        local ok, err = lfs.rmdir(d)
        if not ok then raise { op = "remove", code = "io", message = d .. ": " .. tostring(err) } end
      end
      return { removed = path, files = #files, bytes = bytes }
    end,
  }
end

--- Keeps the newest `keep` sets, deleting the others. opts.pending: sets
-- not on disk yet that count as newest (a dry run's set that was not written).
function M.prune(root, prefix, keep, opts)
  if math.type(keep) ~= "integer" or keep < 1 then error("backupset.prune: keep must be an integer >= 1", 2) end
  local pending = opts and opts.pending or 0
  local removed = {}
  for i, s in ipairs(M.list(root, prefix)) do
    if i + pending > keep then
      M.remove(s.path)
      removed[#removed + 1] = s.path
    end
  end
  return removed
end

--- A set's manifest.json, read (not verified: M.verify checks the files).
function M.manifest(path)
  local mpath = path .. "/manifest.json"
  if not fs.exists(mpath) then raise { op = "verify", code = "bad_manifest",
    message = path .. " has no manifest.json (not a backup set, or not complete)" } end
  local ok, m = pcall(json.decode, fs.read(mpath))
  if not ok or type(m) ~= "table" or type(m.files) ~= "table" then
    raise { op = "verify", code = "bad_manifest", message = mpath .. " is not a backup set manifest" }
  end
  return m
end

--- Reads a set's manifest and checks every file it lists against its sha256
-- and size, and the database dump with pg_restore --list.
function M.verify(path)
  local m = M.manifest(path)
  for _, f in ipairs(m.files) do
    local p = path .. "/" .. f.path
    local sha = host.sha256_file(p)
    if not sha then raise { op = "verify", code = "missing_file",
      message = p .. " is listed in the manifest but missing" } end
    if sha ~= f.sha256 or lfs.attributes(p, "size") ~= f.size then
      raise { op = "verify", code = "checksum_mismatch",
        message = ("%s does not match the manifest (sha256 %s, expected %s)"):format(
        p, sha:sub(1, 12), tostring(f.sha256):sub(1, 12)) }
    end
  end
  if m.database then
    local r = exec.read { "pg_restore", "--list", "--", path .. "/" .. m.database.dump, check = false }
    if r.status ~= 0 then raise { op = "verify", code = "corrupt_dump",
      message = path .. "/" .. m.database.dump .. ": pg_restore cannot read it" } end
  end
  return m
end

--- Restores the set's database dump (pg.restore: checksum again, --clean,
-- one transaction, row counts compared with the dump's).
function M.restore_database(path, opts)
  opts = opts or {}
  return pg.restore { url = opts.url, file = path .. "/database.dump" }
end

-- The set's Kubernetes files (k8s/FILE.yaml, or .yaml.enc, in its manifest), in RESTORE_ORDER.
local function kubernetes_files(manifest)
  local listed = {}
  for _, f in ipairs(manifest.files or {}) do
    local file = f.path:match("^k8s/(.+)%.yaml$") or f.path:match("^k8s/(.+)%.yaml%.enc$")
    if file then listed[file] = true end
  end
  local out = {}
  for _, file in ipairs(M.RESTORE_ORDER) do if listed[file] then out[#out + 1] = file end end
  return out
end
M.kubernetes_files = kubernetes_files

--- The objects of the set's k8s/FILE.yaml (decrypted with `passphrase` when
-- the set's files are encrypted).
function M.read_kubernetes(path, file, passphrase)
  local enc, text = path .. "/k8s/" .. file .. ".yaml.enc"
  if fs.exists(enc) then text = M.decrypt(fs.read(enc), passphrase, enc) else text = fs.read(path .. "/k8s/" .. file .. ".yaml") end
  return require("runbook.yaml").load_all(text)
end

--- Applies the set's Kubernetes objects (server-side apply, forced: the set's
-- version wins) to opts.namespace (default the set's), creating the namespace
-- when it is missing. opts.files: which of the set's files (default all), each
-- applied in RESTORE_ORDER; opts.passphrase for an encrypted set. opts.hold: deployment names applied at 0 replicas,
-- returned as `held`, {target, namespace, replicas = the set's}, which
-- k8s.start_workloads takes. In a dry run against a namespace that does not
-- exist yet, the server cannot check the objects: they are counted, not sent.
-- Returns {namespace, created, applied = {file = n}, held}.
function M.restore_kubernetes(path, manifest, opts)
  opts = opts or {}
  local k8s = require("k8s")
  local ns = opts.namespace or (manifest.kubernetes or {}).namespace
  if not ns then raise { op = "restore_kubernetes", code = "bad_manifest", message = path .. " names no namespace" } end
  local want = {}
  for _, f in ipairs(opts.files or kubernetes_files(manifest)) do want[f] = true end
  local hold = {}
  for _, name in ipairs(opts.hold or {}) do hold[name] = true end
  local out = { namespace = ns, applied = {}, held = {} }
  local cur = k8s.get("namespaces/" .. ns, { missing_ok = true })
  if cur and cur.metadata.deletionTimestamp then
    raise { op = "restore_kubernetes", code = "terminating",
      message = ("namespace %s is being deleted: wait until it is gone, then restore"):format(ns) }
  end
  if not cur then
    local labels = { ["kubernetes.io/metadata.name"] = ns }
    k8s.apply({ apiVersion = "v1", kind = "Namespace", metadata = { name = ns, labels = labels } }, { force = true })
    out.created = true
  end
  local unchecked = not cur and require("gate").dry_run()
  for _, file in ipairs(kubernetes_files(manifest)) do
    if want[file] then
      local objs = M.read_kubernetes(path, file, opts.passphrase)
      for _, obj in ipairs(objs) do
        obj.metadata.namespace = ns
        if obj.kind == "Deployment" and hold[obj.metadata.name] then
          out.held[#out.held + 1] = { target = "deploy/" .. obj.metadata.name, namespace = ns, replicas = obj.spec.replicas or 1 }
          obj.spec.replicas = 0
        end
      end
      if unchecked then
        log.info("would apply %d %s to namespace %s, which does not exist yet", #objs, file, ns)
      elseif #objs > 0 then
        k8s.apply(objs, { force = true })
      end
      out.applied[file] = #objs
    end
  end
  return out
end

--- Produces the set's topics back (kafka.restore_topic: keys, headers,
-- timestamps, partitions) into topics that hold no message: a new cluster's,
-- or one emptied. A topic that holds messages is left as it is (the set's
-- would be duplicates) and named in `kept`; one that does not exist is an
-- error naming the partitions to create it with. opts.topics: which of the set's
-- topics, each "NAME" or "NAME=TARGET" to restore beside it (default all).
-- Returns {restored = {target = n}, kept = {target = reason}}.
function M.restore_topics(path, manifest, opts)
  local kafka = require("kafka")
  local inset = (manifest.kafka or {}).topics or {}
  local pairs_ = {}
  for _, item in ipairs(opts and opts.topics or {}) do
    local from, to = item:match("^([^=]+)=(.+)$")
    pairs_[#pairs_ + 1] = { from = from or item, to = to or item }
  end
  if not opts or not opts.topics then
    for name in pairs(inset) do pairs_[#pairs_ + 1] = { from = name, to = name } end
    table.sort(pairs_, function(a, b) return a.from < b.from end)
  end
  local out = { restored = {}, kept = {} }
  for _, t in ipairs(pairs_) do
    if not inset[t.from] then
      raise { op = "restore_topics", code = "not_in_set", message = ("%s holds no topic %s"):format(path, t.from) }
    end
    local ok, marks = pcall(kafka.watermarks, t.to)
    if not ok and type(marks) == "table" and marks.code == "UNKNOWN_TOPIC_OR_PART" then
      local tm = json.decode(fs.read(path .. "/kafka/" .. t.from .. ".jsonl.manifest.json"))
      local n = 0
      for _ in pairs(tm.partitions or {}) do n = n + 1 end
      raise { op = "restore_topics", code = "no_topic",
        message = ("topic %s does not exist: create it with %d partitions, as %s had (kafka-topics.sh --create,"
          .. " or its KafkaTopic), then restore the topics again"):format(t.to, n, t.from) }
    elseif not ok then error(marks, 0) end
    local held = 0
    for _, w in pairs(marks) do held = held + (w.high - w.low) end
    if held > 0 then
      out.kept[t.to] = ("holds %d messages: restoring the set's %d would duplicate them"):format(held, inset[t.from])
      log.warn("topic %s %s; left as it is", t.to, out.kept[t.to])
    else
      local r = kafka.restore_topic { file = path .. "/kafka/" .. t.from .. ".jsonl", topic = t.to }
      out.restored[t.to] = r.skipped and 0 or r.restored
      log.info("topic %s: %s %d messages of the set's %s", t.to, r.skipped and "would produce" or "produced",
        r.messages or 0, t.from)
    end
  end
  return out
end

--- Sets each consumer group the set recorded (record_offsets) back to its
-- offsets then, one partition at a time (kafka.reset_offsets), so that its
-- consumers replay what came after. Their consumers must be stopped.
-- -> {groups = {group = messages to replay}}
function M.replay_events(manifest)
  local kafka = require("kafka")
  local out = { groups = {}, total = 0 }
  local groups = {}
  for g in pairs(manifest.offsets or {}) do groups[#groups + 1] = g end
  table.sort(groups)
  for _, group in ipairs(groups) do
    local n = 0
    for topic, per in pairs(manifest.offsets[group]) do
      for p, offset in pairs(per) do
        local plan = kafka.reset_offsets { group = group, topics = { topic }, partitions = { tonumber(p) },
          to = { offset = math.tointeger(offset) } }
        n = n + plan.replay
      end
    end
    out.groups[group], out.total = n, out.total + n
    log.info("group %s: back at the offsets of the set, %d messages to process again", group, n)
  end
  return out
end

--- Row counts against the manifest's, and each validation query, which
-- must return 0 (or false, or no row). Returns the problems found.
function M.validate(opts)
  local db <close> = pg.connect(opts.url)
  local problems = {}
  local tables = opts.manifest and opts.manifest.database and opts.manifest.database.tables or {}
  local names = {}
  for name in pairs(tables) do names[#names + 1] = name end
  table.sort(names)
  for _, name in ipairs(names) do
    local ok, n = pcall(db.value, db, "SELECT count(*) FROM " .. pg.quote_ident(name))
    if not ok then problems[#problems + 1] = ("%s: %s"):format(name, tostring(type(n) == "table" and n.message or n))
    elseif n ~= tables[name] then problems[#problems + 1] = ("%s has %d rows, the backup %d"):format(name, n, tables[name])
    else log.info("%s: %d rows, as in the backup", name, n) end
  end
  for _, sql in ipairs(opts.queries or {}) do
    local v = db:value(sql)
    if v ~= nil and v ~= 0 and v ~= false and v ~= "0" then problems[#problems + 1] = ("%s returned %s, expected 0"):format(sql, tostring(v))
    else log.info("%s: 0", sql) end
  end
  return problems
end

--- "a; b" or {a, b} -> a list of statements (validation queries from a param).
function M.queries(text)
  if type(text) == "table" then return text end
  local out = {}
  for q in tostring(text or ""):gmatch("[^;]+") do
    q = q:match("^%s*(.-)%s*$")
    if q ~= "" then out[#out + 1] = q end
  end
  return out
end

return M
