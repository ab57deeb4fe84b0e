-- Conformance of the sandbox's Kubernetes API stand-in, judged by the real
-- client: kubectl 1.32 with a fresh discovery cache, checking what it prints
-- and how it exits. Faults come from `examples/sandbox/ctl k8s ...`.
package.path = "spec/sandbox/?.lua;" .. package.path
local sb = require("sandbox_helper")
local cjson = require("cjson")

local NS = "todo-chatbot"
local q = sb.quote

-- Runs a shell command; returns its output (stdout and stderr) and exit code.
local function run(cmd)
    local p = assert(io.popen("(" .. cmd .. ") 2>&1; echo \"__rc=$?\""))
    local out = p:read("a")
    p:close()
    return (out:gsub("__rc=%d+%s*$", "")), tonumber(out:match("__rc=(%d+)%s*$"))
end

-- kubectl 1.32 itself when the Cloud SDK's dispatcher sits on PATH, else kubectl.
local KUBECTL = (function()
    local real = run("readlink -f \"$(command -v kubectl)\""):gsub("%s+$", "")
    local pinned = real:gsub("[^/]*$", "") .. "kubectl.1.32"
    return select(2, run("test -x " .. q(pinned))) == 0 and pinned or "kubectl"
end)()
local cache = run("mktemp -d"):gsub("%s+$", "")

-- The command line of a kubectl call against the sandbox.
local function kubectl_cmd(args)
    return KUBECTL .. " --cache-dir=" .. cache .. " --kubeconfig=" .. q(sb.env("KUBECONFIG"))
        .. " -n " .. NS .. " " .. args
end

local function kubectl(args)
    return run(kubectl_cmd(args))
end

-- kubectl that must succeed; returns its output.
local function k(args)
    local out, rc = kubectl(args)
    assert(rc == 0, "kubectl " .. args .. " exited " .. tostring(rc) .. ":\n" .. out)
    return out
end

local function json(args)
    return cjson.decode(k(args .. " -o json"))
end

local function ctl(args)
    local out, rc = run(sb.sandbox .. "/ctl k8s " .. args)
    assert(rc == 0, "ctl k8s " .. args .. " exited " .. tostring(rc) .. ":\n" .. out)
    return out
end

-- The cluster-wide resourceVersion: any write anywhere changes it.
local function cluster_rv()
    return cjson.decode(k("get --raw /api/v1/namespaces")).metadata.resourceVersion
end

local function now()
    return tonumber((run("date +%s.%N")))
end

-- Polls fn (at 0.1 s) until it returns a truthy value or `seconds` pass.
local function eventually(seconds, fn)
    local deadline = now() + seconds
    repeat
        local v = fn()
        if v then return v end
        sb.sleep(0.1)
    until now() > deadline
    return fn()
end

-- Waits until nothing changes for several controller ticks: every rollout and fault has settled.
local function settle()
    local last, since = cluster_rv(), now()
    eventually(30, function()
        local rv = cluster_rv()
        if rv ~= last then last, since = rv, now() end
        return now() - since >= 0.7
    end)
end

local function rollout_status(deploy)
    local out = k("rollout status deploy/" .. deploy .. " --timeout=30s")
    assert.matches('deployment "' .. deploy:gsub("%-", "%%-") .. '" successfully rolled out', out)
    return out
end

local function app_image(deploy)
    return json("get deploy " .. deploy).spec.template.spec.containers[1].image
end

-- An app's pods, without those already Terminating.
local function pods_of(app)
    local out = {}
    for _, p in ipairs(json("get pods -l app.kubernetes.io/component=" .. app).items) do
        if not p.metadata.deletionTimestamp then out[#out + 1] = p end
    end
    return out
end

local function replica_file(app)
    local f = io.open(sb.state .. "/replicas/" .. app)
    local n = f and tonumber(f:read("l"))
    if f then f:close() end
    return n
end

local function manifest(text)
    local path = os.tmpname()
    local f = assert(io.open(path, "w"))
    f:write(text)
    f:close()
    return path
end

local DEMO = [[
apiVersion: v1
kind: ConfigMap
metadata:
  name: demo-config
data:
  greeting: hello
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: demo
spec:
  replicas: 2
  selector:
    matchLabels: {app: demo}
  template:
    metadata:
      labels: {app: demo}
    spec:
      containers:
      - name: web
        image: nginx:1.27
        ports:
        - containerPort: 80
]]

describe("k8s stand-in with kubectl", function()
    setup(function()
        ctl("reset --world")
    end)

    teardown(function()
        run(sb.sandbox .. "/ctl k8s reset --world")
        run("rm -rf " .. q(cache))
    end)

    describe("reads", function()
        it("reports version 1.32", function()
            local v = cjson.decode(k("version -o json"))
            assert.equal("1", v.serverVersion.major)
            assert.equal("32", v.serverVersion.minor)
        end)

        -- kind, header kubectl prints, a row it must show
        local kinds = {
            {"namespaces", "NAME%s+STATUS%s+AGE\n", "\ntodo%-chatbot%s+Active%s"},
            {"nodes", "NAME%s+STATUS%s+ROLES%s+AGE%s+VERSION\n", "\npool%-todo%-chatbot%-r7k2x%s+Ready%s"},
            {"pods", "NAME%s+READY%s+STATUS%s+RESTARTS%s+AGE\n",
             "\ntodo%-chatbot%-backend%-%w+%-%w+%s+2/2%s+Running%s+0%s"},
            {"deployments", "NAME%s+READY%s+UP%-TO%-DATE%s+AVAILABLE%s+AGE\n",
             "\ntodo%-chatbot%-backend%s+2/2%s+2%s+2%s"},
            {"replicasets", "NAME%s+DESIRED%s+CURRENT%s+READY%s+AGE\n",
             "\ntodo%-chatbot%-backend%-%w+%s+2%s+2%s+2%s"},
            {"services", "NAME%s+TYPE%s+CLUSTER%-IP%s+EXTERNAL%-IP%s+PORT%(S%)%s+AGE\n",
             "\ntodo%-chatbot%-backend%s+ClusterIP%s+[%d.]+%s+<none>%s+8000/TCP%s"},
            {"endpoints", "NAME%s+ENDPOINTS%s+AGE\n", "\ntodo%-chatbot%-backend%s+[%d.]+:8000,[%d.]+:8000%s"},
            {"events", "LAST SEEN%s+TYPE%s+REASON%s+OBJECT%s+MESSAGE\n", "%sScalingReplicaSet%s+deployment/todo%-chatbot%-backend%s"},
            {"configmaps", "NAME%s+DATA%s+AGE\n", "\ntodo%-chatbot%-config%s+6%s"},
            {"secrets", "NAME%s+TYPE%s+DATA%s+AGE\n", "\ntodo%-chatbot%-secrets%s+Opaque%s+6%s"},
            {"serviceaccounts", "NAME%s+SECRETS%s+AGE\n", "\ntodo%-chatbot%-backend%s+0%s"},
            {"leases", "NAME%s+HOLDER%s+AGE\n", "\nrecurring%-task%-scheduler%s"},
            {"hpa", "NAME%s+REFERENCE%s+TARGETS%s+MINPODS%s+MAXPODS%s+REPLICAS%s+AGE\n",
             "\nrecurring%-task%-service%-hpa%s+Deployment/todo%-chatbot%-recurring%-task%s+cpu: 23%%/70%%%s+1%s+4%s+1%s"},
            {"ingresses", "NAME%s+CLASS%s+HOSTS%s+ADDRESS%s+PORTS%s+AGE\n", "\ntodo%-chatbot%s+nginx%s+todo%.example%.com%s"},
            {"networkpolicies", "NAME%s+POD%-SELECTOR%s+AGE\n", "\nallow%-same%-namespace%s"},
            {"components.dapr.io", "NAME%s+AGE\n", "\nkafka%-pubsub%s"},
            {"subscriptions.dapr.io", "NAME%s+AGE\n", "\ntask%-events%-subscription%s"},
        }
        for _, c in ipairs(kinds) do
            it("gets " .. c[1] .. " as a table", function()
                local out = k("get " .. c[1])
                assert.matches("^" .. c[2], out)
                assert.matches(c[3], out)
            end)
        end

        it("prints the wide columns of pods", function()
            assert.matches("^NAME%s+READY%s+STATUS%s+RESTARTS%s+AGE%s+IP%s+NODE%s+NOMINATED NODE%s+READINESS GATES\n",
                k("get pods -o wide"))
        end)

        it("gets objects and lists as JSON", function()
            local d = json("get deploy todo-chatbot-backend")
            assert.equal("Deployment", d.kind)
            assert.equal("apps/v1", d.apiVersion)
            assert.equal(2, d.status.readyReplicas)
            assert.equal(d.metadata.generation, d.status.observedGeneration)
            local list = json("get pods")
            assert.equal("List", list.kind)
            assert.equal(8, #list.items)
            assert.equal("Pod", list.items[1].kind)
            assert.equal(2, #list.items[1].status.containerStatuses)
        end)

        it("gets an object as YAML", function()
            local out = k("get cm todo-chatbot-config -o yaml")
            assert.matches("\nkind: ConfigMap\n", out)
            assert.matches("\n  LOG_LEVEL: INFO\n", out)
            assert.matches("\n  resourceVersion: \"%d+\"\n", out)
        end)

        it("answers a missing object with NotFound", function()
            local out, rc = kubectl("get deploy nope")
            assert.equal(1, rc)
            assert.matches('Error from server %(NotFound%): deployments.apps "nope" not found', out)
        end)

        it("selects by label and field", function()
            local out = k("get pods -l app.kubernetes.io/component=backend -o name")
            assert.equal(2, select(2, out:gsub("pod/todo%-chatbot%-backend%-", "")))
            out = k("get deploy --field-selector metadata.name=todo-chatbot-frontend -o name")
            assert.equal("deployment.apps/todo-chatbot-frontend\n", out)
        end)

        it("pages a list with limit and continue", function()
            local all = k("get pods -A --no-headers")
            local paged = k("get pods -A --no-headers --chunk-size=3")
            assert.equal(13, select(2, all:gsub("\n", "")))
            assert.equal(all:gsub("%s+%S+%s*\n", "\n"), (paged:gsub("%s+%S+%s*\n", "\n")))
            local page = cjson.decode(k("get --raw '/api/v1/namespaces/" .. NS .. "/pods?limit=3'"))
            assert.equal(3, #page.items)
            assert.equal(5, page.metadata.remainingItemCount)
            assert.truthy(page.metadata.continue)
        end)

        it("describes a deployment", function()
            local out = k("describe deploy todo-chatbot-backend")
            assert.matches("Replicas:%s+2 desired | 2 updated | 2 total | 2 available | 0 unavailable", out)
            assert.matches("StrategyType:%s+RollingUpdate", out)
            assert.matches("Image:%s+registry.digitalocean.com/todo%-chatbot/backend:v1.4.0", out)
            assert.matches("Readiness:%s+http%-get http://:8000/health delay=0s timeout=1s period=10s #success=1 #failure=3", out)
            assert.matches("Progressing%s+True%s+NewReplicaSetAvailable", out)
            assert.matches("NewReplicaSet:%s+todo%-chatbot%-backend%-%w+ %(2/2 replicas created%)", out)
            assert.matches("ScalingReplicaSet", out)
        end)

        it("shows the last lines of a container's log", function()
            local out = k("logs deploy/todo-chatbot-backend -c backend --tail=3")
            local lines = {}
            for line in out:gmatch("[^\n]+") do
                if line:match("^{") then lines[#lines + 1] = cjson.decode(line) end
            end
            assert.equal(3, #lines)
            assert.equal("backend", lines[3].service)
            out = k("logs deploy/todo-chatbot-backend -c daprd --tail=2")
            assert.equal(2, select(2, out:gsub("level=%a+ msg=", "")))
        end)

        it("logs the default container of a pod with two", function()
            local pod = pods_of("backend")[1].metadata.name
            local out = k("logs " .. pod .. " --tail=1")   -- kubectl.kubernetes.io/default-container
            assert.matches('"service": "backend"', out)
        end)

        it("sorts events by lastTimestamp", function()
            assert.matches("^LAST SEEN%s+TYPE", k("get events --sort-by=.lastTimestamp"))
            local out = k("get events --sort-by=.lastTimestamp --no-headers -o custom-columns=T:.lastTimestamp")
            local prev, n = "", 0
            for t in out:gmatch("[^\n]+") do
                assert.matches("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%dZ$", t)
                assert.is_true(t >= prev, t .. " after " .. prev)
                prev, n = t, n + 1
            end
            assert.is_true(n > 20, out)
        end)

        it("shows pod and node metrics with top", function()
            local out = k("top pods")
            assert.matches("^NAME%s+CPU%(cores%)%s+MEMORY%(bytes%)", out)
            assert.matches("\ntodo%-chatbot%-backend%-%w+%-%w+%s+%d+m%s+%d+Mi", out)
            assert.matches("\npool%-todo%-chatbot%-r7k2x%s+%d+m%s+%d+%%", k("top nodes"))
        end)

        it("proxies to an app's health endpoint through services and pods", function()
            local out = k("get --raw /api/v1/namespaces/" .. NS .. "/services/todo-chatbot-backend:8000/proxy/health")
            assert.equal("healthy", cjson.decode(out).status)
            local pod = pods_of("websocket")[1].metadata.name
            out = k("get --raw /api/v1/namespaces/" .. NS .. "/pods/" .. pod .. ":8001/proxy/health")
            assert.equal("websocket", cjson.decode(out).service)
        end)

        it("lists every kind in discovery with its short names, groups and subresources", function()
            local out = k("api-resources")
            for _, row in ipairs {
                "\ndeployments%s+deploy%s+apps/v1%s+true%s+Deployment\n",
                "\nhorizontalpodautoscalers%s+hpa%s+autoscaling/v2%s+true%s+HorizontalPodAutoscaler\n",
                "\nleases%s+coordination.k8s.io/v1%s+true%s+Lease\n",
                "\ncustomresourcedefinitions%s+crd,crds%s+apiextensions.k8s.io/v1%s+false%s+CustomResourceDefinition\n",
                "\ncomponents%s+dapr.io/v1alpha1%s+true%s+Component\n",
                "\nsubscriptions%s+dapr.io/v2alpha1%s+true%s+Subscription\n",
                "\npods%s+metrics.k8s.io/v1beta1%s+true%s+PodMetrics\n",
                "\nnetworkpolicies%s+netpol%s+networking.k8s.io/v1%s+true%s+NetworkPolicy\n",
            } do
                assert.matches(row, out)
            end
            local apps = cjson.decode(k("get --raw /apis/apps/v1"))
            local scale
            for _, r in ipairs(apps.resources) do
                if r.name == "deployments/scale" then scale = r end
            end
            assert.same({"autoscaling", "v1", "Scale"}, {scale.group, scale.version, scale.kind})
            assert.same({"get", "patch", "update"}, scale.verbs)
        end)

        it("serves the Dapr CRDs, read-only", function()
            local out = k("get crd")
            assert.matches("^NAME%s+CREATED AT\n", out)
            assert.matches("\ncomponents%.dapr%.io%s+%d%d%d%d%-%d%d%-%d%dT", out)
            assert.matches("\nsubscriptions%.dapr%.io%s+", out)
            local crd = json("get crd subscriptions.dapr.io")
            assert.same({"dapr.io", "Namespaced", "Subscription"}, {crd.spec.group, crd.spec.scope, crd.spec.names.kind})
            assert.same({"v2alpha1"}, crd.status.storedVersions)
            local out2, rc = kubectl("delete crd components.dapr.io")
            assert.equal(1, rc)
            assert.matches("Error from server %(MethodNotAllowed%)", out2)
            k("get crd components.dapr.io")
        end)

        it("runs the Dapr control plane in dapr-system: deployments, the placement StatefulSet, pods and logs", function()
            local out = k("get deploy,sts,pods -n dapr-system")
            for _, name in ipairs { "dapr%-operator", "dapr%-sentry", "dapr%-sidecar%-injector" } do
                assert.matches("\ndeployment%.apps/" .. name .. "%s+1/1%s+1%s+1%s", out)
                assert.matches("\npod/" .. name .. "%-%w+%-%w+%s+1/1%s+Running%s+0%s", out)
            end
            assert.matches("\nstatefulset%.apps/dapr%-placement%-server%s+1/1%s", out)
            assert.matches("\npod/dapr%-placement%-server%-0%s+1/1%s+Running%s", out)
            assert.matches('level=info msg="[^"]+" instance=dapr%-operator%-[%w-]+ scope=dapr%.operator',
                k("logs -n dapr-system -l app=dapr-operator --tail=-1"))
            k("rollout restart sts/dapr-placement-server -n dapr-system")
            assert.matches("roll out complete", k("rollout status sts/dapr-placement-server -n dapr-system --timeout=30s"))
            assert.matches("\ndapr%-placement%-server%-0%s+1/1%s+Running%s+0%s+%d+s\n",
                k("get pods -n dapr-system -l app=dapr-placement-server"))
        end)

        it("reads the scale and status subresources", function()
            local out = k("get deploy todo-chatbot-backend --subresource=scale")
            assert.matches("^NAME%s+DESIRED%s+AVAILABLE\ntodo%-chatbot%-backend%s+2%s+2\n$", out)
            local scale = json("get deploy todo-chatbot-backend --subresource=scale")
            assert.same({"Scale", "autoscaling/v1", 2, "app.kubernetes.io/component=backend,"
                .. "app.kubernetes.io/instance=todo-chatbot,app.kubernetes.io/name=todo-chatbot"},
                {scale.kind, scale.apiVersion, scale.spec.replicas, scale.status.selector})
            local st = json("get deploy todo-chatbot-backend --subresource=status")
            assert.equal(2, st.status.availableReplicas)
        end)

        it("shows an HPA's target, bounds and conditions", function()
            local out = k("describe hpa recurring-task-service-hpa")
            assert.matches("Reference:%s+Deployment/todo%-chatbot%-recurring%-task\n", out)
            assert.matches("resource cpu on pods%s+%(as a percentage of request%):%s+23%% %(23m%) / 70%%", out)
            assert.matches("Min replicas:%s+1\nMax replicas:%s+4\n", out)
            assert.matches("AbleToScale%s+True%s+ReadyForNewScale", out)
        end)

        it("limits logs to the last sinceSeconds", function()
            local pod = pods_of("backend")[1].metadata.name
            local count = function(args)
                return select(2, k("logs " .. pod .. " -c backend " .. args):gsub("\n", ""))
            end
            local recent, hour = count("--since=20s"), count("--since=1h")
            assert.is_true(recent < hour, recent .. " lines in 20 s, " .. hour .. " in an hour")
            local cutoff = os.date("!%Y-%m-%dT%H:%M:%S", os.time() - 21)
            for stamp in k("logs " .. pod .. " -c backend --since=20s --timestamps"):gmatch("(%S+) [^\n]*\n") do
                assert.is_true(stamp >= cutoff, stamp .. " before " .. cutoff)
            end
        end)

        it("declares the Dapr components and subscriptions the Dapr stand-in's sidecars run", function()
            local sidecar = {}
            for app in ("backend websocket recurring-task notification"):gmatch("%S+") do
                local status, body = sb.dapr("GET", "/v1.0/metadata", nil, nil, app)
                assert.equal(200, status)
                sidecar[app] = cjson.decode(body)
            end
            local declared = {}
            for _, c in ipairs(json("get components.dapr.io").items) do declared[c.spec.type] = c.metadata.name end
            for _, c in ipairs(sidecar.backend.components) do
                if c.type == "pubsub.kafka" or c.type == "state.redis" then
                    assert.equal(c.name, declared[c.type], c.type)
                end
            end
            assert.equal("kafka-pubsub", declared["pubsub.kafka"])
            local subs = {}
            for _, s in ipairs(json("get subscriptions.dapr.io").items) do
                for _, app in ipairs(s.scopes) do
                    subs[app] = subs[app] or {}
                    table.insert(subs[app], {s.spec.pubsubname, s.spec.topic, s.spec.routes.default, s.spec.deadLetterTopic})
                end
            end
            for app, md in pairs(sidecar) do
                local want = {}
                for _, s in ipairs(md.subscriptions) do
                    want[#want + 1] = {s.pubsubname, s.topic, s.rules[1].path, s.deadLetterTopic}
                end
                assert.same(want, subs[app] or {}, app)
            end
        end)

        it("holds the sandbox's real passwords in todo-chatbot-secrets", function()
            local s = json("get secret todo-chatbot-secrets")
            local decode = function(v) return (run("printf %s " .. q(v) .. " | base64 -d")) end
            assert.equal(sb.env("DATABASE_URL"), decode(s.data.DATABASE_URL))
            assert.equal(sb.env("REDIS_URL"), decode(s.data.REDIS_URL))
        end)
    end)

    describe("exec over WebSocket", function()
        local function backend_pod()
            return json("get pods -l app.kubernetes.io/component=backend").items[1].metadata.name
        end

        it("runs a command in the pod with separate streams and its exit code", function()
            local pod = backend_pod()
            local out = run(kubectl_cmd("exec " .. pod .. " -c backend -- sh -c 'echo out; echo err >&2; exit 3'")
                .. " 2>/dev/null")
            assert.equal("out\n", out)
            local err, rc = run(kubectl_cmd("exec " .. pod .. " -c backend -- sh -c 'echo out; echo err >&2; exit 3'")
                .. " >/dev/null")
            assert.equal(3, rc)
            assert.matches("^err\ncommand terminated with exit code 3", err)
        end)

        it("passes stdin with exec -i, and the pod has its own /var/log and the container's env", function()
            local pod = backend_pod()
            local out, rc = run("printf 'hello\\n' | " .. kubectl_cmd("exec -i " .. pod
                .. " -c backend -- sh -c 'wc -c; ls /var/log; echo \"$APP_NAME $DATABASE_URL\"'"))
            assert.equal(0, rc, out)
            assert.matches("^6\nbackend%.log\n", out)
            assert.matches("backend " .. sb.env("DATABASE_URL"):gsub("%p", "%%%0"), out)
        end)

        it("copies a file into the pod and back out with kubectl cp", function()
            local pod = backend_pod()
            local dir = run("mktemp -d"):gsub("%s+$", "")
            k("exec " .. pod .. " -c backend -- rm -f /tmp/kubectl-cp")
            run("head -c 200000 /dev/urandom >" .. dir .. "/blob")
            k("cp " .. dir .. "/blob " .. pod .. ":/tmp/kubectl-cp -c backend")
            local sum = run("sha256sum <" .. dir .. "/blob"):match("^%x+")
            assert.equal(sum, k("exec " .. pod .. " -c backend -- sha256sum /tmp/kubectl-cp"):match("^%x+"))
            k("cp " .. pod .. ":/tmp/kubectl-cp " .. dir .. "/back -c backend")
            assert.equal(sum, run("sha256sum <" .. dir .. "/back"):match("^%x+"))
            run("rm -rf " .. q(dir))
        end)

        it("refuses a container the pod does not have, and the viewer", function()
            local pod = backend_pod()
            local out, rc = kubectl("exec " .. pod .. " -c nope -- true")
            assert.equal(1, rc)
            assert.matches("container nope is not valid for pod " .. pod:gsub("%-", "%%-"), out)
            out, rc = kubectl("--context=sandbox-viewer exec " .. pod .. " -c backend -- true")
            assert.equal(1, rc)
            assert.matches('cannot create resource "pods/exec"', out)
        end)
    end)

    describe("authentication", function()
        it("accepts the bearer token of the default context", function()
            assert.matches("Username%s+sandbox%-admin", k("auth whoami"))
        end)

        it("accepts a token from the exec credential plugin", function()
            assert.matches("Username%s+sandbox%-exec%-user", k("--context=sandbox-exec auth whoami"))
            assert.matches("yes", k("--context=sandbox-exec auth can-i create deployments"))
            assert.matches("todo%-chatbot%-backend", k("--context=sandbox-exec get deploy"))
        end)

        it("refuses a request without credentials with a 401 Status", function()
            -- kubectl itself will not send one (it prompts for a password), so curl does.
            local ca = sb.state .. "/k8s/ca.crt"
            local server = run("grep -o 'https://[^ ]*' " .. q(sb.env("KUBECONFIG"))):gsub("%s+$", "")
            local out = run("curl -s -m 10 --cacert " .. q(ca) .. " -w '\n%{http_code}' " .. q(server .. "/api/v1/namespaces"))
            local body, code = out:match("^(.*)\n(%d+)$")
            assert.equal("401", code)
            local st = cjson.decode(body)
            assert.same({"Status", "Failure", "Unauthorized", 401}, {st.kind, st.status, st.reason, st.code})
        end)

        it("refuses a wrong token", function()
            local out, rc = kubectl("--context=sandbox-anonymous get pods")
            assert.equal(1, rc)
            assert.matches("error: You must be logged in to the server %(Unauthorized%)", out)
        end)

        it("lets the viewer context read and refuses its writes with 403, as RBAC words it", function()
            local out, rc = kubectl("--context=sandbox-viewer get deploy todo-chatbot-backend -n todo-chatbot")
            assert.equal(0, rc, out)
            out, rc = kubectl("--context=sandbox-viewer scale deploy/todo-chatbot-backend --replicas=3 -n todo-chatbot")
            assert.equal(1, rc)
            assert.matches('Error from server %(Forbidden%): deployments.apps "todo%-chatbot%-backend" is forbidden: '
                .. 'User "sandbox%-viewer" cannot patch resource "deployments/scale" in API group "apps" '
                .. 'in the namespace "todo%-chatbot"', out)
            out = kubectl("--context=sandbox-viewer create namespace viewer-made")
            assert.matches('namespaces is forbidden: User "sandbox%-viewer" cannot create resource "namespaces" '
                .. 'in API group ""', out)
        end)
    end)

    describe("writes", function()
        it("scales a deployment and writes its ready replicas for the Kafka consumers", function()
            assert.equal(1, replica_file("recurring-task"))
            assert.matches("deployment.apps/todo%-chatbot%-recurring%-task scaled",
                k("scale deploy/todo-chatbot-recurring-task --replicas=3"))
            rollout_status("todo-chatbot-recurring-task")
            assert.equal(3, #pods_of("recurring-task"))
            assert.truthy(eventually(3, function() return replica_file("recurring-task") == 3 end))
            k("scale deploy/todo-chatbot-recurring-task --replicas=1")
            assert.truthy(eventually(5, function() return replica_file("recurring-task") == 1 end))
        end)

        it("scales with a precondition through the scale subresource", function()
            local out, rc = kubectl("scale deploy/todo-chatbot-notification --current-replicas=5 --replicas=2")
            assert.equal(1, rc)
            assert.matches("Expected replicas to be 5, was 1", out)
            k("scale deploy/todo-chatbot-notification --current-replicas=1 --replicas=2")
            assert.equal(2, json("get deploy todo-chatbot-notification").spec.replicas)
            k("scale deploy/todo-chatbot-notification --replicas=1")
        end)

        it("restarts a rollout that rollout status follows to the end", function()
            local before = json("get deploy todo-chatbot-backend")
            assert.matches("deployment.apps/todo%-chatbot%-backend restarted",
                k("rollout restart deploy/todo-chatbot-backend"))
            local out = rollout_status("todo-chatbot-backend")
            assert.matches("Waiting for deployment", out)
            local d = json("get deploy todo-chatbot-backend")
            assert.equal(before.metadata.generation + 1, d.metadata.generation)
            assert.equal(d.metadata.generation, d.status.observedGeneration)
            assert.equal("4", d.metadata.annotations["deployment.kubernetes.io/revision"])
            assert.truthy(d.spec.template.metadata.annotations["kubectl.kubernetes.io/restartedAt"])
            for _, p in ipairs(pods_of("backend")) do
                assert.equal(d.spec.template.metadata.annotations["kubectl.kubernetes.io/restartedAt"],
                    p.metadata.annotations["kubectl.kubernetes.io/restartedAt"])
            end
            -- the events of a rollout, from the deployment controller down to the kubelet
            local pod = pods_of("backend")[1].metadata.name
            local reasons = {}
            for _, e in ipairs(json("get events --field-selector involvedObject.name=" .. pod).items) do
                reasons[e.reason] = e.message
            end
            assert.matches("^Successfully assigned todo%-chatbot/" .. pod:gsub("%-", "%%-") .. " to pool%-todo%-chatbot%-", reasons.Scheduled)
            for _, r in ipairs {"Pulled", "Created", "Started"} do assert.truthy(reasons[r], r) end
            local killing, scaling = false, 0
            for _, e in ipairs(json("get events").items) do
                killing = killing or (e.reason == "Killing" and e.involvedObject.name:match("^todo%-chatbot%-backend%-") ~= nil)
                if e.reason == "ScalingReplicaSet" and e.involvedObject.name == "todo-chatbot-backend" then scaling = scaling + 1 end
            end
            assert.is_true(killing)
            assert.is_true(scaling >= 4, scaling .. " ScalingReplicaSet events")
        end)

        it("lists the rollout history", function()
            local out = k("rollout history deploy/todo-chatbot-backend")
            assert.matches("REVISION%s+CHANGE%-CAUSE", out)
            assert.matches("\n1%s+helm upgrade todo%-chatbot %-%-set backend.image.tag=v1.3.0", out)
            assert.matches("\n4%s+<none>", out)
        end)

        it("undoes to a revision and restores its template", function()
            assert.matches("rolled back", k("rollout undo deploy/todo-chatbot-backend --to-revision=1"))
            rollout_status("todo-chatbot-backend")
            assert.equal("registry.digitalocean.com/todo-chatbot/backend:v1.3.0", app_image("todo-chatbot-backend"))
            for _, p in ipairs(pods_of("backend")) do
                assert.equal("registry.digitalocean.com/todo-chatbot/backend:v1.3.0", p.spec.containers[1].image)
            end
            local out = k("rollout history deploy/todo-chatbot-backend")
            assert.is_nil(out:match("\n1%s"))
            assert.matches("\n5%s", out)
            assert.matches("backend:v1.3.0", k("rollout history deploy/todo-chatbot-backend --revision=5"))
        end)

        it("sets an image", function()
            local image = "registry.digitalocean.com/todo-chatbot/notification:v1.5.0"
            assert.matches("image updated", k("set image deploy/todo-chatbot-notification notification=" .. image))
            rollout_status("todo-chatbot-notification")
            assert.equal(image, pods_of("notification")[1].spec.containers[1].image)
        end)

        it("patches with a strategic merge patch, merging containers by name", function()
            k([[patch deploy todo-chatbot-notification -p '{"spec":{"template":{"spec":{"containers":[{"name":"notification","env":[{"name":"FEATURE_X","value":"on"}]}]}}}}']])
            local c = json("get deploy todo-chatbot-notification").spec.template.spec.containers
            assert.equal(2, #c)
            local env = {}
            for _, e in ipairs(c[1].env) do env[e.name] = e.value end
            assert.same({DAPR_HTTP_PORT = "3500", APP_NAME = "notification", FEATURE_X = "on"}, env)
            rollout_status("todo-chatbot-notification")
        end)

        it("patches with a JSON merge patch", function()
            k([[patch cm todo-chatbot-config --type=merge -p '{"data":{"LOG_LEVEL":"DEBUG","PUBSUB_NAME":null}}']])
            local data = json("get cm todo-chatbot-config").data
            assert.equal("DEBUG", data.LOG_LEVEL)
            assert.is_nil(data.PUBSUB_NAME)
        end)

        it("patches with a JSON patch and refuses a failing test op", function()
            k([[patch cm todo-chatbot-config --type=json -p '[{"op":"replace","path":"/data/LOG_LEVEL","value":"WARN"},{"op":"add","path":"/data/NEW_KEY","value":"1"}]']])
            local data = json("get cm todo-chatbot-config").data
            assert.equal("WARN", data.LOG_LEVEL)
            assert.equal("1", data.NEW_KEY)
            local out, rc = kubectl([[patch cm todo-chatbot-config --type=json -p '[{"op":"test","path":"/data/LOG_LEVEL","value":"INFO"}]']])
            assert.equal(1, rc)
            assert.matches("The request is invalid: .*json patch test operation failed", out)
        end)

        it("applies a manifest: created, unchanged, configured", function()
            local path = manifest(DEMO)
            local out = k("apply -f " .. path)
            assert.matches("configmap/demo%-config created", out)
            assert.matches("deployment.apps/demo created", out)
            rollout_status("demo")
            out = k("apply -f " .. path)
            assert.matches("configmap/demo%-config unchanged", out)
            assert.matches("deployment.apps/demo unchanged", out)
            local changed = manifest((DEMO:gsub("greeting: hello", "greeting: hi"):gsub("nginx:1%.27", "nginx:1.28")))
            out = k("apply -f " .. changed)
            assert.matches("configmap/demo%-config configured", out)
            assert.matches("deployment.apps/demo configured", out)
            rollout_status("demo")
            assert.equal("hi", json("get cm demo-config").data.greeting)
            assert.equal("nginx:1.28", app_image("demo"))
            os.remove(path)
            os.remove(changed)
        end)

        it("applies server-side, with conflicts between field managers", function()
            local cm = function(value)
                return manifest("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: ssa-config\ndata:\n  mode: " .. value .. "\n")
            end
            local first, second, other = cm("one"), cm("two"), cm("other")
            assert.matches("configmap/ssa%-config serverside%-applied", k("apply --server-side -f " .. first))
            assert.matches("configmap/ssa%-config serverside%-applied", k("apply --server-side -f " .. second))
            local obj = json("get cm ssa-config --show-managed-fields")
            assert.equal("two", obj.data.mode)
            assert.same({"kubectl", "Apply"}, {obj.metadata.managedFields[1].manager, obj.metadata.managedFields[1].operation})
            local out, rc = kubectl("apply --server-side --field-manager=other -f " .. other)
            assert.equal(1, rc)
            assert.matches('Apply failed with 1 conflict: conflict with "kubectl" using v1: .data.mode', out)
            assert.equal("two", json("get cm ssa-config").data.mode)
            k("apply --server-side --field-manager=other --force-conflicts -f " .. other)
            assert.equal("other", json("get cm ssa-config").data.mode)
            -- the client-side-applied demo moves to server-side apply when its values agree
            assert.matches("deployment.apps/demo serverside%-applied",
                k("apply --server-side -f " .. manifest((DEMO:gsub("greeting: hello", "greeting: hi"):gsub("nginx:1%.27", "nginx:1.28")))))
            k("delete cm ssa-config")
            for _, f in ipairs({first, second, other}) do os.remove(f) end
        end)

        it("validates fields on the server as kubectl's default --validate=strict asks", function()
            local typo = manifest("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: typo-config\ndata:\n  a: \"1\"\ndatta:\n  b: \"2\"\n")
            local out, rc = kubectl("apply -f " .. typo)
            assert.equal(1, rc)
            assert.matches('Error from server %(BadRequest%): error when creating ".-": ConfigMap in version "v1" cannot be '
                .. 'handled as a ConfigMap: strict decoding error: unknown field "datta"', out)
            assert.equal(1, select(2, kubectl("get cm typo-config")))
            out = k("apply --validate=warn -f " .. typo)
            assert.matches('Warning: unknown field "datta"', out)
            assert.matches("configmap/typo%-config created", out)
            local cm = json("get cm typo-config")
            assert.same({a = "1"}, cm.data)
            assert.is_nil(cm.datta)   -- dropped, as the apiserver drops what it does not know
            out, rc = kubectl("apply --server-side -f " .. typo)
            assert.equal(1, rc)
            assert.matches("Error from server: failed to create typed patch object %(todo%-chatbot/typo%-config; /v1, "
                .. "Kind=ConfigMap%): %.datta: field not declared in schema", out)
            k("delete cm typo-config")
            -- a typo deep in a pod template, and a patch (kubectl patch sends no fieldValidation: Warn)
            local deep = manifest((DEMO:gsub("name: demo", "name: typo"):gsub("        image: nginx:1.27\n",
                "        image: nginx:1.27\n        imagePullPolicyy: Always\n")))
            out, rc = kubectl("apply -f " .. deep)
            assert.equal(1, rc)
            assert.matches('unknown field "spec.template.spec.containers%[0%].imagePullPolicyy"', out)
            out = k([[patch deploy todo-chatbot-backend --type=merge -p '{"spec":{"replicaz":3}}']])
            assert.matches('Warning: unknown field "spec.replicaz"', out)
            assert.matches("patched %(no change%)", out)
            for _, f in ipairs {typo, deep} do os.remove(f) end
        end)

        it("creates an object once and refuses the second create", function()
            local path = manifest("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: created-twice\ndata:\n  a: \"1\"\n")
            assert.matches("configmap/created%-twice created", k("create -f " .. path))
            local out, rc = kubectl("create -f " .. path)
            assert.equal(1, rc)
            assert.matches('Error from server %(AlreadyExists%).*configmaps "created%-twice" already exists', out)
            os.remove(path)
        end)

        it("deletes a deployment with its ReplicaSets and pods", function()
            assert.matches('deployment.apps "demo" deleted', k("delete deploy demo"))
            local out, rc = kubectl("get deploy demo")
            assert.equal(1, rc)
            assert.matches("NotFound", out)
            assert.truthy(eventually(5, function()
                return #json("get rs,pods -l app=demo").items == 0
            end))
            assert.matches('configmap "created%-twice" deleted', k("delete cm created-twice"))
        end)

        it("keeps a lease as client-go's leader election does: the stale writer gets 409", function()
            local micro = function(ago) return os.date("!%Y-%m-%dT%H:%M:%S.000000Z", os.time() - ago) end
            local lease = function(holder, rv, transitions)
                return manifest(cjson.encode {apiVersion = "coordination.k8s.io/v1", kind = "Lease",
                    metadata = {name = "runbook-leader", namespace = NS, resourceVersion = rv},
                    spec = {holderIdentity = holder, leaseDurationSeconds = 15, acquireTime = micro(0),
                            renewTime = micro(0), leaseTransitions = transitions}})
            end
            local path = lease("runner-a", nil, 0)
            assert.matches("lease.coordination.k8s.io/runbook%-leader created", k("create -f " .. path))
            local l = json("get lease runbook-leader")
            assert.matches("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d%d%d%d%d%dZ$", l.spec.renewTime)
            assert.matches("\nrunbook%-leader%s+runner%-a%s", k("get leases"))
            -- runner-b takes over with the resourceVersion it read; runner-c read the same one and loses
            local b, c = lease("runner-b", l.metadata.resourceVersion, 1), lease("runner-c", l.metadata.resourceVersion, 1)
            k("replace -f " .. b)
            local out, rc = kubectl("replace -f " .. c)
            assert.equal(1, rc)
            assert.matches('Error from server %(Conflict%).*Operation cannot be fulfilled on leases.coordination.k8s.io "runbook%-leader"', out)
            l = json("get lease runbook-leader")
            assert.same({"runner-b", 1}, {l.spec.holderIdentity, l.spec.leaseTransitions})
            k("delete lease runbook-leader")
            for _, f in ipairs {path, b, c} do os.remove(f) end
        end)

        it("orphans the ReplicaSets and pods of a deployment deleted with --cascade=orphan", function()
            k("create deployment orphans --image=nginx:1.27 --replicas=1")
            rollout_status("orphans")
            assert.matches('deployment.apps "orphans" deleted', k("delete deploy orphans --cascade=orphan"))
            sb.sleep(0.5)   -- a controller that had not let go would now remove or replace them
            local rs = json("get rs -l app=orphans").items
            assert.equal(1, #rs)
            assert.same({}, rs[1].metadata.ownerReferences or {})
            local pods = json("get pods -l app=orphans").items
            assert.equal(1, #pods)
            assert.equal(rs[1].metadata.uid, pods[1].metadata.ownerReferences[1].uid)
            k("delete rs -l app=orphans")
            assert.truthy(eventually(5, function() return #json("get pods -l app=orphans").items == 0 end))
        end)

        it("gets 409 when an update carries a stale resourceVersion", function()
            local path = os.tmpname()
            k("get cm todo-chatbot-config -o json > " .. path)
            k([[patch cm todo-chatbot-config --type=merge -p '{"data":{"STALE":"no"}}']])
            local out, rc = kubectl("replace -f " .. path)
            assert.equal(1, rc)
            assert.matches('Error from server %(Conflict%).*Operation cannot be fulfilled on configmaps "todo%-chatbot%-config": the object has been modified', out)
            os.remove(path)
        end)
    end)

    describe("dry run and rest", function()
        it("keeps every resourceVersion at rest", function()
            settle()
            local before = cluster_rv()
            local deploys = k("get deploy -A -o jsonpath='{.items[*].metadata.resourceVersion}'")
            sb.sleep(1)
            assert.equal(before, cluster_rv())
            assert.equal(deploys, k("get deploy -A -o jsonpath='{.items[*].metadata.resourceVersion}'"))
        end)

        it("leaves no trace of --dry-run=server writes", function()
            settle()
            local before, state = cluster_rv(), k("get all,cm,secrets -o json")
            local path = manifest((DEMO:gsub("name: demo", "name: dry")))
            local current = manifest((k("get cm todo-chatbot-config -o json"):gsub('"INFO"', '"DRY"')))
            local cmds = {
                "create -f " .. path,
                "apply -f " .. path,
                "apply --server-side -f " .. path,
                "replace -f " .. current,
                "label cm todo-chatbot-config dry=run",
                "annotate deploy todo-chatbot-backend dry=run",
                "scale deploy/todo-chatbot-backend --replicas=5",
                "set image deploy/todo-chatbot-backend backend=nginx:dry",
                "rollout undo deploy/todo-chatbot-backend",
                [[patch cm todo-chatbot-config --type=merge -p '{"data":{"LOG_LEVEL":"DRY"}}']],
                "delete cm todo-chatbot-config",
                "delete deploy todo-chatbot-frontend",
            }
            for _, c in ipairs(cmds) do
                local out, rc = kubectl(c .. " --dry-run=server")
                assert.equal(0, rc, c .. ": " .. out)
                -- kubectl patch does not mark its message as a dry run; the others do
                assert.matches(c:match("^patch") and " patched\n" or "%(server dry run%)", out, c)
            end
            assert.equal(before, cluster_rv())
            assert.equal(state, k("get all,cm,secrets -o json"))
            os.remove(path)
            os.remove(current)
        end)
    end)

    describe("watch", function()
        it("delivers MODIFIED events while a rollout progresses", function()
            settle()
            local file = os.tmpname()
            local watch = kubectl_cmd("get deploy todo-chatbot-frontend --watch-only --output-watch-events -o"
                .. " custom-columns=EVENT:.type,UPDATED:.object.status.updatedReplicas,AVAILABLE:.object.status.availableReplicas")
            local log = os.tmpname()
            local pid = run("timeout 20 " .. watch .. " -v=6 > " .. file .. " 2> " .. log .. " & echo $!"):match("%d+")
            assert.truthy(eventually(10, function()   -- the watch request has its 200
                local f = io.open(log)
                local text = f and f:read("a") or ""
                if f then f:close() end
                return text:match("watch=true[^\n]* 200 OK")
            end))
            os.remove(log)
            k("rollout restart deploy/todo-chatbot-frontend")
            rollout_status("todo-chatbot-frontend")
            sb.sleep(0.3)
            run("kill " .. pid)
            local out = io.open(file):read("a")
            os.remove(file)
            local modified = select(2, out:gsub("\nMODIFIED%s", ""))
            assert.is_true(modified >= 4, out)
            assert.matches("\nMODIFIED%s+1%s", out)
            assert.matches("\nMODIFIED%s+2%s+2", out)
        end)

        it("replays the changes after a resourceVersion, then bookmarks before the timeout", function()
            local rv = cjson.decode(k("get --raw /api/v1/namespaces/" .. NS .. "/configmaps")).metadata.resourceVersion
            k([[patch cm todo-chatbot-config --type=merge -p '{"data":{"WATCHED":"yes"}}']])
            local t0 = now()
            local out = k("get --raw '/api/v1/namespaces/" .. NS .. "/configmaps?watch=1&allowWatchBookmarks=true"
                .. "&timeoutSeconds=3&resourceVersion=" .. rv .. "'")
            assert.is_true(now() - t0 >= 2.5, "the watch ended early")
            local events = {}
            for line in out:gmatch("[^\n]+") do events[#events + 1] = cjson.decode(line) end
            assert.equal(2, #events, out)
            assert.same({"MODIFIED", "ConfigMap", "todo-chatbot-config", "yes"},
                {events[1].type, events[1].object.kind, events[1].object.metadata.name, events[1].object.data.WATCHED})
            assert.same({"BOOKMARK", "ConfigMap"}, {events[2].type, events[2].object.kind})
            assert.equal(events[1].object.metadata.resourceVersion + 0 <= events[2].object.metadata.resourceVersion + 0, true)
            -- without allowWatchBookmarks there is none
            out = k("get --raw '/api/v1/namespaces/" .. NS .. "/configmaps?watch=1&timeoutSeconds=3&resourceVersion="
                .. events[2].object.metadata.resourceVersion .. "'")
            assert.equal("", out)
        end)

        it("answers a watch from a compacted resourceVersion with 410 Expired", function()
            local out = k("get --raw '/api/v1/namespaces/" .. NS .. "/pods?watch=1&resourceVersion=1&timeoutSeconds=1'")
            local ev = cjson.decode(out:match("[^\n]+"))
            assert.equal("ERROR", ev.type)
            assert.equal(410, ev.object.code)
            assert.equal("Expired", ev.object.reason)
        end)
    end)

    describe("list paging", function()
        local PNS = "paging"
        local function raw(path)
            return cjson.decode(k("get --raw " .. q(path)))
        end
        local function names(list)
            local out = {}
            for _, it in ipairs(list.items) do out[#out + 1] = it.metadata.name end
            return out
        end

        setup(function()
            ctl("populate " .. PNS .. " 120")
        end)

        teardown(function()
            run(sb.sandbox .. "/ctl k8s depopulate " .. PNS)
        end)

        it("kubectl get --chunk-size pages with limit and continue and shows every object", function()
            local out = k("get deploy -n " .. PNS .. " --chunk-size=50 -v=6")
            local rows, pages = 0, 0
            for line in out:gmatch("[^\n]+") do
                if line:match("^load%-%d+%s+5/5%s+5%s+5%s") then rows = rows + 1 end
                if line:match("GET https://%S+/deployments%?limit=50") then pages = pages + 1 end
                if line:match("GET https://%S+/deployments%?continue=%S+&limit=50") then pages = pages + 1 end
            end
            assert.equal(120, rows, out:sub(1, 2000))
            assert.equal(3, pages, out:sub(1, 2000))
        end)

        it("kubectl get -o json over 600 pods pages by 100 and returns them all, in name order", function()
            local list = json("get pods -n " .. PNS .. " --chunk-size=100")
            local got = names(list)
            assert.equal(600, #got)
            local sorted = { table.unpack(got) }
            table.sort(sorted)
            assert.same(sorted, got)
        end)

        it("serves every page at the first page's resourceVersion, whatever was written since", function()
            local base = "/apis/apps/v1/namespaces/" .. PNS .. "/deployments"
            local first = raw(base .. "?limit=40")
            assert.equal(40, #first.items)
            assert.equal(80, first.metadata.remainingItemCount)
            k("delete deploy load-00100 -n " .. PNS .. " --wait=false")
            k("create deploy load-00050a -n " .. PNS .. " --image=nginx:1.27")
            local seen, cont = names(first), first.metadata.continue
            while cont do
                local page = raw(base .. "?limit=40&continue=" .. cont)
                assert.equal(first.metadata.resourceVersion, page.metadata.resourceVersion)
                for _, n in ipairs(names(page)) do seen[#seen + 1] = n end
                cont = page.metadata.continue
            end
            assert.equal(120, #seen)
            assert.equal("load-00100", seen[101])
            -- a new list sees both writes
            local now_names = names(json("get deploy -n " .. PNS))
            assert.equal(120, #now_names)
            assert.equal("load-00050a", now_names[52])
        end)

        it("answers resourceVersion and resourceVersionMatch as the apiserver does", function()
            local base = "/api/v1/namespaces/" .. PNS .. "/pods"
            local all = raw(base .. "?limit=7&resourceVersion=0")  -- the watch cache ignores limit
            assert.is_nil(all.metadata.continue)
            assert.is_true(#all.items >= 595)
            local rv = tonumber(all.metadata.resourceVersion)
            k("delete pod " .. all.items[1].metadata.name .. " -n " .. PNS .. " --grace-period=0 --force")
            local exact = raw(base .. "?resourceVersion=" .. rv .. "&resourceVersionMatch=Exact&limit=1")
            assert.equal(all.items[1].metadata.name, exact.items[1].metadata.name)
            assert.equal(tostring(rv), exact.metadata.resourceVersion)
            local out, rc = kubectl("get --raw " .. q(base .. "?resourceVersion=" .. (rv + 100000)))
            assert.is_true(rc ~= 0)
            assert.matches("Too large resource version", out)
            out, rc = kubectl("get --raw " .. q(base .. "?limit=1&resourceVersion=1&continue=" .. all.metadata.resourceVersion))
            assert.is_true(rc ~= 0)
            assert.matches("specifying resource version is not allowed when using continue", out)
        end)

        it("answers a continue from a compacted revision with 410 Expired and a token to go on inconsistently", function()
            local base = "/api/v1/namespaces/" .. NS .. "/configmaps"
            local first = raw(base .. "?limit=1")
            assert.is_string(first.metadata.continue)
            ctl("reset --world")   -- drops the event history, as compaction does
            local out, rc = kubectl("get --raw " .. q(base .. "?limit=1&continue=" .. first.metadata.continue))
            assert.is_true(rc ~= 0)
            assert.matches("Expired", out)
            assert.matches("too old to display a consistent list result", out)
            local server = run("grep -o 'https://[^ ]*' " .. q(sb.env("KUBECONFIG"))):gsub("%s+$", "")
            local token = run("cat " .. q(sb.state .. "/k8s/token")):gsub("%s+$", "")
            local body = run("curl -s -m 10 --cacert " .. q(sb.state .. "/k8s/ca.crt") .. " -H " .. q("Authorization: Bearer "
                .. token) .. " " .. q(server .. base .. "?limit=1&continue=" .. first.metadata.continue))
            local st = cjson.decode(body)
            assert.same({ 410, "Expired" }, { st.code, st.reason })
            local rest = raw(base .. "?limit=100&continue=" .. st.metadata.continue)
            assert.is_true(#rest.items >= 1)
            assert.is_true(rest.items[1].metadata.name > first.items[1].metadata.name)
        end)
    end)

    describe("faults", function()
        setup(function()
            ctl("reset --world")
        end)

        after_each(function()
            ctl("reset")
        end)

        it("crashloop makes pods CrashLoopBackOff with rising restarts; rollout undo heals", function()
            settle()
            ctl("crashloop backend")
            local restarts = function()
                local out = k("get pods -l app.kubernetes.io/component=backend --no-headers")
                return tonumber(out:match("CrashLoopBackOff%s+(%d+)")), out
            end
            local first = eventually(5, restarts)
            assert.truthy(first, select(2, restarts()))
            assert.truthy(eventually(8, function()
                local n = restarts()
                return n and n > first
            end), select(2, restarts()))
            assert.matches("BackOff%s+pod/todo%-chatbot%-backend", k("get events"))
            local pod = pods_of("backend")[1].metadata.name
            assert.matches("startup failed.*ConnectionRefusedError", k("logs " .. pod .. " -c backend --previous"))
            k("rollout undo deploy/todo-chatbot-backend")
            rollout_status("todo-chatbot-backend")
            local out = k("get deploy todo-chatbot-backend --no-headers")
            assert.matches("^todo%-chatbot%-backend%s+2/2%s+2%s+2%s", out)
            assert.truthy(eventually(5, function()
                local pods = k("get pods -l app.kubernetes.io/component=backend --no-headers")
                return select(2, pods:gsub("2/2%s+Running%s+0%s", "")) == 2 and not pods:match("Terminating")
            end))
        end)

        it("crashloop heals when the template gets another image", function()
            ctl("crashloop websocket")
            assert.truthy(eventually(5, function()
                return k("get pods -l app.kubernetes.io/component=websocket"):match("CrashLoopBackOff")
            end))
            k("set image deploy/todo-chatbot-websocket websocket=registry.digitalocean.com/todo-chatbot/websocket:v1.4.1")
            rollout_status("todo-chatbot-websocket")
            assert.truthy(eventually(5, function()
                local pods = k("get pods -l app.kubernetes.io/component=websocket --no-headers")
                return select(2, pods:gsub("2/2%s+Running%s+0%s", "")) == 2 and not pods:match("Terminating")
            end))
        end)

        it("issues a cert-manager Certificate's Secret, re-issues it when Issuing is set, and cert-expiring shortens it", function()
            k("apply -f " .. manifest([[
apiVersion: cert-manager.io/v1
kind: Certificate
metadata: {name: spec-cert}
spec:
  secretName: spec-cert-tls
  dnsNames: [spec.todo.example.com]
  duration: 2160h
  issuerRef: {name: letsencrypt, kind: ClusterIssuer}
]]))
            local enddate = function()
                return run(kubectl_cmd("get secret spec-cert-tls -o jsonpath='{.data.tls\\.crt}'")
                    .. " | base64 -d | openssl x509 -noout -enddate -ext subjectAltName")
            end
            assert.truthy(eventually(10, function() return k("get certificate spec-cert"):match("\nspec%-cert%s+True%s+spec%-cert%-tls%s") end))
            assert.matches("DNS:spec%.todo%.example%.com", enddate())
            ctl("cert-expiring spec-cert 3")
            local short = enddate()
            assert.matches("Reason:%s+Failed", k("describe certificate spec-cert"))
            k([[patch certificate spec-cert --subresource=status --type=merge -p '{"status":{"conditions":[{"type":"Issuing","status":"True","reason":"ManuallyTriggered","message":"Certificate re-issuance manually triggered"}]}}']])
            assert.truthy(eventually(10, function() return json("get certificate spec-cert").status.revision == 3 end))
            assert.are_not.equal(short, enddate())
            k("delete certificate spec-cert")
            k("delete secret spec-cert-tls")
        end)

        it("dapr-stuck injector: new Dapr-enabled pods lack daprd and the injector logs why; its restart heals", function()
            ctl("dapr-stuck injector")
            k("delete pod -l app.kubernetes.io/component=notification --wait=false")
            assert.truthy(eventually(10, function()
                local pods = pods_of("notification")
                return #pods == 1 and #pods[1].spec.containers == 1
            end))
            assert.matches("level=error msg=\"Sidecar injector failed to inject",
                k("logs -n dapr-system deploy/dapr-sidecar-injector --tail=20"))
            k("rollout restart deploy/dapr-sidecar-injector -n dapr-system")
            k("rollout status deploy/dapr-sidecar-injector -n dapr-system --timeout=30s")
            k("delete pod -l app.kubernetes.io/component=notification")
            assert.truthy(eventually(10, function()
                return k("get pods -l app.kubernetes.io/component=notification --no-headers"):match("^%S+%s+2/2%s+Running")
            end))
        end)

        it("bad-image makes new pods ImagePullBackOff until reset", function()
            local image = app_image("todo-chatbot-frontend")
            ctl("bad-image frontend")
            assert.truthy(eventually(5, function()
                return k("get pods -l app.kubernetes.io/component=frontend"):match("ImagePullBackOff")
            end))
            assert.matches("Failed to pull image", k("get events"))
            -- the rollout is stuck but the old pods keep serving
            assert.matches("^todo%-chatbot%-frontend%s+2/2%s", k("get deploy todo-chatbot-frontend --no-headers"))
            ctl("reset")
            assert.equal(image, app_image("todo-chatbot-frontend"))
            rollout_status("todo-chatbot-frontend")
        end)

        it("node-notready turns a node NotReady and its pods unready", function()
            local node = "pool-todo-chatbot-r7k2x"
            ctl("node-notready " .. node)
            assert.truthy(eventually(3, function()
                return k("get node " .. node .. " --no-headers"):match("^%S+%s+NotReady%s")
            end))
            local pods = json("get pods --field-selector spec.nodeName=" .. node).items
            assert.is_true(#pods > 0)
            assert.truthy(eventually(3, function()
                for _, p in ipairs(json("get pods --field-selector spec.nodeName=" .. node).items) do
                    for _, c in ipairs(p.status.conditions) do
                        if c.type == "Ready" and c.status ~= "False" then return false end
                    end
                end
                return true
            end))
            ctl("reset")
            assert.truthy(eventually(3, function()
                return k("get node " .. node .. " --no-headers"):match("^%S+%s+Ready%s")
            end))
        end)

        it("oom leaves OOMKilled as the last state", function()
            ctl("oom notification")
            local cs = eventually(5, function()
                local s = pods_of("notification")[1].status.containerStatuses[1]
                return s.lastState.terminated and s
            end)
            assert.truthy(cs)
            assert.equal("OOMKilled", cs.lastState.terminated.reason)
            assert.equal(137, cs.lastState.terminated.exitCode)
            assert.is_true(cs.restartCount >= 1)
            assert.matches("OOMKilled", k("describe pod -l app.kubernetes.io/component=notification"))
        end)

        it("api-errors fails requests with the real Status", function()
            k("get cm")   -- discovery cached before the fault
            ctl("api-errors 100%")
            local out, rc = kubectl("get cm")
            assert.equal(1, rc)
            assert.matches("Error from server %(InternalError%)", out)
            ctl("api-errors 0")
            k("get cm")
        end)

        it("api-errors with 429 and 503 say when to retry", function()
            local ca = sb.state .. "/k8s/ca.crt"
            local server = run("grep -o 'https://[^ ]*' " .. q(sb.env("KUBECONFIG"))):gsub("%s+$", "")
            local token = run("cat " .. q(sb.state .. "/k8s/token")):gsub("%s+$", "")
            for code, reason in pairs {[429] = "TooManyRequests", [503] = "ServiceUnavailable", [504] = "Timeout"} do
                ctl("api-errors 100% " .. code)
                local out = run("curl -s -m 10 -i --cacert " .. q(ca) .. " -H " .. q("Authorization: Bearer " .. token)
                    .. " " .. q(server .. "/api/v1/namespaces/" .. NS .. "/configmaps"))
                assert.matches("^HTTP/%S+ " .. code, out)
                assert.equal(code ~= 504, out:lower():match("\nretry%-after: 1\r\n") ~= nil, out)
                local st = cjson.decode(out:match("\r\n\r\n(.*)$"))
                assert.same({"Status", reason, code}, {st.kind, st.reason, st.code})
            end
            ctl("api-errors 0")
        end)

        it("api-latency delays every request", function()
            ctl("api-latency 500ms")
            local t0 = now()
            k("get --raw /api/v1/namespaces/" .. NS .. "/configmaps")
            assert.is_true(now() - t0 >= 0.5)
        end)

        it("reset clears every fault", function()
            -- Far above kubectl's own time on a loaded machine.
            ctl("api-latency 20s")
            ctl("crashloop websocket")
            ctl("reset")
            local status = cjson.decode(ctl("status"))
            assert.same({}, status.crashloop)
            assert.equal(0, status.api_latency)
            local t0 = now()
            k("get --raw /api/v1/namespaces/" .. NS .. "/configmaps")
            assert.is_true(now() - t0 < 20)
        end)
    end)
end)
