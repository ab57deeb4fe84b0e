--- k8s: the Kubernetes API for runbooks, over one reused libcurl connection.
--
-- Every function below exists twice: k8s.f(...) uses the default client (the
-- current context of $KUBECONFIG, else ~/.kube/config, else the in-cluster
-- service account, connected on first use), and c:f(...) a client from
-- k8s.connect{context=, namespace=, kubeconfig=}. A namespace defaults to the
-- context's; every function takes opts.namespace. Objects are Lua tables
-- decoded from the API's JSON. Targets are written as kubectl writes them:
-- "deploy/backend", "pod/x", "svc/web"; a bare name means a deployment.
--
-- Generic (any group/version/resource, custom resources too; types named as
-- kubectl names them: "deployments", "deploy", "Deployment", "deployments.apps",
-- resolved through discovery fetched once per process):
--   get(TYPE/NAME [, opts])                 -> object; opts.missing_ok: nil when 404
--   list(TYPE, {selector=, field_selector=, all_namespaces=, limit=})
--                                           -> items (every page), list metadata
--   create(obj) replace(obj) delete(TYPE/NAME, {propagation=, grace_period=, missing_ok=})
--   patch(TYPE/NAME, patch, {type = "strategic"|"merge"|"json", subresource=})
--   apply(obj | {obj...} | yaml | "file.yaml" | {file=}, {force=, field_manager=})
--                                           server-side apply, field manager "runbook"
--   watch(TYPE, {name=, selector=, resource_version=, timeout=}, fn(type, obj))
--       fn returns truthy to stop (that value is returned); without fn, an
--       iterator: for type, obj in k8s.watch("pods", {timeout = "1m"}) do ... end
--
-- kubectl's verbs, with kubectl's semantics:
--   scale(TARGET, replicas, {current_replicas=})
--   stop_workloads({TARGET...}, {timeout = "2m"}) -> saved   each scaled to 0, its pods gone
--   start_workloads(saved, {timeout = "5m"})   each back to its replicas, rolled out
--   rollout_restart(TARGET)    rollout_status(TARGET (a deployment or statefulset), {timeout = "5m", progress = fn|false,
--                                                  fail_fast = true: raise once new pods crash-loop
--                                                  or cannot pull their image, code = that reason})
--   rollout_history(TARGET) -> {{revision, replicaset, images, change_cause, template}...}
--   rollout_undo(TARGET, {to_revision = N})
--   last_change(TARGET) -> {revision, images, created, age, restarts, previous = {revision, images}}:
--       the revision that brought the current template, looking past rollout restarts
--   set_image(TARGET, {container = "image", ["*"] = "image"})
--   set_env(TARGET, {NAME = "v", GONE = false, PW = {secret = "db", key = "pw"}},
--           {container=, from_secret=, from_configmap=, prefix=})
--   logs(TARGET | {selector=}, {container=, tail=, since=, since_time=, previous=,
--        timestamps=, prefix=}) -> lines, {pod = lines}
--       a selector's pods are merged in timestamp order; prefix tags each line
--       "[pod/NAME/CONTAINER] "
--   logs(TARGET | {selector=}, {follow = true, timeout = "5m", ...}) -> an iterator of
--       {time, stamp, pod, container, line} as the pods write them (kubectl logs -f),
--       until timeout or the step's deadline: for rec in k8s.logs(...) do ... end
--   log_query{target = TARGET | selector =, container=, since=, since_time=, tail=,
--        previous=, where = {level = "ERROR", field = value | {v1, v2} | fn(v)},
--        match = "lua pattern", json = true, count_by = "level", top = 10,
--        follow = "2m", max = N, each = fn(rec)}
--       -> {records = {{time, stamp, pod, container, line, fields}...}, count,
--           scanned, first, last, pods, by = {{value, count}...} (with count_by)}
--       every pod of a workload, merged in timestamp order; JSON lines decode
--       into rec.fields, other lines are kept as text (fields nil); with follow, the
--       pods' logs as they write them for that long (kubectl logs -f), each match
--       passed to each() as it comes, ending early at max matches
--   users_of("secret/NAME" | "configmap/NAME") -> {{kind = "deployments", name, how = {"volume",
--       "envFrom", "env"}, restartable}...}: the deployments, statefulsets, daemonsets and
--       cronjobs whose pod template names it (containers, init containers, projected volumes)
--   events([TARGET], {namespace=, object=, type=, reason=, since=}) -> oldest first
--   wait(TARGET | TYPE, condition, {selector=, timeout = "30s"}): condition
--       "Ready", "Available", "condition=Progressing=False", "delete", or fn(obj)
--   top("pods"|"nodes", {selector=, sort_by = "cpu"|"memory"})
--   proxy_get("svc/NAME:PORT" | "pod/NAME:PORT", "/health", {check=}) -> {status, body, json}
--   exec(TARGET, {argv...}, {container=, stdin = "text", timeout=, read = true, check = false})
--       -> {status, stdout, stderr, pod, container}: a command in a pod's container over
--       the API server's WebSocket exec protocol (v5.channel.k8s.io, else v4). TARGET is
--       a pod or a workload (one ready pod, as kubectl picks it); the container defaults
--       to the pod's default container. A write through the gate unless read = true: in
--       a dry run it is reported (would run "df -h" in pod ns/x container c), not run.
--       A non-zero exit raises (code = the status) unless check = false; a missing
--       container raises code "container_not_found"; timeout (default the step's
--       deadline) and Ctrl-C close the session, which ends the command. tty = true
--       is refused with a clear error: the streams are read apart, with no terminal.
--   cp("pod/x:/path" | "deploy/x:/path", "local/path", {container=, timeout=})
--   cp("local/path", "pod/x:/path", {container=}) -> {bytes, pod, container}
--       a file or directory, by tar over exec as kubectl cp does; `to` names the
--       copy. Copying out is a read of the pod (unpacked here by exec.run, a local
--       write); copying in is a gated exec in the pod.
--
-- Summaries:
--   deployment_health(ns, name | "sts/NAME")   namespace_health(ns)
--   service_health(TARGET, {path = "/health"}) -> {ok, services = {{service, port, status, ok, error, json}...}}:
--       GET path through the proxy of every Service selecting the workload's pods
--   services_health(ns, {path = "/health"}) -> the same for every deployment of the namespace
--       at once: two lists and one GET per Service, not two lists per deployment
--
-- A cluster-wide lock (see stdlib/k8s/lease.lua):
--   lease_lock{namespace=, name=, duration = "60s", wait = "0s", identity=, try=}
--     -> lock with renew(), renew_if_due(), expires_in(), release(); `<close>` releases
--   lease_renew_due()
--
-- Writes go through the effect gate. In a dry run they are sent with
-- dryRun=All: the server validates and answers with the would-be object,
-- nothing persists, and the effect's result holds the diff ("replicas 2 -> 6").
-- Errors are structured: code is the HTTP status ("404", "409") or curl's
-- reason ("couldnt_connect"), with reason ("NotFound") and status fields.
-- Reads are retried with backoff on 429/5xx and connection failures.
-- k8s.array() is an empty list that encodes as [] (lua-cjson writes {} otherwise).
local client = require("k8s.client")
local verbs = require("k8s.verbs")
require("k8s.health")
require("k8s.logs")
require("k8s.exec")
local lease = require("k8s.lease")

local Client = client.Client
local k8s = {}

--- A client for a context: opts.context, opts.namespace, opts.kubeconfig
-- (a path list, instead of $KUBECONFIG), opts.in_cluster, opts.timeout (per request, default
-- "30s"), opts.connect_timeout (default "10s").
function k8s.connect(opts)
  if opts ~= nil and type(opts) ~= "table" then error("k8s.connect expects a table", 2) end
  return client.new(opts or {})
end

function Client:lease_lock(opts) return lease.new(self, opts) end
function Client:lease_renew_due() return lease.renew_due() end

--- A list that stays a list when empty: k8s.array() encodes as [] (a plain {} as {}).
k8s.array = client.array

--- A quantity as a number: k8s.quantity("128Mi") -> 134217728, ("250m") -> 0.25; nil when not one.
k8s.quantity = verbs.quantity
--- A quantity times a factor, in its unit: k8s.scale_quantity("256Mi", 2) -> "512Mi"; nil when not one.
k8s.scale_quantity = verbs.scale_quantity

--- Whether a label selector ({matchLabels, matchExpressions}, as a Deployment's
-- or a NetworkPolicy's podSelector) selects these labels: k8s.selects(sel, labels).
k8s.selects = require("k8s.health").matches

local default
--- The default client (connected on first use).
function k8s.client()
  if not default then default = client.new {} end
  return default
end

--- Forget the default client and cached discovery (after KUBECONFIG changed).
function k8s.reset()
  if default then default:close() end
  default = nil
  client.forget_discovery()
end

local PUBLIC = {
  "get", "list", "create", "replace", "patch", "apply", "delete", "watch",
  "scale", "stop_workloads", "start_workloads", "rollout_restart", "rollout_status", "rollout_history", "rollout_undo", "last_change", "set_image", "set_env",
  "users_of", "logs", "log_query", "exec", "cp", "events", "wait", "top", "proxy_get", "deployment_health", "namespace_health", "service_health",
  "services_health",
  "lease_lock", "lease_renew_due",
}
for _, name in ipairs(PUBLIC) do
  local method = Client[name]
  assert(method, name)
  k8s[name] = function(...) return method(k8s.client(), ...) end
end

return k8s
