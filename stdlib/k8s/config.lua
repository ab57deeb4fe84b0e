--- Where the k8s module connects and as whom, found the way kubectl finds it:
-- $KUBECONFIG (several files separated by ":", merged: the first file that
-- names a cluster, user or context wins, and so does the first
-- current-context), else ~/.kube/config, else the in-cluster service account.
--
-- resolve(opts) -> cfg, a flat description of one connection:
--   {server, ca_data|ca_file, cert_data|cert_file, key_data|key_file,
--    token|token_file, exec, insecure, tls_server_name,
--    namespace, context, user, cluster, source}
-- opts: kubeconfig (path or "a:b" list, instead of $KUBECONFIG), context,
-- namespace, in_cluster (true: skip kubeconfig), service_account_dir.
--
-- credentials(cfg, refresh) -> the token/cert/key to send now: a token file is
-- re-read when older than a minute (service account tokens rotate); an exec
-- plugin's credential is cached until its expirationTimestamp.
local cjson = require("cjson")
local host = require("runbook.host")

local M = {}

local SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"

local raise = host.raiser "k8s"

local read_file = require("runbook.loader").read_file
M.read_file = read_file

M.base64_decode = require("base64").decode

local function dirname(path)
  return path:match("^(.*)/[^/]*$") or "."
end

-- kubectl resolves relative paths in a kubeconfig against the file's directory.
local function resolve_path(base, p)
  if type(p) ~= "string" or p == "" or p:sub(1, 1) == "/" then return p end
  if p:sub(1, 2) == "~/" then return (os.getenv("HOME") or "") .. p:sub(2) end
  return dirname(base) .. "/" .. p
end

local PATH_FIELDS = { ["certificate-authority"] = true, ["client-certificate"] = true, ["client-key"] = true,
  tokenFile = true }

local function load_file(path)
  local text = read_file(path)
  if not text then return nil end
  local ok, doc = pcall(require("lyaml").load, text)
  if not ok then raise { op = "config", code = "invalid_kubeconfig",
    message = ("kubeconfig %s is not valid YAML: %s"):format(path, tostring(doc)) } end
  if doc == nil then return {} end
  if type(doc) ~= "table" then raise { op = "config", code = "invalid_kubeconfig",
    message = ("kubeconfig %s is not a mapping"):format(path) } end
  for _, section in ipairs { "clusters", "users", "contexts" } do
    local list = doc[section]
    if list ~= nil and type(list) ~= "table" then
      raise { op = "config", code = "invalid_kubeconfig",
        message = ("kubeconfig %s: %s must be a list"):format(path, section) }
    end
    for i, entry in ipairs(list or {}) do
      if type(entry) ~= "table" or type(entry.name) ~= "string" then
        raise { op = "config", code = "invalid_kubeconfig",
          message = ("kubeconfig %s: %s[%d] has no name"):format(path, section, i) }
      end
      local body = entry[section == "clusters" and "cluster" or section == "users" and "user" or "context"]
      if type(body) == "table" then
        for k, v in pairs(body) do
          if PATH_FIELDS[k] then body[k] = resolve_path(path, v) end
        end
        if type(body.exec) == "table" and type(body.exec.command) == "string" and body.exec.command:find("/")
        then body.exec.command = resolve_path(path, body.exec.command) end
      end
    end
  end
  return doc
end

-- Every user's credentials are registered when the kubeconfig is read, not
-- only the current context's: a runbook may switch contexts or print the file.
local SECRET_FIELDS = { token = true, password = true, ["client-key-data"] = true, ["access-token"] = true,
  ["refresh-token"] = true, ["client-secret"] = true, ["id-token"] = true }

local function register_credentials(t, depth)
  for k, v in pairs(t) do
    if type(v) == "string" and SECRET_FIELDS[k] then
      host.secret(v)
      if k == "client-key-data" then host.secret(M.base64_decode(v) or v) end
    elseif type(v) == "table" and depth < 6 then
      register_credentials(v, depth + 1)   -- users[i].user.auth-provider.config
    end
  end
end

--- The merged kubeconfig of `paths` (a list); nil when none of them exists.
function M.load(paths)
  local merged = { clusters = {}, users = {}, contexts = {}, files = {} }
  for _, path in ipairs(paths) do
    local doc = load_file(path)
    if doc then
      merged.files[#merged.files + 1] = path
      register_credentials(doc.users or {}, 1)
      merged["current-context"] = merged["current-context"] or
        (doc["current-context"] ~= "" and doc["current-context"] or nil)
      for _, section in ipairs { "clusters", "users", "contexts" } do
        local key = section == "clusters" and "cluster" or section == "users" and "user" or "context"
        for _, entry in ipairs(doc[section] or {}) do
          if merged[section][entry.name] == nil then merged[section][entry.name] = entry[key] or {} end
        end
      end
    end
  end
  if #merged.files == 0 then return nil end
  return merged
end

local function kubeconfig_paths(opt)
  local list = opt or os.getenv("KUBECONFIG")
  if list and list ~= "" then
    local paths = {}
    for p in list:gmatch("[^:]+") do paths[#paths + 1] = p end
    return paths, list
  end
  local home = os.getenv("HOME")
  if home then return { home .. "/.kube/config" }, home .. "/.kube/config" end
  return {}, "(no KUBECONFIG and no HOME)"
end

local function names(t)
  local out = {}
  for k in pairs(t) do out[#out + 1] = k end
  table.sort(out)
  return #out > 0 and table.concat(out, ", ") or "none"
end

local function in_cluster(opts)
  local h, p = os.getenv("KUBERNETES_SERVICE_HOST"), os.getenv("KUBERNETES_SERVICE_PORT")
  if not h or h == "" or not p or p == "" then return nil end
  local dir = opts.service_account_dir or SA_DIR
  if h:find(":") then h = "[" .. h .. "]" end
  local ns = opts.namespace or os.getenv("POD_NAMESPACE")
  if not ns or ns == "" then ns = (read_file(dir .. "/namespace") or ""):gsub("%s+$", "") end
  return {
    server = ("https://%s:%s"):format(h, p), ca_file = dir .. "/ca.crt", token_file = dir .. "/token",
    namespace = ns ~= "" and ns or "default", context = "in-cluster", user = "serviceaccount",
    source = "in-cluster service account (" .. dir .. ")",
  }
end

local function decode_data(what, v, context)
  if v == nil then return nil end
  local out = type(v) == "string" and M.base64_decode(v)
  if not out then raise { op = "config", code = "invalid_kubeconfig",
    message = ("context %s: %s is not base64"):format(context, what) } end
  return out
end

local function from_kubeconfig(kc, opts, where)
  local ctx_name = opts.context or kc["current-context"]
  if not ctx_name then
    raise { op = "config", code = "no_context",
      message = ("kubeconfig %s has no current-context; pass k8s.connect{context=...} (contexts: %s)"):format(
        where, names(kc.contexts)) }
  end
  local ctx = kc.contexts[ctx_name]
  if not ctx then
    raise { op = "config", code = "unknown_context",
      message = ("context %q not found in kubeconfig %s (contexts: %s)"):format(ctx_name, where, names(kc.contexts)) }
  end
  local cluster = kc.clusters[ctx.cluster or ""]
  if not cluster then
    raise { op = "config", code = "invalid_kubeconfig",
      message = ("context %q names cluster %q, which is not in kubeconfig %s"):format(
        ctx_name, tostring(ctx.cluster), where) }
  end
  if type(cluster.server) ~= "string" or cluster.server == "" then
    raise { op = "config", code = "invalid_kubeconfig",
      message = ("cluster %q in kubeconfig %s has no server"):format(ctx.cluster, where) }
  end
  local user = ctx.user and kc.users[ctx.user]
  if ctx.user and not user then
    raise { op = "config", code = "invalid_kubeconfig",
      message = ("context %q names user %q, which is not in kubeconfig %s"):format(ctx_name, ctx.user, where) }
  end
  user = user or {}
  local cfg = {
    server = cluster.server, context = ctx_name, cluster = ctx.cluster, user = ctx.user or "(none)",
    namespace = opts.namespace or (ctx.namespace ~= "" and ctx.namespace) or "default",
    insecure = cluster["insecure-skip-tls-verify"] == true, tls_server_name = cluster["tls-server-name"],
    ca_data = decode_data("certificate-authority-data", cluster["certificate-authority-data"], ctx_name),
    ca_file = cluster["certificate-authority"],
    cert_data = decode_data("client-certificate-data", user["client-certificate-data"], ctx_name),
    cert_file = user["client-certificate"],
    key_data = decode_data("client-key-data", user["client-key-data"], ctx_name),
    key_file = user["client-key"],
    token = user.token, token_file = user.tokenFile, exec = user.exec,
    source = "kubeconfig " .. where,
  }
  if cfg.token then host.secret(cfg.token) end
  if cfg.key_data then host.secret(cfg.key_data) end
  if cfg.exec ~= nil and (type(cfg.exec) ~= "table" or type(cfg.exec.command) ~= "string") then
    raise { op = "config", code = "invalid_kubeconfig", message = ("user %q: exec needs a command"):format(ctx.user) }
  end
  return cfg
end

--- The command line's --kubeconfig, --context and --namespace: what resolve
-- uses where the caller names none.
M.defaults = {}

function M.resolve(opts)
  local given = opts or {}
  opts = {}
  for k, v in pairs(M.defaults) do opts[k] = v end
  for k, v in pairs(given) do opts[k] = v end
  if not opts.in_cluster then
    local paths, where = kubeconfig_paths(opts.kubeconfig)
    local kc = M.load(paths)
    if kc then return from_kubeconfig(kc, opts, where) end
    if opts.kubeconfig or (os.getenv("KUBECONFIG") or "") ~= "" then
      raise { op = "config", code = "no_kubeconfig", message = ("kubeconfig %s: no such file"):format(where) }
    end
  end
  local cfg = in_cluster(opts)
  if cfg then return cfg end
  raise { op = "config", code = "no_kubeconfig",
    message = "no Kubernetes configuration: set KUBECONFIG, create ~/.kube/config, " ..
    "or run in a pod (KUBERNETES_SERVICE_HOST is not set)" }
end

-- ---- credentials -------------------------------------------------------------

local exec_cache = {}   -- key -> {status, expires}

local function parse_time(s)
  local y, mo, d, h, mi, sec = tostring(s):match("^(%d+)-(%d+)-(%d+)T(%d+):(%d+):(%d+)")
  if not y then return nil end
  -- os.time reads a table as local time; correct by the offset at that instant
  local t = os.time { year = y, month = mo, day = d, hour = h, min = mi, sec = sec }
  local utc = os.time(os.date("!*t", t))
  return t + (t - utc)
end
M.parse_time = parse_time

local function run_exec(cfg)
  local e = cfg.exec
  if e.apiVersion ~= "client.authentication.k8s.io/v1" and e.apiVersion ~= "client.authentication.k8s.io/v1beta1" then
    raise { op = "config", code = "invalid_kubeconfig",
      message = ("user %q: exec apiVersion %s is not supported (use client.authentication.k8s.io/v1)"):format(
        cfg.user, tostring(e.apiVersion)) }
  end
  local argv = { e.command }
  for _, a in ipairs(e.args or {}) do argv[#argv + 1] = tostring(a) end
  local info = { kind = "ExecCredential", apiVersion = e.apiVersion, spec = { interactive = false } }
  if e.provideClusterInfo then info.spec.cluster = { server = cfg.server, ["tls-server-name"] = cfg.tls_server_name } end
  local env = { KUBERNETES_EXEC_INFO = cjson.encode(info) }
  for _, kv in ipairs(e.env or {}) do env[kv.name] = kv.value end
  argv.env, argv.timeout, argv.check = env, 30, false
  local ok, r = pcall(require("exec").read, argv)
  if not ok or r.status ~= 0 then
    local why = ok and (r.stderr:gsub("%s+$", ""):match("([^\n]*)$") or "") or tostring(r.message or r)
    raise { op = "config", code = "exec_plugin",
      message = ("user %q: credential plugin %s failed: %s%s"):format(
        cfg.user, e.command, ok and ("exit status " .. r.status .. (why ~= "" and (": " .. why) or "")) or why,
        e.installHint and ("\n" .. e.installHint) or "") }
  end
  local okj, cred = pcall(cjson.decode, r.stdout)
  if not okj or type(cred) ~= "table" or type(cred.status) ~= "table" then
    raise { op = "config", code = "exec_plugin",
      message = ("user %q: credential plugin %s did not print an ExecCredential"):format(cfg.user, e.command) }
  end
  local st = cred.status
  for _, k in ipairs { "token", "clientKeyData" } do
    if type(st[k]) == "string" then host.secret(st[k]) end
  end
  return st, st.expirationTimestamp and parse_time(st.expirationTimestamp)
end

--- The credential to use now: {token=..., cert_data=..., key_data=...}.
-- `refresh` forces a new exec credential or token file read (after a 401).
function M.credentials(cfg, refresh)
  if cfg.exec then
    local key = cfg.context .. "\0" .. cfg.exec.command .. "\0" .. table.concat(cfg.exec.args or {}, "\0")
    local c = exec_cache[key]
    if refresh or not c or (c.expires and os.time() >= c.expires - 10) then
      local st, expires = run_exec(cfg)
      c = { status = st, expires = expires }
      exec_cache[key] = c
    end
    return { token = c.status.token, cert_data = c.status.clientCertificateData, key_data = c.status.clientKeyData,
      expires = c.expires }
  end
  if cfg.token_file and not cfg.token then
    local now = host.now()
    if refresh or not cfg._file_token or now - cfg._file_token_at > 60 then
      local t = read_file(cfg.token_file)
      if not t then raise { op = "config", code = "no_token",
        message = ("token file %s cannot be read"):format(cfg.token_file) } end
      cfg._file_token, cfg._file_token_at = t:gsub("%s+$", ""), now
      host.secret(cfg._file_token)
    end
    return { token = cfg._file_token }
  end
  return { token = cfg.token }
end

--- How many times the exec plugin ran (for specs of the cache).
function M.exec_cache_clear() exec_cache = {} end

return M
