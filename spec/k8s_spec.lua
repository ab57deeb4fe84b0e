-- k8s: the module against the sandbox's Kubernetes API stand-in (HTTPS, real
-- auth, a controller that rolls deployments out), cross-checked with kubectl.
-- Writes go to a namespace of the spec's own; todo-chatbot is only read,
-- except by the fault specs, which restore it.
package.path = "spec/sandbox/?.lua;" .. package.path
local sb = require("sandbox_helper")
local k8s = require("k8s")
local host = require("runbook.host")
local cjson = require("cjson")

local NS = "k8s-spec"
local APP_NS = "todo-chatbot"
local KUBECTL = "/usr/lib/google-cloud-sdk/bin/kubectl.1.32"

local kubeconfig = os.getenv("KUBECONFIG")
local kdir = sb.state .. "/k8s"
local tmp, cache

local function read(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("a")
  f:close()
  return s
end

local write = require("spec.support.cli").write

local function kubectl(args, ctx)
  return sb.sh(("%s --kubeconfig=%s --cache-dir=%s %s%s"):format(KUBECTL, kubeconfig, cache,
    ctx and ("--context=" .. ctx .. " ") or "", args))
end

local function kubectl_json(args)
  local out, ok = kubectl(args .. " -o json")
  assert(ok, out)
  return cjson.decode(out)
end

local function raises(f)
  local ok, err = pcall(f)
  assert.is_false(ok, "expected an error")
  assert.is_table(err, "expected a structured error, got " .. tostring(err))
  return err
end

local function deployment(name, opts)
  opts = opts or {}
  return {
    apiVersion = "apps/v1", kind = "Deployment",
    metadata = { name = name, namespace = NS, labels = { app = name } },
    spec = {
      replicas = opts.replicas or 2, progressDeadlineSeconds = opts.deadline,
      selector = { matchLabels = { app = name } },
      template = { metadata = { labels = { app = name } }, spec = { containers = {
        { name = "web", image = opts.image or "nginx:1.25", env = { { name = "MODE", value = "a" } } },
        { name = "sidecar", image = "busybox:1.36" },
      } } },
    },
  }
end

-- Every object's resourceVersion in the namespaces a spec touches, and the
-- store's own version (a list's resourceVersion): any persisted write moves it.
local function world()
  local snap = {}
  for _, t in ipairs { "deployments", "replicasets", "pods", "configmaps", "secrets", "leases", "services" } do
    for _, ns in ipairs { NS, APP_NS } do
      local items, meta = k8s.list(t, { namespace = ns })
      snap.store = meta.resourceVersion
      for _, o in ipairs(items) do snap[t .. "/" .. ns .. "/" .. o.metadata.name] = o.metadata.resourceVersion end
    end
  end
  return snap
end

local function rollout(name) return k8s.rollout_status("deploy/" .. name, { namespace = NS, timeout = "30s", progress = false }) end

setup(function()
  assert(select(2, sb.ctl("k8s reset --world")))
  tmp = sb.sh("mktemp -d"):gsub("%s+$", "")
  cache = tmp .. "/kubectl-cache"
  k8s.reset()
  if k8s.get("namespaces", NS, { missing_ok = true }) then
    k8s.delete("namespace/" .. NS)
  end
  k8s.create { apiVersion = "v1", kind = "Namespace", metadata = { name = NS } }
  k8s.create(deployment("web"))
  rollout("web")
end)

teardown(function()
  host.set_mode("run")
  pcall(k8s.delete, "namespace/" .. NS, { missing_ok = true })
  if tmp then sb.sh("rm -rf " .. tmp) end
end)

describe("k8s configuration and auth", function()
  local port = read(kdir .. "/port"):gsub("%s+$", "")

  local function config_with(user, cluster_extra, file)
    return write(tmp .. "/" .. (file or "config"), ([[
apiVersion: v1
kind: Config
clusters:
- name: c
  cluster:
    server: https://127.0.0.1:%s
%s
users:
- name: u
  user:
%s
contexts:
- name: ctx
  context: {cluster: c, user: u, namespace: todo-chatbot}
current-context: ctx
]]):format(port, cluster_extra or "    certificate-authority: ca.crt", user))
  end

  setup(function() sb.sh(("cp %s/ca.crt %s/client.crt %s/client.key %s/token %s/"):format(kdir, kdir, kdir, kdir, tmp)) end)

  it("uses the current context, its namespace and its token", function()
    local c = k8s.connect()
    assert.are.same({ "sandbox", "default", "sandbox-token" }, { c.context, c.namespace, c.user })
    assert.are.equal("todo-chatbot-backend", c:get("deploy/todo-chatbot-backend", { namespace = APP_NS }).metadata.name)
  end)

  it("authenticates with a client certificate and with an exec plugin, switching contexts", function()
    for _, ctx in ipairs { "sandbox-cert", "sandbox-exec", "sandbox" } do
      local c = k8s.connect { context = ctx, namespace = APP_NS }
      assert.are.equal(2, #c:list("pods", { selector = "app.kubernetes.io/component=backend" }), ctx)
    end
  end)

  it("caches an exec credential until it expires, and refreshes it when it does", function()
    local count = tmp .. "/exec-count"
    local plugin = write(tmp .. "/plugin", ([[#!/bin/sh
echo x >>%s
printf '{"apiVersion":"client.authentication.k8s.io/v1","kind":"ExecCredential","status":{"token":"%%s","expirationTimestamp":"%%s"}}' "$(cat %s/exec-token)" "$(date -u -d "+$1 seconds" +%%Y-%%m-%%dT%%H:%%M:%%SZ)"
]]):format(count, kdir))
    sb.sh("chmod +x " .. plugin)
    local function exec_user(secs)
      return ("    exec:\n      apiVersion: client.authentication.k8s.io/v1\n      command: ./plugin\n      args: [\"%d\"]\n      interactiveMode: Never"):format(secs)
    end
    local c = k8s.connect { kubeconfig = config_with(exec_user(3600)) }
    for _ = 1, 3 do c:get("deploy/todo-chatbot-backend") end
    k8s.connect { kubeconfig = tmp .. "/config" }:get("deploy/todo-chatbot-backend")
    assert.are.equal(1, #read(count):gsub("[^x]", ""))
    -- a credential about to expire is fetched again before each use
    c = k8s.connect { kubeconfig = config_with(exec_user(5), nil, "config2") }
    c:get("deploy/todo-chatbot-backend")
    c:get("deploy/todo-chatbot-backend")
    assert.are.equal(4, #read(count):gsub("[^x]", "")) -- connect, then one per request
  end)

  it("resolves relative certificate paths, tokenFile and client cert files against the kubeconfig", function()
    local c = k8s.connect { kubeconfig = config_with("    tokenFile: token") }
    assert.are.equal(APP_NS, c.namespace)
    assert.is_table(c:get("deploy/todo-chatbot-backend"))
    c = k8s.connect { kubeconfig = config_with("    client-certificate: client.crt\n    client-key: client.key") }
    assert.is_table(c:get("deploy/todo-chatbot-backend"))
  end)

  it("verifies the server as tls-server-name, and skips verification only when told to", function()
    local ok = k8s.connect { kubeconfig = config_with("    tokenFile: token",
      "    certificate-authority: ca.crt\n    tls-server-name: localhost") }
    assert.is_table(ok:get("deploy/todo-chatbot-backend"))
    local bad = k8s.connect { kubeconfig = config_with("    tokenFile: token",
      "    certificate-authority: ca.crt\n    tls-server-name: wrong.example") }
    assert.are.equal("peer_failed_verification", raises(function() bad:get("deploy/todo-chatbot-backend") end).code)
    local insecure = k8s.connect { kubeconfig = config_with("    tokenFile: token", "    insecure-skip-tls-verify: true") }
    assert.is_table(insecure:get("deploy/todo-chatbot-backend"))
  end)

  it("merges several KUBECONFIG files, the first one winning", function()
    local other = write(tmp .. "/other", ([[
apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:1"}}]
users: [{name: u2, user: {tokenFile: token}}]
contexts:
- {name: ctx, context: {cluster: c, user: u2}}
- {name: extra, context: {cluster: c, user: u2, namespace: kube-system}}
current-context: extra
]]))
    local first = config_with("    tokenFile: token")
    local c = k8s.connect { kubeconfig = first .. ":" .. other }
    assert.are.same({ "ctx", APP_NS }, { c.context, c.namespace })
    assert.is_table(c:get("deploy/todo-chatbot-backend"))
    local e = k8s.connect { kubeconfig = first .. ":" .. other, context = "extra" }
    assert.are.same({ "kube-system", "u2" }, { e.namespace, e.user })
    assert.is_table(e:get("deploy/todo-chatbot-backend", { namespace = APP_NS })) -- cluster c from the first file
  end)

  for _, case in ipairs {
    { "an unknown context", function() k8s.connect { context = "nope" } end, "unknown_context", 'context "nope" not found.*sandbox%-cert' },
    { "a missing kubeconfig", function() k8s.connect { kubeconfig = "/nonexistent/config" } end, "no_kubeconfig", "/nonexistent/config" },
    { "malformed YAML", function() k8s.connect { kubeconfig = write(tmp .. "/bad", "clusters: [oops\n") } end, "invalid_kubeconfig", "not valid YAML" },
    { "a context naming a missing cluster", function()
      k8s.connect { kubeconfig = write(tmp .. "/bad2", "contexts: [{name: x, context: {cluster: gone}}]\ncurrent-context: x\n") }
    end, "invalid_kubeconfig", 'names cluster "gone"' },
  } do
    it("fails clearly on " .. case[1], function()
      local err = raises(case[2])
      assert.are.equal(case[3], err.code)
      assert.matches(case[4], err.message)
    end)
  end

  it("names host:port and curl's reason when the server is unreachable", function()
    local c = k8s.connect { kubeconfig = write(tmp .. "/down", [[
clusters: [{name: c, cluster: {server: "https://127.0.0.1:1"}}]
users: [{name: u, user: {token: abcdefgh}}]
contexts: [{name: x, context: {cluster: c, user: u}}]
current-context: x
]]) }
    local err = raises(function() c:get("pods/x") end)
    assert.are.equal("couldnt_connect", err.code)
    assert.matches("127.0.0.1:1", err.message, 1, true)
    assert.matches("[Cc]ouldn't connect", err.message)
  end)

  it("raises 401 naming the user and the verb, and never prints the token", function()
    local c = k8s.connect { context = "sandbox-anonymous" }
    local err = raises(function() c:get("deploy/todo-chatbot-backend", { namespace = APP_NS }) end)
    assert.are.same({ "401", "Unauthorized", false }, { err.code, err.reason, err.retryable })
    assert.matches('user "sandbox%-anonymous"', err.message)
    assert.matches('may not get deployments.apps "', err.message, 1, true)
    local token = read(kdir .. "/token"):gsub("%s+$", "")
    k8s.connect():get("deploy/todo-chatbot-backend", { namespace = APP_NS })
    assert.are.equal("***", host.redact(token))
  end)

  it("raises 403 naming the user, the verb and the resource, and writes nothing", function()
    local c = k8s.connect { context = "sandbox-viewer" }
    local before = k8s.get("deploy/todo-chatbot-backend", { namespace = APP_NS }).metadata.resourceVersion
    assert.is_true(#c:list("deployments", { namespace = APP_NS }) > 0)   -- a viewer may read
    local err = raises(function() c:scale("deploy/todo-chatbot-backend", 3, { namespace = APP_NS }) end)
    assert.are.same({ "403", "Forbidden", false }, { err.code, err.reason, err.retryable })
    assert.matches('User "sandbox-viewer" cannot patch resource "deployments/scale"', err.message, 1, true)
    assert.matches('user "sandbox-viewer" (context sandbox-viewer) may not scale deployments.apps', err.message, 1, true)
    assert.are.equal(before, k8s.get("deploy/todo-chatbot-backend", { namespace = APP_NS }).metadata.resourceVersion)
  end)
end)

describe("k8s generic verbs", function()
  it("gets by any of kubectl's names, and raises 404 with kubectl's message", function()
    for _, t in ipairs { "deploy", "deployment", "deployments", "Deployment", "deployments.apps", "deployments.v1.apps" } do
      assert.are.equal("web", k8s.get(t, "web", { namespace = NS }).metadata.name)
    end
    local err = raises(function() k8s.get("deploy/nope", { namespace = NS }) end)
    assert.are.same({ "404", "NotFound" }, { err.code, err.reason })
    assert.matches('deployments.apps "nope" not found', err.message, 1, true)
    assert.is_nil(k8s.get("deploy/nope", { namespace = NS, missing_ok = true }))
    assert.are.equal("unknown_resource", raises(function() k8s.get("widgets/x") end).code)
  end)

  it("lists with label and field selectors, following continue across pages", function()
    local all = k8s.list("pods", { namespace = APP_NS })
    local paged = k8s.list("pods", { namespace = APP_NS, limit = 2 })
    assert.is_true(#all > 4)
    assert.are.equal(#all, #paged)
    local backend = k8s.list("pods", { namespace = APP_NS, selector = { ["app.kubernetes.io/component"] = "backend" } })
    assert.are.equal(2, #backend)
    local one = k8s.list("pods", { namespace = APP_NS, field_selector = "metadata.name=" .. backend[1].metadata.name })
    assert.are.same({ backend[1].metadata.name }, { one[1].metadata.name })
    local everywhere = k8s.list("pods", { all_namespaces = true })
    assert.is_true(#everywhere > #all)
  end)

  it("creates, replaces (409 on a stale resourceVersion) and deletes", function()
    local cm = k8s.create { apiVersion = "v1", kind = "ConfigMap", metadata = { name = "settings", namespace = NS },
      data = { a = "1" } }
    assert.are.equal("1", cm.data.a)
    local err = raises(function() k8s.create { apiVersion = "v1", kind = "ConfigMap", metadata = { name = "settings", namespace = NS } } end)
    assert.are.same({ "409", "AlreadyExists" }, { err.code, err.reason })
    cm.data.a = "2"
    local stale = cjson.decode(cjson.encode(cm))
    cm = k8s.replace(cm)
    assert.are.equal("2", kubectl_json("get cm settings -n " .. NS).data.a)
    stale.data.a = "3"
    err = raises(function() k8s.replace(stale) end)
    assert.are.same({ "409", "Conflict", true }, { err.code, err.reason, err.retryable })
    k8s.delete("cm/settings", { namespace = NS })
    assert.is_nil(k8s.get("cm/settings", { namespace = NS, missing_ok = true }))
    assert.are.equal("404", raises(function() k8s.delete("cm/settings", { namespace = NS }) end).code)
    assert.is_nil(k8s.delete("cm/settings", { namespace = NS, missing_ok = true }))
  end)

  it("keeps empty lists lists through a read-modify-write", function()
    local cm = k8s.create { apiVersion = "v1", kind = "ConfigMap", metadata = { name = "lists", namespace = NS },
      data = { x = "[]" } }
    rollout("web") -- the controller's status writes would make the read below stale (409)
    local d = k8s.get("deploy/web", { namespace = NS })
    d.spec.template.spec.containers[2].args = k8s.array()
    d = k8s.replace(d)
    assert.are.same({}, kubectl_json("get deploy web -n " .. NS).spec.template.spec.containers[2].args)
    rollout("web")
    d = k8s.get("deploy/web", { namespace = NS })
    d.metadata.annotations = d.metadata.annotations or {}
    d.metadata.annotations.touched = "yes"
    k8s.replace(d)
    local back = kubectl_json("get deploy web -n " .. NS)
    assert.are.same({ {}, "yes" }, { back.spec.template.spec.containers[2].args, back.metadata.annotations.touched })
    assert.are.equal("[]", cm.data.x)
    k8s.delete("cm/lists", { namespace = NS })
  end)

  it("patches with strategic merge, merge and JSON patch; 422 names the invalid field", function()
    k8s.patch("deploy/web", { metadata = { labels = { tier = "front" } } }, { namespace = NS })
    k8s.patch("deploy/web", { metadata = { labels = { team = "ops" } } }, { namespace = NS, type = "merge" })
    k8s.patch("deploy/web", { { op = "add", path = "/metadata/labels/owner", value = "me" } }, { namespace = NS, type = "json" })
    local labels = kubectl_json("get deploy web -n " .. NS).metadata.labels
    assert.are.same({ "front", "ops", "me" }, { labels.tier, labels.team, labels.owner })
    local err = raises(function()
      k8s.patch("deploy/web", { { op = "replace", path = "/spec/template/spec/containers", value = k8s.array() } }, { namespace = NS, type = "json" })
    end)
    assert.are.same({ "422", "Invalid" }, { err.code, err.reason })
    assert.matches("spec.template.spec.containers", err.message, 1, true)
  end)

  it("applies server-side from a table, YAML (multi-document) and a file, as field manager runbook", function()
    local yaml = ([[
apiVersion: v1
kind: ConfigMap
metadata: {name: applied-a, namespace: %s}
data: {k: v1}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: applied-b, namespace: %s}
data: {k: v1}
]]):format(NS, NS)
    local out = k8s.apply(yaml)
    assert.are.equal(2, #out)
    local file = write(tmp .. "/cm.yaml", (yaml:gsub("v1}", "v2}")))
    k8s.apply(file)
    local a = kubectl_json("get cm applied-a --show-managed-fields -n " .. NS)
    assert.are.equal("v2", a.data.k)
    local managers = {}
    for _, m in ipairs(a.metadata.managedFields) do managers[m.manager] = m.operation end
    assert.are.equal("Apply", managers.runbook)
    local one = k8s.apply { apiVersion = "v1", kind = "ConfigMap", metadata = { name = "applied-a", namespace = NS }, data = { k = "v3" } }
    assert.are.equal("v3", one.data.k)
    -- kubectl apply --server-side of the same object conflicts on the field we own
    write(tmp .. "/kc.yaml", ("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: applied-a, namespace: %s}\ndata: {k: v4}\n"):format(NS))
    local kout, kok = kubectl("apply --server-side -f " .. tmp .. "/kc.yaml")
    assert.is_false(kok)
    assert.matches('conflict with "runbook"', kout)
    k8s.delete("cm/applied-a", { namespace = NS })
    k8s.delete("cm/applied-b", { namespace = NS })
  end)

  it("handles custom resources found through discovery", function()
    local comps = k8s.list("components.dapr.io", { namespace = APP_NS })
    assert.is_true(#comps > 0)
    assert.are.equal("Component", comps[1].kind)
    assert.are.equal(comps[1].metadata.name, k8s.get("components", comps[1].metadata.name, { namespace = APP_NS }).metadata.name)
  end)

  it("watches with a callback and as an iterator, with a timeout", function()
    local seen = k8s.watch("deployments", { namespace = NS, name = "web", timeout = 5 }, function(ty, obj)
      if ty == "ADDED" then return obj.metadata.name end
    end)
    assert.are.equal("web", seen)
    local d = k8s.get("deploy/web", { namespace = NS })
    local events = {}
    local t0 = host.now()
    k8s.patch("deploy/web", { metadata = { annotations = { watched = "1" } } }, { namespace = NS })
    for ty, obj in k8s.watch("deployments", { namespace = NS, resource_version = d.metadata.resourceVersion, timeout = 2 }) do
      events[#events + 1] = ty .. " " .. obj.metadata.name
    end
    assert.is_true(host.now() - t0 >= 1.5 and host.now() - t0 < 6)
    assert.are.equal("MODIFIED web", events[1])
  end)
end)

describe("k8s kubectl verbs", function()
  it("scales through the scale subresource, and kubectl reads it back; the reverse too", function()
    local s = k8s.scale("deploy/web", 3, { namespace = NS })
    assert.are.equal(3, s.spec.replicas)
    assert.are.equal(3, kubectl_json("get deploy web -n " .. NS).spec.replicas)
    assert(select(2, kubectl("scale deploy/web --replicas=2 -n " .. NS)))
    assert.are.equal(2, k8s.get("deploy/web", { namespace = NS }).spec.replicas)
    assert.are.equal("precondition", raises(function() k8s.scale("deploy/web", 4, { namespace = NS, current_replicas = 7 }) end).code)
    rollout("web")
  end)

  it("stops workloads (scaled to 0, pods gone) and starts them again at their replicas", function()
    k8s.create(deployment("writer", { replicas = 3 }))
    finally(function() k8s.delete("deploy/writer", { namespace = NS, missing_ok = true }) end)
    rollout("writer")
    local saved = k8s.stop_workloads({ "deploy/web", "deploy/writer" }, { namespace = NS, timeout = "30s" })
    assert.are.same({ 2, 3 }, { saved[1].replicas, saved[2].replicas })
    -- checked with kubectl: both at 0 and no pod of theirs left
    assert.are.equal(0, kubectl_json("get deploy writer -n " .. NS).spec.replicas)
    assert.are.same({}, kubectl_json("get pods -l app=writer -n " .. NS).items)
    assert.are.same({}, kubectl_json("get pods -l app=web -n " .. NS).items)
    k8s.start_workloads(saved, { timeout = "30s" })
    assert.are.equal(3, kubectl_json("get deploy writer -n " .. NS).status.readyReplicas)
    assert.are.equal(2, kubectl_json("get deploy web -n " .. NS).status.readyReplicas)
    assert.has_error(function() k8s.stop_workloads({}) end)
  end)

  it("restarts a rollout with kubectl's annotation, and waits for it like kubectl", function()
    local before = k8s.get("deploy/web", { namespace = NS })
    k8s.rollout_restart("deploy/web", { namespace = NS })
    local ann = kubectl_json("get deploy web -n " .. NS).spec.template.metadata.annotations
    assert.matches("^%d+%-%d+%-%d+T", ann["kubectl.kubernetes.io/restartedAt"])
    local msgs = {}
    local res = k8s.rollout_status("deploy/web", { namespace = NS, timeout = "30s", progress = function(m) msgs[#msgs + 1] = m end })
    assert.are.equal('deployment "web" successfully rolled out', res.message)
    -- kubectl's progress lines, none when the rollout is done by the first look (a loaded machine)
    for _, m in ipairs(msgs) do assert.matches("^Waiting for deployment", m) end
    assert.are_not.equal(before.metadata.generation, res.deployment.metadata.generation)
    local out = kubectl("rollout status deploy/web --timeout=10s -n " .. NS)
    assert.matches("successfully rolled out", out)
  end)

  it("sets images (kubectl reads them back) and rolls back to the previous and a given revision", function()
    k8s.set_image("deploy/web", { web = "nginx:1.26" }, { namespace = NS })
    rollout("web")
    assert.are.equal("nginx:1.26", kubectl_json("get deploy web -n " .. NS).spec.template.spec.containers[1].image)
    assert.are.equal("404", raises(function() k8s.set_image("deploy/web", { nope = "x:1" }, { namespace = NS }) end).code)
    local hist = k8s.rollout_history("deploy/web", { namespace = NS })
    assert.is_true(#hist >= 2)
    assert.are.same({ "nginx:1.26", "busybox:1.36" }, hist[#hist].images)
    k8s.rollout_undo("deploy/web", { namespace = NS })
    rollout("web")
    local d = k8s.get("deploy/web", { namespace = NS })
    assert.are.equal(hist[#hist - 1].images[1], d.spec.template.spec.containers[1].image)
    assert.is_nil(d.spec.template.metadata.labels["pod-template-hash"])
    local first = k8s.rollout_history("deploy/web", { namespace = NS })[1]
    k8s.rollout_undo("deploy/web", { namespace = NS, to_revision = first.revision })
    rollout("web")
    assert.are.equal("nginx:1.25", kubectl_json("get deploy web -n " .. NS).spec.template.spec.containers[1].image)
    assert.are.equal("no_revision", raises(function() k8s.rollout_undo("deploy/web", { namespace = NS, to_revision = 999 }) end).code)
    -- kubectl's own rollout undo reads the history our writes left the way we do
    local revs = k8s.rollout_history("deploy/web", { namespace = NS })
    assert(select(2, kubectl("rollout undo deploy/web -n " .. NS)))
    rollout("web")
    assert.are.same(revs[#revs - 1].images, k8s.rollout_history("deploy/web", { namespace = NS })[#revs].images)
    local now = k8s.get("deploy/web", { namespace = NS }).spec.template.spec.containers
    assert.are.same(revs[#revs - 1].images, { now[1].image, now[2].image })
  end)

  it("sets and removes env values, from literals and from a secret, as kubectl shows them", function()
    k8s.create { apiVersion = "v1", kind = "Secret", metadata = { name = "db", namespace = NS },
      stringData = { password = "pw-value-1", ["db-host"] = "pg" } }
    k8s.set_env("deploy/web", { LOG_LEVEL = "debug", MODE = false }, { namespace = NS, container = "web" })
    k8s.set_env("deploy/web", {}, { namespace = NS, container = "web", from_secret = "db", prefix = "DB_" })
    local env = kubectl_json("get deploy web -n " .. NS).spec.template.spec.containers[1].env
    local by = {}
    for _, e in ipairs(env) do by[e.name] = e end
    assert.are.equal("debug", by.LOG_LEVEL.value)
    assert.is_nil(by.MODE)
    assert.are.same({ name = "db", key = "password" }, by.DB_PASSWORD.valueFrom.secretKeyRef)
    assert.are.same({ name = "db", key = "db-host" }, by.DB_DB_HOST.valueFrom.secretKeyRef)
    assert.is_nil(kubectl_json("get deploy web -n " .. NS).spec.template.spec.containers[2].env)
    -- and the reverse: kubectl's set env, read by the module
    assert(select(2, kubectl("set env deploy/web -c web FROM_KUBECTL=yes -n " .. NS)))
    local got = {}
    for _, e in ipairs(k8s.get("deploy/web", { namespace = NS }).spec.template.spec.containers[1].env) do got[e.name] = e.value end
    assert.are.equal("yes", got.FROM_KUBECTL)
    rollout("web")
  end)

  it("set_env retries from a fresh read when another writer changed the deployment in between (409)", function()
    local c = k8s.connect()
    local puts, call = 0, c.call
    -- kubectl writes the deployment right before our first PUT, which then carries a stale resourceVersion.
    c.call = function(self, req)
      if req.method == "PUT" and req.op == "set_env" then
        puts = puts + 1
        if puts == 1 then assert(select(2, kubectl("annotate deploy/web -n " .. NS .. " --overwrite raced=yes"))) end
      end
      return call(self, req)
    end
    c:set_env("deploy/web", { RACED = "1" }, { namespace = NS, container = "web" })
    assert.are.equal(2, puts)
    local d = kubectl_json("get deploy web -n " .. NS)
    assert.are.equal("yes", d.metadata.annotations.raced)
    local got = {}
    for _, e in ipairs(d.spec.template.spec.containers[1].env) do got[e.name] = e.value end
    assert.are.equal("1", got.RACED)
    rollout("web")
  end)

  it("reads logs: tail, container, previous, a selector across pods; JSON lines decode", function()
    local lines = k8s.logs("deploy/todo-chatbot-backend", { namespace = APP_NS, tail = 5 })
    assert.are.equal(5, #lines)
    assert.are.equal("backend", require("json").decode(lines[5]).service)
    local pods = k8s.list("pods", { namespace = APP_NS, selector = "app.kubernetes.io/component=backend" })
    -- the app writes a line every few seconds: kubectl's read must equal one of ours around it
    local function mine() return table.concat(k8s.logs("pod/" .. pods[1].metadata.name, { namespace = APP_NS, container = "backend", tail = 5 }), "\n") end
    local m1 = mine()
    local kout = kubectl(("logs %s -c backend --tail=5 -n %s"):format(pods[1].metadata.name, APP_NS)):gsub("%s+$", "")
    local m2 = mine()
    assert.is_true(kout == m1 or kout == m2, kout)
    local all, by_pod = k8s.logs { namespace = APP_NS, selector = "app.kubernetes.io/component=backend", tail = 2, prefix = true }
    assert.are.equal(4, #all)
    assert.matches("^%[pod/todo%-chatbot%-backend%-", all[1])
    assert.are.equal(2, #by_pod[pods[2].metadata.name])
    assert.are.equal("400", raises(function() k8s.logs("pod/" .. pods[1].metadata.name, { namespace = APP_NS, previous = true }) end).code)
  end)

  it("lists events of a namespace and of one object, oldest first, by type and reason", function()
    local evs = k8s.events { namespace = NS }
    assert.is_true(#evs > 0)
    for i = 2, #evs do assert.is_true(require("k8s.verbs").event_time(evs[i - 1]) <= require("k8s.verbs").event_time(evs[i])) end
    local mine = k8s.events("deploy/web", { namespace = NS, reason = "ScalingReplicaSet" })
    assert.is_true(#mine > 0)
    for _, e in ipairs(mine) do
      assert.are.same({ "Deployment", "web", "ScalingReplicaSet" }, { e.involvedObject.kind, e.involvedObject.name, e.reason })
    end
    assert.are.equal(0, #k8s.events { namespace = NS, type = "Warning", reason = "NoSuchReason" })
  end)

  it("waits for pods Ready, a deployment Available, and a deletion; times out clearly", function()
    local pods = k8s.wait("pods", "Ready", { namespace = NS, selector = "app=web", timeout = "20s" })
    assert.is_true(#pods >= 2)
    assert.are.equal(1, #k8s.wait("deploy/web", "condition=Available", { namespace = NS }))
    k8s.create { apiVersion = "v1", kind = "ConfigMap", metadata = { name = "doomed", namespace = NS } }
    local err = raises(function() k8s.wait("cm/doomed", "delete", { namespace = NS, timeout = "1s" }) end)
    assert.are.same({ "timeout", true }, { err.code, err.retryable })
    assert.matches("doomed", err.message)
    sb.sh(("(sleep 1; %s --kubeconfig=%s --cache-dir=%s delete cm doomed -n %s) >/dev/null 2>&1 &"):format(KUBECTL, kubeconfig, cache, NS))
    local t0 = host.now()
    assert.are.same({}, k8s.wait("cm/doomed", "delete", { namespace = NS, timeout = "15s" }))
    assert.is_true(host.now() - t0 < 10)
    assert.is_true(#k8s.wait("deploy/web", function(d) return d.spec.replicas == 2 end, { namespace = NS }) == 1)
  end)

  it("reports usage from the metrics API", function()
    local pods = k8s.top("pods", { namespace = APP_NS, sort_by = "memory" })
    assert.is_true(#pods > 0)
    assert.is_true(pods[1].memory_bytes >= pods[#pods].memory_bytes)
    assert.is_true(pods[1].cpu_millicores > 0 and #pods[1].containers > 0)
    local nodes = k8s.top("nodes")
    assert.is_true(#nodes > 0 and nodes[1].memory_bytes > 0)
    assert.are.equal(250, require("k8s.verbs").quantity("250m") * 1000)
    assert.are.equal(128 * 1024 * 1024, require("k8s.verbs").quantity("128Mi"))
  end)

  it("reaches an app's /health through the service and pod proxy", function()
    local r = k8s.proxy_get("svc/todo-chatbot-backend:8000", "/health", { namespace = APP_NS })
    assert.are.same({ 200, "healthy" }, { r.status, r.json.status })
    local pod = k8s.list("pods", { namespace = APP_NS, selector = "app.kubernetes.io/component=backend" })[1]
    assert.are.equal(200, k8s.proxy_get("pod/" .. pod.metadata.name .. ":8000", "/health", { namespace = APP_NS }).status)
    assert.are.equal("404", raises(function() k8s.proxy_get("svc/nope:80", "/health", { namespace = APP_NS, check = true }) end).code)
  end)
end)

describe("k8s users_of", function()
  it("finds the workloads whose pods read a Secret or ConfigMap: volumes, projected sources, envFrom, env, init containers", function()
    local reads = deployment("reads")
    local spec = reads.spec.template.spec
    spec.volumes = { { name = "p", projected = { sources = { { secret = { name = "shared" } } } } } }
    spec.initContainers = { { name = "init", image = "busybox:1.36", envFrom = { { configMapRef = { name = "settings" } } } } }
    spec.containers[1].env[2] = { name = "TOKEN", valueFrom = { secretKeyRef = { name = "shared", key = "token" } } }
    local mounts = deployment("mounts")
    mounts.spec.template.spec.volumes = { { name = "s", secret = { secretName = "shared" } }, { name = "c", configMap = { name = "other" } } }
    k8s.create(reads)
    k8s.create(mounts)
    finally(function()
      k8s.delete("deploy/reads", { namespace = NS, missing_ok = true })
      k8s.delete("deploy/mounts", { namespace = NS, missing_ok = true })
    end)
    local found = {}
    for _, u in ipairs(k8s.users_of("secret/shared", { namespace = NS })) do found[u.kind .. "/" .. u.name] = u end
    assert.are.same({ "volume", "env" }, found["deployments/reads"].how)
    assert.are.same({ "volume" }, found["deployments/mounts"].how)
    assert.is_true(found["deployments/reads"].restartable)
    local cm = k8s.users_of("configmap/settings", { namespace = NS })
    assert.are.equal(1, #cm)
    assert.are.same({ "deployments", "reads", { "envFrom" } }, { cm[1].kind, cm[1].name, cm[1].how })
    assert.are.same({}, k8s.users_of("secret/nobody-reads-this", { namespace = NS }))
    assert.has_error(function() k8s.users_of("deploy/reads") end, 'k8s.users_of: expected "secret/NAME" or "configmap/NAME"')
  end)
end)

describe("k8s API errors", function()
  after_each(function() sb.ctl("k8s reset") end)

  it("retries reads through injected 500s with backoff", function()
    assert(select(2, sb.ctl("k8s api-errors 20% 500")))
    for _ = 1, 10 do assert.is_table(k8s.get("deploy/web", { namespace = NS })) end
    assert(select(2, sb.ctl("k8s api-errors 100% 500")))
    local t0 = host.now()
    local err = raises(function() k8s.get("deploy/web", { namespace = NS }) end)
    assert.are.same({ "500", "InternalError", true }, { err.code, err.reason, err.retryable })
    assert.is_true(host.now() - t0 > 1, "gave up without backing off")
  end)

  it("times out a slow server within the client's timeout and the step's deadline", function()
    assert(select(2, sb.ctl("k8s api-latency 3s")))
    local c = k8s.connect { timeout = 0.5 }
    c:discover()
    local t0 = host.now()
    local err = raises(function() c:call { path = "/api/v1/namespaces/" .. NS .. "/configmaps", method = "POST", body = {} } end)
    assert.are.same({ "timeout", true }, { err.code, err.retryable })
    assert.is_true(host.now() - t0 < 2)
    host.set_deadline(host.now() + 0.5)
    t0 = host.now()
    local ok = pcall(k8s.get, "deploy/web", { namespace = NS })
    host.set_deadline(nil)
    assert.is_false(ok)
    assert.is_true(host.now() - t0 < 2.5)
  end)

  it("raises ProgressDeadlineExceeded from rollout_status", function()
    k8s.create(deployment("stuck", { deadline = 2, replicas = 1 }))
    rollout("stuck")
    k8s.set_image("deploy/stuck", { web = "nginx:does-not-exist" }, { namespace = NS })
    local err = raises(function() k8s.rollout_status("deploy/stuck", { namespace = NS, timeout = "30s", progress = false }) end)
    assert.are.same({ "ProgressDeadlineExceeded", false }, { err.code, err.retryable })
    local h = k8s.deployment_health(NS, "stuck")
    local reasons = {}
    for _, p in ipairs(h.pods) do reasons[#reasons + 1] = tostring(p.reason) end
    assert.matches("ImagePull", table.concat(reasons, " "))
    k8s.delete("deploy/stuck", { namespace = NS })
  end)
end)

describe("k8s lease lock", function()
  local function lock(id, extra)
    local o = { namespace = NS, name = "runbook-lock", duration = "2s", identity = id, retry = "200ms" }
    for k, v in pairs(extra or {}) do o[k] = v end
    return k8s.lease_lock(o)
  end

  it("creates, blocks another holder, renews, takes over when expired, releases", function()
    local a = lock("host-a")
    local l = kubectl_json("get lease runbook-lock -n " .. NS)
    assert.are.same({ "host-a", 2, 0 }, { l.spec.holderIdentity, l.spec.leaseDurationSeconds, l.spec.leaseTransitions })
    local err = raises(function() lock("host-b") end)
    assert.are.same({ "locked", "host-a" }, { err.code, err.holder })
    assert.matches("held by host%-a until", err.message)
    local none, msg = lock("host-b", { try = true })
    assert.is_nil(none)
    assert.matches("host%-a", msg)
    local acquired = l.spec.acquireTime
    a:renew()
    local r = k8s.get("lease/runbook-lock", { namespace = NS })
    assert.are.same({ acquired, 0 }, { r.spec.acquireTime, r.spec.leaseTransitions })
    assert.are_not.equal(l.spec.renewTime, r.spec.renewTime)
    -- b waits until a's lease expires, then takes it over
    local b = lock("host-b", { wait = "5s" })
    r = k8s.get("lease/runbook-lock", { namespace = NS })
    assert.are.same({ "host-b", 1 }, { r.spec.holderIdentity, r.spec.leaseTransitions })
    assert.are.equal("lost", raises(function() a:renew() end).code)
    b:release()
    r = k8s.get("lease/runbook-lock", { namespace = NS })
    assert.are.same({ cjson.null, 1 }, { r.spec.holderIdentity or cjson.null, r.spec.leaseDurationSeconds })
    local c = lock("host-c")
    assert.are.equal(2, k8s.get("lease/runbook-lock", { namespace = NS }).spec.leaseTransitions)
    c:release()
  end)

  it("loses a race with a 409 when another writer updated the lease in between", function()
    local a = lock("host-a")
    local lease = k8s.get("lease/runbook-lock", { namespace = NS })
    -- another client renews a stale copy after us: its PUT carries an old resourceVersion
    a:renew()
    lease.spec.holderIdentity = "intruder"
    assert.are.equal("409", raises(function() k8s.replace(lease) end).code)
    a:release()
  end)
end)

describe("k8s lease lock and the run's heartbeat", function()
  local time = require("time")

  it("renews a held lease while a step sleeps, so nobody else can take it", function()
    local a = k8s.lease_lock { namespace = NS, name = "heartbeat-lock", duration = "3s", identity = "sleeper" }
    finally(function() a:release() end)
    local before = k8s.get("lease/heartbeat-lock", { namespace = NS }).spec.renewTime
    time.sleep("3.5s")   -- longer than the lease: only the heartbeat's renewals keep it
    local lease = k8s.get("lease/heartbeat-lock", { namespace = NS }).spec
    assert.are_not.equal(before, lease.renewTime)
    assert.are.equal("sleeper", lease.holderIdentity)
    local other, msg = k8s.lease_lock { namespace = NS, name = "heartbeat-lock", duration = "3s", identity = "other",
      try = true }
    assert.is_nil(other)
    assert.matches("held by sleeper", msg)
  end)
end)

describe("runbook run --lock=k8s:NAMESPACE/NAME", function()
  local cli = require("spec.support.cli")
  local state, rb
  local function lease() return k8s.get("lease/cron-lock", { namespace = NS }).spec end

  before_each(function()
    state = cli.tmpdir()
    rb = cli.runbook([[
name = "cron-job"
description = "holds the cluster-wide lock for a while"
param "hold" { type = "duration", default = "0s" }
step "work" { run = function(ctx) time.sleep(ctx.params.hold) end }
step "after" { run = function() end }
]])
  end)
  after_each(function() cli.cleanup() end)

  it("lets one run in across processes; the other exits 75 naming the holder; the lease is handed back", function()
    local a = cli.spawn({ "run", rb, "-p", "hold=4s", "--yes", "--lock=k8s:" .. NS .. "/cron-lock" },
      { RUNBOOK_STATE_DIR = state })
    cli.eventually(function()
      local ok, l = pcall(lease)
      return ok and type(l.holderIdentity) == "string" and l.holderIdentity:find("pid " .. a.pid, 1, true)
    end, "the first run to take the lease")
    local b = cli.run({ "run", rb, "--yes", "--output", "json", "--lock=k8s:" .. NS .. "/cron-lock" },
      { RUNBOOK_STATE_DIR = state })
    assert.are.equal(75, b.code, b.stderr)
    local ends = cli.only(cli.events(b.stdout), "run_end")
    assert.are.same({ "locked", 0 }, { ends[1].status, ends[1].ok })
    assert.truthy(b.stdout:find("held by [^\n]*pid " .. a.pid), b.stdout)
    local code, out = a.wait()
    assert.are.equal(0, code, out)
    assert.matches("take lease k8s%-spec/cron%-lock", out)
    assert.matches("release lease k8s%-spec/cron%-lock", out)
    assert.is_nil(lease().holderIdentity)
    -- Free again: the next run takes it at once (the value may also follow --lock as a word).
    assert.are.equal(0, cli.run({ "run", "--lock", "k8s:" .. NS .. "/cron-lock", rb, "--yes" },
      { RUNBOOK_STATE_DIR = state }).code)
  end)

  -- Started in the same instant, both read a free Lease and write it; the loser's write gets a 409.
  -- It names the winner, as when the Lease was already held (serve's two replicas depend on it).
  it("lets one of two runs started at once in; the other exits 75 naming the holder (a lost race too)", function()
    local d, cmds = cli.tmpdir(), {}
    for i = 1, 4 do
      k8s.delete("lease/race-lock-" .. i, { namespace = NS, missing_ok = true })
      for _, who in ipairs { "a", "b" } do
        cmds[#cmds + 1] = ("(RUNBOOK_STATE_DIR=%s %s run %s -p hold=2s --yes --lock=k8s:%s/race-lock-%d >%s/%d%s 2>&1; "
          .. "echo $? >%s/%d%s.code) &"):format(cli.quote(state), cli.BIN, cli.quote(rb), NS, i, d, i, who, d, i, who)
      end
    end
    os.execute(table.concat(cmds, " ") .. " wait")
    for i = 1, 4 do
      local codes = { tonumber(cli.slurp(d .. "/" .. i .. "a.code")), tonumber(cli.slurp(d .. "/" .. i .. "b.code")) }
      table.sort(codes)
      local out = cli.slurp(d .. "/" .. i .. "a") .. cli.slurp(d .. "/" .. i .. "b")
      assert.are.same({ 0, 75 }, codes, out)
      assert.truthy(out:find("race%-lock%-" .. i .. " is held by [^\n]*pid %d+"), out)
    end
  end)

  it("only checks the lease in a dry run, and rejects a malformed lease name before running", function()
    k8s.delete("lease/dry-cron-lock", { namespace = NS, missing_ok = true })
    local r = cli.run({ "run", rb, "--dry-run", "--lock=k8s:" .. NS .. "/dry-cron-lock" }, { RUNBOOK_STATE_DIR = state })
    assert.are.equal(0, r.code, r.stderr)
    assert.matches("would take lease", r.stdout)
    assert.are.equal("404", raises(function() k8s.get("lease/dry-cron-lock", { namespace = NS }) end).code)
    r = cli.run({ "run", rb, "--yes", "--lock=k8s:Bad_Name" }, { RUNBOOK_STATE_DIR = state })
    assert.are.equal(2, r.code)
    assert.matches("k8s:NAMESPACE/NAME", r.stderr)
  end)
end)

describe("k8s in a dry run", function()
  local effects

  before_each(function()
    effects = {}
    host.set_effect_sink(function(e) effects[#effects + 1] = e end)
  end)

  after_each(function()
    host.set_mode("run")
    host.set_effect_sink(nil)
  end)

  it("changes no object's resourceVersion with any write function, and reports the diffs", function()
    k8s.create { apiVersion = "v1", kind = "Secret", metadata = { name = "dry-secret", namespace = NS }, stringData = { k = "v" } }
    local d = k8s.get("deploy/web", { namespace = NS })
    local before = world()
    host.set_mode("dry-run")
    local o = { namespace = NS }
    local writes = {
      { "scale", function() return k8s.scale("deploy/web", 6, o) end, "replicas 2 %-> 6" },
      { "set_image", function() return k8s.set_image("deploy/web", { web = "nginx:9.9" }, o) end, "image%[web%] [%w:.]+ %-> nginx:9.9" },
      { "set_env", function() return k8s.set_env("deploy/web", { NEW_VAR = "1" }, { namespace = NS, container = "web" }) end, "env%[NEW_VAR%]%[web%] added" },
      { "rollout_restart", function() return k8s.rollout_restart("deploy/web", o) end, "pod annotation kubectl.kubernetes.io/restartedAt " },
      { "rollout_undo", function() return k8s.rollout_undo("deploy/web", o) end, nil },
      { "patch", function() return k8s.patch("deploy/web", { metadata = { labels = { dry = "yes" } } }, o) end, "label dry added = yes" },
      { "create", function() return k8s.create { apiVersion = "v1", kind = "ConfigMap", metadata = { name = "dry-cm", namespace = NS }, data = { a = "1" } } end, "data.a added" },
      { "replace", function()
        local x = k8s.get("deploy/web", o); x.spec.replicas = 4; return k8s.replace(x) end, "replicas 2 %-> 4" },
      { "apply", function() return k8s.apply { apiVersion = "v1", kind = "ConfigMap", metadata = { name = "dry-applied", namespace = NS }, data = { b = "2" } } end, "data.b added" },
      { "apply", function()
        return k8s.apply { apiVersion = "v1", kind = "Secret", metadata = { name = "dry-secret", namespace = NS }, stringData = { k = "changed" } } end, nil },
      { "delete", function() return k8s.delete("deploy/web", o) end, nil },
      { "lease", function() return k8s.lease_lock { namespace = NS, name = "dry-lock" } end, nil },
    }
    for _, w in ipairs(writes) do
      local n = #effects
      local result = w[2]()
      assert.is_not_nil(result, w[1])
      local e = effects[#effects]
      assert.is_true(#effects > n, w[1] .. " recorded no effect")
      assert.are.same({ "k8s", "simulated", true }, { e.module, e.decision, e.ok }, w[1])
      assert.is_true(e.result.dry_run, w[1])
      if w[3] then assert.matches(w[3], e.result.summary, 1, false) end
    end
    -- the would-be object is reported, a Secret without its values
    local scale_e
    for _, e in ipairs(effects) do if e.op == "scale" then scale_e = e end end
    assert.are.equal(6, scale_e.result.object.spec.replicas)
    assert.are.equal("scale deployment web to 6", scale_e.summary)
    for _, e in ipairs(effects) do
      if e.result.object and e.result.object.kind == "Secret" then assert.is_nil(e.result.object.data) end
    end
    host.set_mode("run")
    assert.are.same(before, world())
    assert.are.equal(d.metadata.resourceVersion, k8s.get("deploy/web", o).metadata.resourceVersion)
    k8s.delete("secret/dry-secret", o)
  end)

  it("refuses a proxied write and adds dryRun=All below the Lua layer", function()
    host.set_mode("dry-run")
    local c = k8s.client()
    local before = world()
    -- a raw POST made without asking for a dry run is still one
    local obj, status = c:call { method = "POST", path = "/api/v1/namespaces/" .. NS .. "/configmaps",
      body = { apiVersion = "v1", kind = "ConfigMap", metadata = { name = "raw" } } }
    assert.are.same({ 201, "raw" }, { status, obj.metadata.name })
    local err = raises(function()
      c:call { method = "POST", path = "/api/v1/namespaces/" .. APP_NS .. "/services/todo-chatbot-backend:8000/proxy/tasks", body = {} }
    end)
    assert.are.equal("dry_run", err.code)
    host.set_mode("run")
    assert.are.same(before, world())
  end)
end)

describe("k8s health summaries", function()
  -- the faults leave restarts and OOMKilled history behind: a fresh world after
  teardown(function() sb.ctl("k8s reset --world") end)

  it("summarises a healthy deployment and namespace", function()
    local h = k8s.deployment_health(APP_NS, "todo-chatbot-backend")
    assert.are.same({ true, 2, 2, 2, 2, 2 }, { h.healthy, h.desired, h.ready, h.available, h.updated, #h.pods })
    assert.are.equal("True", h.conditions.Available.status)
    local nh = k8s.namespace_health(APP_NS)
    assert.is_true(nh.healthy, table.concat(nh.problems, "; "))
    assert.are.equal(5, #nh.deployments)
    assert.is_true(#nh.nodes > 0 and nh.nodes[1].ready)
  end)

  it("reads a namespace of 200 deployments with one list per kind and page, not per deployment", function()
    assert(select(2, sb.ctl("k8s populate health-scale 200 5")))
    sb.ctl("k8s requests reset")
    local nh = k8s.namespace_health("health-scale")
    -- the stand-in's own count of what was asked
    local asked = cjson.decode((sb.ctl("k8s requests reset")))
    sb.ctl("k8s depopulate health-scale")
    assert.are.equal(200, #nh.deployments)
    assert.is_true(nh.healthy, table.concat(nh.problems, "; "))
    for _, h in ipairs(nh.deployments) do assert.are.equal(5, #h.pods, h.name) end
    assert.are.same({ 1, 2, 1 }, { asked["list deployments"], asked["list pods"], asked["list nodes"] })
    assert.is_nil(asked["get deployments"])
    assert.is_nil(asked["get pods"])
  end)

  it("names CrashLoopBackOff, OOMKilled and NotReady nodes", function()
    assert(select(2, sb.ctl("k8s crashloop todo-chatbot-notification")))
    assert(select(2, sb.ctl("k8s oom todo-chatbot-recurring-task")))
    local node = k8s.list("nodes")[1].metadata.name
    assert(select(2, sb.ctl("k8s node-notready " .. node)))
    local h = sb.wait_until(30, function()
      local x = k8s.deployment_health(APP_NS, "todo-chatbot-notification")
      for _, p in ipairs(x.pods) do if p.reason == "CrashLoopBackOff" then return x end end
    end)
    assert.is_table(h, "no CrashLoopBackOff seen")
    assert.is_false(h.healthy)
    assert.matches("CrashLoopBackOff", table.concat(h.problems, "\n"))
    local oom = sb.wait_until(30, function()
      local x = k8s.deployment_health(APP_NS, "todo-chatbot-recurring-task")
      for _, p in ipairs(x.pods) do if p.last_termination_reason == "OOMKilled" then return x end end
    end)
    assert.is_table(oom, "no OOMKilled seen")
    local nh = sb.wait_until(60, function()
      local x = k8s.namespace_health(APP_NS)
      for _, n in ipairs(x.nodes) do if n.name == node and not n.ready then return x end end
    end)
    assert.is_table(nh, "node never NotReady")
    assert.matches("node " .. node:gsub("%-", "%%-") .. " is NotReady", table.concat(nh.problems, "\n"))
  end)
end)

describe("k8s waits when the server no longer has the watch's history", function()
  it("re-list after 410 Expired and go on waiting, as client-go's informers do", function()
    k8s.create { apiVersion = "v1", kind = "ConfigMap", metadata = { name = "expire-me", namespace = APP_NS } }
    -- Reseeding the stand-in's world drops its event history (open watches get
    -- 410 Expired) and every object not in the seed, this one included.
    os.execute("(sleep 1; " .. sb.sandbox .. "/ctl k8s reset --world) >/dev/null 2>&1 &")
    local t0 = host.now()
    assert.are.same({}, k8s.wait("configmap/expire-me", "delete", { namespace = APP_NS, timeout = "20s" }))
    assert.is_true(host.now() - t0 < 15, "took " .. (host.now() - t0))
    assert.is_nil(k8s.get("configmaps", "expire-me", { namespace = APP_NS, missing_ok = true }))
  end)
end)

describe("k8s in a pod (in-cluster configuration)", function()
  local cli = require("spec.support.cli")
  after_each(function() cli.cleanup() end)

  it("uses the service account's token, CA and namespace, with no kubeconfig", function()
    local sa = cli.tmpdir()
    for _, f in ipairs { "token", "ca.crt" } do write(sa .. "/" .. f, read(kdir .. "/" .. f)) end
    write(sa .. "/namespace", APP_NS .. "\n")
    local rb = cli.runbook(([[
name = "in-pod"
description = "reads the deployments of its own namespace"
step "list" { run = function()
  local c = k8s.connect { service_account_dir = %q }
  local names = {}
  for _, d in ipairs(c:list("deployments")) do names[#names + 1] = d.metadata.name end
  log.info("namespace %%s: %%d deployments", c.namespace, #names)
end }
]]):format(sa))
    local port = read(kdir .. "/port"):match("%d+")
    local r = cli.run({ "run", rb, "--yes" }, { KUBECONFIG = "", HOME = sa, KUBERNETES_SERVICE_HOST = "127.0.0.1",
      KUBERNETES_SERVICE_PORT = port, RUNBOOK_STATE_DIR = sa .. "/state" })
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("namespace todo%-chatbot: 5 deployments", r.stdout)
    assert.is_nil(r.stdout:find(read(kdir .. "/token"):gsub("%s+$", ""), 1, true))
  end)
end)

describe("k8s last_change and rollout_status{fail_fast}", function()
  setup(function() -- a reseed above drops the spec's namespace
    if not k8s.get("namespaces", NS, { missing_ok = true }) then
      k8s.create { apiVersion = "v1", kind = "Namespace", metadata = { name = NS } }
    end
  end)

  it("finds the revision that brought the current template, past rollout restarts", function()
    local d = deployment("lc")
    k8s.create(d)
    rollout("lc")
    k8s.set_image("deploy/lc", { web = "nginx:1.27" }, { namespace = NS })
    rollout("lc")
    local c = k8s.last_change("deploy/lc", { namespace = NS })
    assert.are.same({ 2, 0, 1 }, { c.revision, c.restarts, c.previous.revision })
    k8s.rollout_restart("deploy/lc", { namespace = NS })
    rollout("lc")
    k8s.rollout_restart("deploy/lc", { namespace = NS })
    rollout("lc")
    c = k8s.last_change("deploy/lc", { namespace = NS })
    assert.are.same({ 2, 2, 1 }, { c.revision, c.restarts, c.previous.revision })
    assert.are.same({ "nginx:1.25", "busybox:1.36" }, c.previous.images)
    assert.is_true(c.age >= 0 and c.age < 60, tostring(c.age))
    -- kubectl's history agrees: revision 4 is the newest, a restart of revision 2's images
    assert.matches("\n4 ", (kubectl("rollout history deploy/lc -n " .. NS)))
  end)

  it("checks /health through every Service in front of a deployment (not Dapr's), failures as results", function()
    local sh = k8s.service_health("deploy/todo-chatbot-backend", { namespace = APP_NS })
    assert.is_true(sh.ok)
    assert.are.same({ { service = "todo-chatbot-backend", port = 8000, status = 200, ok = true,
      json = { service = "backend", status = "healthy" } } }, sh.services)
    sh = k8s.service_health("deploy/todo-chatbot-backend", { namespace = APP_NS, path = "/nope" })
    assert.is_false(sh.ok)
    assert.matches("^HTTP 404", sh.services[1].error)
    assert.are.same({ ok = true, services = {} }, k8s.service_health("deploy/lc", { namespace = NS }))
    -- every deployment of the namespace at once: each Service in front of one, checked once
    local all = k8s.services_health(APP_NS, { path = "/health" })
    local names = {}
    for _, row in ipairs(all.services) do names[#names + 1] = row.service end
    assert.are.same({ "todo-chatbot-backend", "todo-chatbot-frontend", "todo-chatbot-notification",
      "todo-chatbot-recurring-task", "todo-chatbot-websocket" }, names)
  end)

  it("gives up on a rollout whose new pods cannot pull their image, naming the pod and the reason", function()
    local t0 = host.now()
    k8s.set_image("deploy/lc", { web = "nginx:does-not-exist" }, { namespace = NS })
    local err = raises(function()
      k8s.rollout_status("deploy/lc", { namespace = NS, timeout = "60s", fail_fast = true, progress = false })
    end)
    assert.is_true(err.code == "ErrImagePull" or err.code == "ImagePullBackOff", err.code)
    assert.matches("will not finish rolling out: pod lc%-%w+%-%w+ container web", err.message)
    assert.is_true(host.now() - t0 < 15, "took " .. (host.now() - t0))
    -- without fail_fast the same wait runs to its timeout
    err = raises(function() k8s.rollout_status("deploy/lc", { namespace = NS, timeout = "3s", progress = false }) end)
    assert.are.equal("timeout", err.code)
    k8s.delete("deploy/lc", { namespace = NS })
  end)
end)
