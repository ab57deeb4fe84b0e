-- The sandbox's metrics: Prometheus scrapes each pod's /metrics (found through
-- file_sd as pods come and go), traffic follows the Ingress (canary weights
-- included), `ctl metrics` faults show, and alerts reach Alertmanager. Checked
-- with curl against Prometheus, Alertmanager and the endpoints, and kubectl.
package.path = "spec/sandbox/?.lua;" .. package.path
local sb = require("sandbox_helper")
local kh = require("spec.runbooks.k8s_helper")

local function ctl(args)
    local out, ok = sb.ctl(args)
    assert(ok, out)
    return out
end

local function value(q)
    local rows = sb.promql(q)
    return rows[1] and rows[1].value
end

-- Waits until the instant query's single value satisfies `test`; returns the last value.
local function wait_value(seconds, q, test)
    local v
    sb.wait_until(seconds, function()
        v = value(q)
        return v and test(v)
    end)
    return v
end

local function pods_in_targets()
    local out = {}
    for _, r in ipairs(sb.promql('up{job="todo-chatbot"} == 1')) do out[r.labels.pod] = r.labels end
    return out
end

-- A canary of backend at `tag`, beside the stable deployment, getting `weight`% of /api
-- through an nginx canary Ingress.
local function canary(tag, weight)
    local out, ok = sb.kubectl("apply -f -", ([[
apiVersion: apps/v1
kind: Deployment
metadata: {name: todo-chatbot-backend-canary, namespace: todo-chatbot}
spec:
  replicas: 1
  selector: {matchLabels: {app.kubernetes.io/component: backend, track: canary}}
  template:
    metadata: {labels: {app.kubernetes.io/name: todo-chatbot, app.kubernetes.io/component: backend, track: canary}}
    spec:
      containers: [{name: backend, image: "registry.digitalocean.com/todo-chatbot/backend:%s"}]
---
apiVersion: v1
kind: Service
metadata: {name: todo-chatbot-backend-canary, namespace: todo-chatbot}
spec:
  selector: {app.kubernetes.io/component: backend, track: canary}
  ports: [{name: http, port: 8000, targetPort: 8000}]
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: todo-chatbot-canary
  namespace: todo-chatbot
  annotations: {nginx.ingress.kubernetes.io/canary: "true", nginx.ingress.kubernetes.io/canary-weight: "%d"}
spec:
  ingressClassName: nginx
  rules:
    - host: todo.example.com
      http:
        paths: [{path: /api, pathType: Prefix, backend: {service: {name: todo-chatbot-backend-canary, port: {number: 8000}}}}]
]]):format(tag, weight))
    assert(ok, out)
end

describe("sandbox metrics", function()
    after_each(function() ctl("metrics reset") end)

    it("lists every todo-chatbot pod as a target with its namespace, service, pod and version, as pods come and go", function()
        local _, list = sb.k8s("GET", "/api/v1/namespaces/todo-chatbot/pods")
        assert(sb.wait_until(10, function()
            local t = pods_in_targets()
            for _, p in ipairs(list.items) do if not t[p.metadata.name] then return false end end
            return true
        end), "not every pod is an up target")
        local t = pods_in_targets()
        for _, p in ipairs(list.items) do
            local l = t[p.metadata.name]
            assert.are.equal("todo-chatbot", l.namespace)
            assert.are.equal(p.metadata.labels["app.kubernetes.io/component"], l.service)
            assert.are.equal(p.spec.containers[1].image:match(":([^:]+)$"), l.version)
        end
        finally(kh.reset_world)
        kh.scale("websocket", 3)
        assert(sb.wait_until(10, function()
            local n = 0
            for _, l in pairs(pods_in_targets()) do if l.service == "websocket" then n = n + 1 end end
            return n == 3
        end), "the third websocket pod never became a target")
    end)

    it("serves each service's metrics in the exposition format", function()
        -- Read again while a pod an earlier case scaled away is still listed.
        local seen, failed
        assert(sb.wait_until(30, function()
            local f = assert(io.open(sb.state .. "/prometheus/targets/pods.json"))
            local groups = require("cjson").decode(f:read("a"))
            f:close()
            seen = {}
            for _, g in ipairs(groups) do
                local url = "http://" .. g.targets[1] .. g.labels.__metrics_path__
                local body, ok = sb.sh("curl -sf " .. sb.quote(url))
                if not ok then failed = url; return false end
                seen[g.labels.service] = body
            end
            return true
        end), "a target of pods.json did not answer: " .. tostring(failed))
        for _, svc in ipairs { "backend", "frontend", "websocket", "recurring-task", "notification" } do
            assert.matches('http_requests_total{method="GET",status="200"} %d+', seen[svc])
            assert.matches('http_request_duration_seconds_bucket{le="0.1"} %d+', seen[svc])
            assert.matches("process_resident_memory_bytes %d+", seen[svc])
        end
        assert.matches("websocket_connections %d+", seen.websocket)
        assert.matches("db_pool_connections_in_use %d+", seen.backend)
        assert.matches('reminder_deliveries_total{result="failure"} %d+', seen.notification)
        assert.truthy(value('sum(kube_pod_container_status_restarts_total{namespace="todo-chatbot"})'))
    end)

    it("publishes each group's consumer lag as kafka_exporter does, matching the lag a Kafka client reads", function()
        local total = sb.lag("recurring-task-service", "task-events")
        local v = wait_value(10, 'consumergroup:kafka_consumergroup_lag:sum{consumergroup="recurring-task-service"}',
            function(x) return math.abs(x - total) < 200 end)
        assert.is_true(math.abs(v - total) < 200, ("exporter %s, client %d"):format(tostring(v), total))
    end)

    it("splits traffic by the canary weight and raises the 5xx rate of one image version only", function()
        finally(kh.reset_world)
        canary("v1.5.0", 25)
        ctl("metrics errors backend:v1.5.0 40%")
        local share = 'sum(rate(http_requests_total{service="backend",version="v1.5.0"}[10s])) / sum(rate(http_requests_total{service="backend"}[10s]))'
        local v = wait_value(20, share, function(x) return x > 0.2 and x < 0.3 end)
        assert.is_true(v > 0.2 and v < 0.3, "canary share " .. tostring(v))
        local bad = wait_value(10, 'service_version:http_errors:ratio_rate30s{service="backend",version="v1.5.0"}',
            function(x) return x > 0.3 end)
        assert.is_true(bad > 0.3, "canary error rate " .. tostring(bad))
        assert.is_true(value('service_version:http_errors:ratio_rate30s{service="backend",version="v1.4.0"}') < 0.01)
    end)

    it("raises a deployment's latency, fails its scrapes and grows its memory", function()
        ctl("metrics latency frontend 1s")
        local p95 = wait_value(15, 'service:http_request_duration_seconds:p95_30s{service="frontend"}',
            function(x) return x > 0.5 end)
        assert.is_true(p95 > 0.5, "p95 " .. tostring(p95))
        ctl("metrics scrape-fail recurring-task")
        local up = wait_value(10, 'max(up{service="recurring-task"})', function(x) return x == 0 end)
        assert.are.equal(0, up)
        local before = value('max(process_resident_memory_bytes{service="notification"})')
        ctl("metrics memory notification 20")
        local after = wait_value(10, 'max(process_resident_memory_bytes{service="notification"})',
            function(x) return x > before + 40 * 1024 * 1024 end)
        assert.is_true(after > before + 40 * 1024 * 1024)
        local out, ok = sb.ctl("metrics errors backend 2")
        assert.is_false(ok)
        assert.matches("bad rate", out)
    end)

    it("fires HighErrorRate with the seeds' threshold and hands it to Alertmanager", function()
        ctl("metrics errors frontend 20%")
        assert(sb.wait_until(30, function()
            local out = sb.sh("curl -s " .. sb.quote(sb.env("ALERTMANAGER_URL") .. "/api/v2/alerts?filter=alertname%3DHighErrorRate"))
            return out:match('"service":"frontend"') and out:match('"severity":"critical"')
        end), "HighErrorRate never reached Alertmanager")
    end)
end)
