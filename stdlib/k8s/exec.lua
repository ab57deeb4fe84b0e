--- A command in a pod, as methods of the client (stdlib/k8s.lua documents
-- them): exec, and cp over it (tar, as kubectl cp does). The WebSocket exchange and the gate are in modules/k8s_exec.c,
-- loaded on first use; this file picks the pod and container as kubectl
-- does and reads the exit status.
local cjson = require("cjson")
local client = require("k8s.client")
local logs = require("k8s.logs")
local duration = require("duration")

local Client = client.Client
local raise = client.raise

local M = {}

local function container_names(pod)
  local names = {}
  for _, c in ipairs(pod.spec.containers or {}) do names[#names + 1] = c.name end
  for _, c in ipairs(pod.spec.ephemeralContainers or {}) do names[#names + 1] = c.name end
  return names
end

-- The container to run in, checked against the pod as kubectl checks it.
local function container_of(pod, want)
  local name = want or logs.default_container(pod)
  local names = container_names(pod)
  for _, n in ipairs(names) do if n == name then return name end end
  raise { op = "exec", code = "container_not_found", retryable = false,
    message = ('container "%s" not found in pod "%s"; its containers: %s'):format(name, pod.metadata.name, table.concat(names, ", ")) }
end

-- The exit status from the status channel's metav1.Status, as kubectl reads it.
local function exit_status(r, where)
  local ok, st = pcall(cjson.decode, r.status_message)
  if not ok or type(st) ~= "table" then
    raise { op = "exec", code = "no_status", retryable = true,
      message = ("k8s exec %s: the connection closed without an exit status"):format(where) }
  end
  if st.status == "Success" then return 0 end
  if st.reason == "NonZeroExitCode" then
    for _, c in ipairs(type(st.details) == "table" and st.details.causes or {}) do
      if c.reason == "ExitCode" and tonumber(c.message) then return math.tointeger(tonumber(c.message)) end
    end
  end
  raise { op = "exec", code = st.reason or "exec_failed", retryable = false,
    message = ("k8s exec %s: %s"):format(where, st.message or r.status_message) }
end

local function check_argv(argv)
  if type(argv) ~= "table" or #argv == 0 then error("k8s.exec: the command must be a list of strings, e.g. {\"df\", \"-h\"}", 3) end
  for i, a in ipairs(argv) do
    if type(a) ~= "string" then error(("k8s.exec: command[%d] must be a string"):format(i), 3) end
  end
end

--- Run argv in a pod's container: {status, stdout, stderr, pod, container}.
function Client:exec(target, argv, opts)
  check_argv(argv)
  opts = opts or {}
  if type(opts) ~= "table" then error("k8s.exec: options must be a table", 2) end
  if opts.tty then error("k8s.exec: tty is not supported: a runbook reads the streams separately", 2) end
  if opts.stdin ~= nil and type(opts.stdin) ~= "string" then error("k8s.exec: stdin must be a string", 2) end
  local pods, ns = self:target_pods(target, opts, "exec")
  local pod = pods[1]
  local phase = pod.status and pod.status.phase
  if phase == "Succeeded" or phase == "Failed" then
    raise { op = "exec", code = "400", retryable = false,
      message = ("cannot exec into a container in a completed pod %s; current phase is %s"):format(pod.metadata.name, phase) }
  end
  local container = container_of(pod, opts.container)
  self:refresh()
  local cfg, cred = self.cfg, self.cred
  local r = require("runbook.k8s_exec").run {
    server = cfg.server, namespace = ns, pod = pod.metadata.name, container = container,
    command = argv, stdin = opts.stdin, read = opts.read and true or false,
    timeout = opts.timeout and duration.check(opts.timeout, "k8s.exec timeout"),
    ca_data = cfg.ca_data, ca_file = cfg.ca_file, insecure = cfg.insecure, tls_server_name = cfg.tls_server_name,
    cert_data = cred.cert_data or cfg.cert_data, cert_file = cfg.cert_file,
    key_data = cred.key_data or cfg.key_data, key_file = cfg.key_file, token = cred.token,
  }
  local res = { status = 0, stdout = "", stderr = "", pod = pod.metadata.name, container = container, skipped = r.skipped }
  if r.skipped then return res end
  local where = ("in pod %s/%s container %s"):format(ns, pod.metadata.name, container)
  res.status, res.stdout, res.stderr = exit_status(r, where), r.stdout, r.stderr
  if res.status ~= 0 and opts.check ~= false then
    local tail = r.stderr:gsub("%s+$", ""):match("([^\n]*)$")
    raise { op = "exec", code = tostring(res.status), retryable = false, result = res,
      message = ("%s %s exited with status %d%s"):format(argv[1], where, res.status, tail ~= "" and (": " .. tail) or "") }
  end
  return res
end

-- "pod/x:/path" or "deploy/x:/path" -> target, path; nil for a local path.
local function remote(spec)
  if type(spec) ~= "string" or spec == "" then error("k8s.cp: give \"pod/NAME:/path\" and a local path", 3) end
  local target, path = spec:match("^([%w.-]+/[%w.-]+):(.+)$")
  return target, path
end

local function split(path)
  local dir, base = path:gsub("/+$", ""):match("^(.*)/([^/]+)$")
  if not dir then return ".", path end
  return dir == "" and "/" or dir, base
end

-- tar in the pod and on this machine: a copy lands in a fresh directory next
-- to the destination and is then moved onto its name, so `to` names the copy.
local UNPACK = 'd=$(mktemp -d "$(dirname "$2")/.k8s-cp.XXXXXX") && tar xmf - -C "$d" && mv -f "$d/$1" "$2"; rc=$?; rm -rf "$d"; exit $rc'

--- Copy a file or directory out of a pod or into one (tar over exec, as
-- kubectl cp). Copying out reads the pod, and its unpacking here is a local
-- write (exec.run); copying in is a gated exec in the pod. -> {bytes}
function Client:cp(from, to, opts)
  opts = opts or {}
  local ft, fpath = remote(from)
  local tt, tpath = remote(to)
  if (ft and tt) or not (ft or tt) then error("k8s.cp: exactly one side must be \"pod/NAME:/path\"", 2) end
  local o = {}
  for k, v in pairs(opts) do o[k] = v end
  if ft then
    local dir, base = split(fpath)
    o.read = true
    local r = self:exec(ft, { "tar", "cf", "-", "-C", dir, base }, o)
    require("exec").run { shell = UNPACK, base, to, stdin = r.stdout, timeout = opts.timeout }
    return { bytes = #r.stdout, pod = r.pod, container = r.container }
  end
  local dir, base = split(from)
  local tar = require("exec").read { "tar", "cf", "-", "-C", dir, base, timeout = opts.timeout }
  o.stdin, o.read = tar.stdout, false
  local r = self:exec(tt, { "sh", "-c", UNPACK, "sh", base, tpath }, o)
  return { bytes = #tar.stdout, pod = r.pod, container = r.container, skipped = r.skipped }
end

return M
