-- Issue 20, class 2: raw clients and pass-through options. Each row is a
-- runbook step run with `runbook run FILE --dry-run` against the sandbox
-- (spec/adversarial/support.lua); the backend is looked at before and after
-- with its own client (kubectl, curl against a local HTTP server, redis-cli
-- for Dapr's state, the file system for what a librdkafka property could
-- make, the sandbox's WebSocket app's count of messages) and must be the same. A row may be refused with an error or skipped
-- as a write; either way the world is as it was.
--
-- Adding a variant: a row {name, body = <Lua run inside the step>,
-- check = <a key of backends>}. ${NAME} in the body is replaced by the value
-- of NAME in `vars` (set up below).
local cli = require("spec.support.cli")
local adv = require("spec.adversarial.support")

local NS = "adversarial-net"

local function q(s) return cli.quote(s) end

-- A shell command's output and whether it exited 0.
local function sh(cmd)
  local p = assert(io.popen("(" .. cmd .. ") 2>&1; echo \"__rc=$?\""))
  local out = p:read("a")
  p:close()
  return (out:gsub("__rc=%d+%s*$", "")), out:match("__rc=(%d+)%s*$") == "0"
end

local function must(cmd)
  local out, ok = sh(cmd)
  assert(ok, cmd .. ":\n" .. out)
  return out
end

local function kubectl(args)
  return must("kubectl --kubeconfig=" .. q(os.getenv("KUBECONFIG")) .. " -n " .. NS .. " " .. args)
end

local function redis(args)
  return must("redis-cli --no-auth-warning -u " .. q(os.getenv("REDIS_URL")) .. " " .. args)
end

local vars = { NS = NS }
local fixture_pid, tmp

-- What a backend looks like, as a row's snapshot (compared before and
-- after the run), and how to put it back where an attack on an older binary
-- changed it.
local backends = {}

local OVERRIDES = { ["x-http-method-override"] = true, ["x-http-method"] = true, ["x-method-override"] = true }

-- Every request the local HTTP server has seen that was not a plain GET or
-- HEAD: a write, or a read asking for another method.
backends.http = { reset = function() end, snapshot = function()
  local writes = {}
  for _, r in ipairs(require("cjson").decode(must("curl -s -m 5 " .. q(vars.HTTP .. "/requests")))) do
    local override
    for h, v in pairs(r.headers or {}) do
      if OVERRIDES[h] then override = h .. ": " .. v end
    end
    if (r.method ~= "GET" and r.method ~= "HEAD") or override then
      writes[#writes + 1] = r.method .. " " .. r.path .. (override and (" with " .. override) or "")
    end
  end
  return writes
end }

-- The ConfigMap `attack` in the namespace (absent).
backends.configmap = {
  reset = function() kubectl("delete configmap attack --ignore-not-found") end,
  snapshot = function() return kubectl("get configmap attack --ignore-not-found -o name") end,
}

-- Deployment web and its replicas (1).
backends.replicas = {
  reset = function()
    if kubectl("get deployment web --ignore-not-found -o name") == "" then
      kubectl("create deployment web --image=nginx --replicas=1")
    end
    kubectl("scale deployment web --replicas=1")
  end,
  snapshot = function() return sh("kubectl --kubeconfig=" .. q(os.getenv("KUBECONFIG")) .. " -n " .. NS
    .. " get deployment web -o jsonpath={.spec.replicas}") end,
}

-- The files in /tmp of deployment web's pod (none), which an exec would make
-- (the stand-in runs commands for real, in a directory of the pod's own).
backends.pod_tmp = {
  reset = function()
    backends.replicas.reset()
    kubectl("rollout status deployment web --timeout=60s")
    kubectl("exec deploy/web -- sh -c 'rm -f /tmp/*'")
  end,
  snapshot = function() return kubectl("exec deploy/web -- ls /tmp") end,
}

-- Dapr's state in Redis: key adversarial-net-new (absent) and adversarial-net-keep ("kept").
backends.dapr_state = {
  reset = function()
    redis("DEL 'backend||adversarial-net-new'")
    must("curl -s -f -m 10 -H 'Content-Type: application/json' --data-binary "
      .. q('[{"key":"adversarial-net-keep","value":"kept"}]') .. " " .. q(os.getenv("DAPR_HTTP_ENDPOINT") .. "/v1.0/state/statestore"))
  end,
  snapshot = function()
    return redis("EXISTS 'backend||adversarial-net-new'") .. redis("HGET 'backend||adversarial-net-keep' data")
  end,
}

-- The file ${MARK}, which a program run or a library loaded by librdkafka would create.
backends.mark = {
  reset = function() os.remove(vars.MARK) end,
  snapshot = function()
    local f = io.open(vars.MARK)
    if f then f:close() end
    return f and "a librdkafka property made " .. vars.MARK or "no " .. vars.MARK
  end,
}

-- The messages the sandbox's WebSocket endpoint (${WS}) has received, by its /stats.
backends.ws_messages = { reset = function() end, snapshot = function()
  local stats = must("curl -s -f -m 5 " .. q(vars.WS:gsub("^ws:", "http:"):gsub("/ws$", "/stats")))
  return require("cjson").decode(stats).messages_received
end }

local CM = [[{apiVersion = "v1", kind = "ConfigMap", metadata = {name = "attack"}, data = {x = "1"}}]]
local CM_PATH = "/api/v1/namespaces/${NS}/configmaps"

local rows = {
  -- The Dapr client's raw call with read = true.
  { "dapr call: a POST save marked read", check = "dapr_state", body = [[
    require("dapr").connect():call("x", "", { method = "POST", path = "/v1.0/state/statestore", read = true,
      json = { { key = "adversarial-net-new", value = "pwned" } } })]] },
  { "dapr call: a DELETE marked read", check = "dapr_state", body = [[
    require("dapr").connect():call("x", "", { method = "DELETE", read = true,
      path = "/v1.0/state/statestore/adversarial-net-keep" })]] },
  { "dapr call: a transaction marked read, method in lower case", check = "dapr_state", body = [[
    require("dapr").connect():call("x", "", { method = "post", read = true, path = "/v1.0/state/statestore/transaction",
      json = { operations = { { operation = "delete", request = { key = "adversarial-net-keep" } } } } })]] },
  { "dapr call: a save marked read, path as segments", check = "dapr_state", body = [[
    require("dapr").connect():call("x", "", { method = "POST", path = { "v1.0", "state", "statestore" }, read = true,
      json = { { key = "adversarial-net-new", value = "pwned" } } })]] },
  { "http module: a POST marked read", check = "http", body = [[
    require("runbook.http").request { method = "POST", url = "${HTTP}/capture/read", read = true, body = "x" }]] },

  -- A '#' or '?dryRun=All' inside a k8s request path.
  { "k8s call: a POST whose path ends in #", check = "configmap", body = [[
    require("k8s").client():call { method = "POST", path = "]] .. CM_PATH .. [[#", body = ]] .. CM .. [[ }]] },
  { "k8s call: a POST whose path ends in #dryRun=All", check = "configmap", body = [[
    require("k8s").client():call { method = "POST", path = "]] .. CM_PATH .. [[#dryRun=All", body = ]] .. CM .. [[ }]] },
  { "k8s call: a POST whose path carries ?x=dryRun=All", check = "configmap", body = [[
    require("k8s").client():call { method = "POST", path = "]] .. CM_PATH .. [[?x=dryRun=All", body = ]] .. CM .. [[ }]] },
  { "k8s call: a POST whose path has a .. segment and a #", check = "configmap", body = [[
    require("k8s").client():call { method = "POST", path = "]] .. CM_PATH .. [[/x/..#", body = ]] .. CM .. [[ }]] },
  { "k8s call: a POST whose query names dryRun itself", check = "configmap", body = [[
    require("k8s").client():call { method = "POST", path = "]] .. CM_PATH .. [[", query = { dryRun = "None" },
      body = ]] .. CM .. [[ }]] },
  { "k8s call: a POST whose path escapes # as %23", check = "configmap", body = [[
    require("k8s").client():call { method = "POST", path = "]] .. CM_PATH .. [[%23", body = ]] .. CM .. [[ }]] },
  { "k8s call: a POST whose path escapes ? as %3F", check = "configmap", body = [[
    require("k8s").client():call { method = "POST", path = "]] .. CM_PATH .. [[%3FdryRun=None", body = ]] .. CM .. [[ }]] },
  { "k8s call: an absolute URL as the path", check = "configmap", body = [[
    local c = require("k8s").client()
    c:call { method = "POST", path = c.server .. "]] .. CM_PATH .. [[#", body = ]] .. CM .. [[ }]] },
  { "k8s call: a DELETE whose path ends in #", check = "replicas", body = [[
    require("k8s").client():call { method = "DELETE", path = "/apis/apps/v1/namespaces/${NS}/deployments/web#" }]] },
  { "k8s call: a POST through a service's proxy spelled prox%79", check = "configmap", body = [[
    require("k8s").client():call { method = "POST", path = "/api/v1/namespaces/${NS}/services/web:80/prox%79/x",
      body = ]] .. CM .. [[ }]] },
  { "k8s call: a POST to a pod's exec", check = "configmap", body = [[
    require("k8s").client():call { method = "POST", path = "/api/v1/namespaces/${NS}/pods/web/exec",
      query = { command = "true" } }]] },
  { "k8s call: a DELETE with an escaped .. segment", check = "replicas", body = [[
    require("k8s").client():call { method = "DELETE", path = "/apis/apps/v1/namespaces/${NS}/deployments/x/%2e%2e/web" }]] },
  { "k8s.patch: subresource scale#", check = "replicas", body = [[
    require("k8s").patch("deploy/web", { spec = { replicas = 3 } }, { namespace = "${NS}", subresource = "scale#", type = "merge" })]] },
  { "k8s.patch: subresource scale?dryRun=#", check = "replicas", body = [[
    require("k8s").patch("deploy/web", { spec = { replicas = 3 } },
      { namespace = "${NS}", subresource = "scale?dryRun=#", type = "merge" })]] },
  { "k8s.patch: subresource ../web#", check = "replicas", body = [[
    require("k8s").patch("deploy/web", { spec = { replicas = 3 } },
      { namespace = "${NS}", subresource = "../web#", type = "merge" })]] },

  -- A command in a pod: k8s.exec asks the gate in C before it connects.
  { "k8s.exec: a write exec", check = "pod_tmp", body = [[
    require("k8s").exec("deploy/web", { "touch", "/tmp/pwned" }, { namespace = "${NS}" })]] },
  { "k8s.exec: the module called directly with read = false", check = "pod_tmp", body = [[
    local k8s = require("k8s")
    local c, pod = k8s.client(), k8s.list("pods", { namespace = "${NS}", selector = "app=web" })[1]
    require("runbook.k8s_exec").run { server = c.server, ca_data = c.cfg.ca_data, token = c.cred.token,
      insecure = c.cfg.insecure, namespace = "${NS}", pod = pod.metadata.name,
      container = pod.spec.containers[1].name, command = { "touch", "/tmp/pwned" }, read = false }]] },

  -- A WebSocket message: runbook.ws asks the gate in C once the handshake is
  -- done, right before the message is queued (the handshake and ping are reads).
  { "http.websocket: a message sent", check = "ws_messages", body = [[
    require("http").websocket("${WS}", { send = "pwned" })]] },
  { "http.websocket: a message sent without a ping, to a subprotocol", check = "ws_messages", body = [[
    require("http").websocket("${WS}", { send = "pwned", ping = false, protocol = "chat" })]] },
  { "runbook.ws: the module called directly with a message", check = "ws_messages", body = [[
    require("runbook.ws").probe { url = "${WS}", send = "pwned", ping = true }]] },

  -- A body on a GET or HEAD.
  { "http.get with a body", check = "http", body = [[
    require("http").get("${HTTP}/capture/get", { body = "x" })]] },
  { "http.request GET with a json body, method in lower case", check = "http", body = [[
    require("http").request { method = "get", url = "${HTTP}/capture/get", json = { x = 1 } }]] },
  { "http.request GET with an empty body", check = "http", body = [[
    require("http").request { method = "GET", url = "${HTTP}/capture/get", body = "" }]] },
  { "http.head with a body", check = "http", body = [[
    require("http").head("${HTTP}/capture/head", { body = "x" })]] },
  { "k8s call: a GET with a body", check = "configmap", body = [[
    require("k8s").client():call { method = "GET", path = "]] .. CM_PATH .. [[", body = ]] .. CM .. [[ }]] },
  { "k8s call: a HEAD with a body", check = "configmap", body = [[
    require("k8s").client():call { method = "HEAD", path = "]] .. CM_PATH .. [[", body = ]] .. CM .. [[ }]] },

  -- Methods other than GET and HEAD, and headers asking for another method.
  { "notify.webhook with method options", check = "http", body = [[
    require("notify").webhook { url = "${HTTP}/capture/hook", method = "options", json = { text = "x" }, fatal = true }]] },
  { "notify.webhook with method PROPFIND", check = "http", body = [[
    require("notify").webhook { url = "${HTTP}/capture/hook", method = "PROPFIND", json = { text = "x" }, fatal = true }]] },
  { "http.request with method OPTIONS", check = "http", body = [[
    require("http").request { method = "OPTIONS", url = "${HTTP}/capture/options" }]] },
  { "http.request with method purge", check = "http", body = [[
    require("http").request { method = "purge", url = "${HTTP}/capture/purge" }]] },
  { "http.get with X-HTTP-Method-Override: DELETE", check = "http", body = [[
    require("http").get("${HTTP}/capture/override", { headers = { ["X-HTTP-Method-Override"] = "DELETE" } })]] },
  { "http.get with x-http-method: PUT", check = "http", body = [[
    require("http").get("${HTTP}/capture/override", { headers = { ["x-http-method"] = "PUT" } })]] },
  { "http.check_all with X-Method-Override: POST", check = "http", body = [[
    require("http").check_all { urls = { "${HTTP}/capture/override" }, headers = { ["X-Method-Override"] = "POST" } }]] },
  { "http.post with a Host header naming another server", check = "http", body = [[
    require("http").post("${HTTP}/capture/host", { headers = { Host = "example.org" }, body = "x" })]] },
  { "dapr.invoke with verb options (a sidecar at the HTTP server)", check = "http", body = [[
    require("dapr").connect({ endpoint = "${HTTP}" }):invoke("backend", "orders", { verb = "options" })]] },
  { "dapr call: a POST marked read (a sidecar at the HTTP server)", check = "http", body = [[
    require("dapr").connect({ endpoint = "${HTTP}" }):call("x", "", { method = "POST", path = "/capture/dapr",
      read = true, body = "x" })]] },

  -- librdkafka properties that run programs or load code.
  { "kafka.connect with sasl.kerberos.kinit.cmd", check = "mark", body = [[
    require("kafka").connect { ["security.protocol"] = "sasl_plaintext", ["sasl.mechanisms"] = "GSSAPI",
      ["sasl.kerberos.kinit.cmd"] = "touch ${MARK}" }]] },
  { "kafka.connect with a keytab that closes the default kinit command's quotes", check = "mark", body = [[
    require("kafka").connect { ["security.protocol"] = "sasl_plaintext", ["sasl.mechanisms"] = "GSSAPI",
      ["sasl.kerberos.keytab"] = '"; touch ${MARK}; "' }]] },
  { "kafka.connect with a principal that runs a command", check = "mark", body = [[
    require("kafka").connect { ["security.protocol"] = "sasl_plaintext", ["sasl.mechanisms"] = "GSSAPI",
      ["sasl.kerberos.keytab"] = "/dev/null", ["sasl.kerberos.principal"] = "x; touch ${MARK}" }]] },
  { "kafka.connect with plugin.library.paths", check = "mark", body = [[
    require("kafka").connect { ["plugin.library.paths"] = "${EVIL_SO}" }]] },
  { "kafka.connect with ssl.engine.location", check = "mark", body = [[
    require("kafka").connect { ["security.protocol"] = "ssl", ["ssl.engine.location"] = "${EVIL_SO}" }]] },
}

setup(function()
  tmp = cli.tmpdir()
  local port, pid = cli.fixture("http_server.py")
  vars.HTTP, fixture_pid = "http://127.0.0.1:" .. port, pid
  vars.WS = os.getenv("WEBSOCKET_URL")
  vars.MARK = tmp .. "/mark"
  -- a library whose loading alone leaves the mark, as any code librdkafka loaded could
  vars.EVIL_SO = tmp .. "/evil.so"
  local f = assert(io.open(tmp .. "/evil.c", "w"))
  f:write(('#include <stdio.h>\n__attribute__((constructor)) static void mark(void) '
    .. '{ FILE *f = fopen("%s", "w"); if (f) fclose(f); }\n'):format(vars.MARK))
  f:close()
  must("cc -shared -fPIC -o " .. q(vars.EVIL_SO) .. " " .. q(tmp .. "/evil.c"))
  sh("kubectl --kubeconfig=" .. q(os.getenv("KUBECONFIG")) .. " create namespace " .. NS)
end)

teardown(function()
  if fixture_pid then os.execute("kill " .. fixture_pid) end
  sh("kubectl --kubeconfig=" .. q(os.getenv("KUBECONFIG")) .. " delete namespace " .. NS .. " --wait=false")
  redis("DEL 'backend||adversarial-net-keep' 'backend||adversarial-net-new'")
  cli.cleanup()
end)

local function clean_exit(r)
  assert.is_true(r.code == 0 or r.code == 1, "exit " .. tostring(r.code) .. ":\n" .. r.stdout .. r.stderr)
  assert.is_nil((r.stdout .. r.stderr):find("traceback", 1, true), r.stdout .. r.stderr)
end

describe("a dry run with raw clients and pass-through options changes nothing:", function()
  for _, row in ipairs(rows) do
    it(row[1], function()
      local b = backends[row.check]
      b.reset()
      adv.check { row[1], snapshot = b.snapshot, check = clean_exit,
        step = row.body:gsub("%${([%w_]+)}", function(k) return assert(vars[k], k) end) }
    end)
  end
end)
