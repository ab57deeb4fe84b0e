-- websocket-triage.lua: clients cannot connect, or lose their WebSocket.
--
-- Replaces seed 000 "WebSocket Connection Issues" (curl localhost:8001/stats in
-- the pod, kubectl top pod | grep websocket, JWT_SECRET must match
-- BETTER_AUTH_SECRET) and seed 003 "WebSocket Connection Failures" (the pods,
-- the Ingress, curl -H "Upgrade: websocket", the logs; then rollout restart,
-- the Ingress's proxy-read-timeout and proxy-send-timeout at 3600, scale up).
-- The stats come through the API server's service proxy (or stats_url), the
-- handshake from here (websocket_url, else $WEBSOCKET_URL). Each fix is asked
-- for and done only when its finding calls for it; the last step fails naming
-- what is still wrong, a secret mismatch included (no value is ever printed).
--
--   runbook run websocket-triage --step
--   runbook run websocket-triage -p websocket_url=wss://todo.example.com/ws --dry-run

name = "websocket-triage"
description = "WebSocket failures: the pods, /stats against the connection limit, CPU and memory, the auth secrets, the upgrade handshake, the logs, the Ingress timeouts; then raise the timeouts, restart, scale out, verify"
replaces = { "000-8", "003-13" }
version = "1.0.0"

param "namespace" (steps.params.namespace)
param "deployment" { default = "todo-chatbot-websocket", help = "the WebSocket deployment" }
param "stats_path" { default = "/stats", help = "the app's stats endpoint (JSON with connections), read through the API server's service proxy" }
param "stats_url" { default = "", help = "read the stats from this URL instead of through the service proxy" }
param "websocket_url" { default = "", help = "the endpoint whose upgrade handshake is tested (ws:// or wss://); default $WEBSOCKET_URL" }
param "max_connections" { type = "integer", default = 500, help = "connections one pod takes (the app's WEBSOCKET_MAX_CONNECTIONS)" }
param "connections_warn" { type = "number", default = 0.8, help = "scale out when the connections per pod reach this share of max_connections (seed 000: 400 of 500)" }
param "max_replicas" { type = "integer", default = 10, help = "never scale out beyond this many replicas" }
param "secret" { default = "todo-chatbot-secrets", help = "the Secret holding the token keys" }
param "same_keys" { type = "list", default = "JWT_SECRET,BETTER_AUTH_SECRET", help = "keys of secret that must hold the same value (tokens signed with one are checked with the other)" }
param "ingress_timeout" { type = "integer", default = 3600, help = "seconds the Ingress keeps an idle WebSocket open (nginx proxy-read-timeout and proxy-send-timeout)" }
param "log_since" (steps.params.log_since)
param "settle" { type = "duration", default = "1m", help = "how long the verification waits for the pods, the handshake and the connections to come right" }
param "timeout" { type = "duration", default = "5m", help = "how long a restart or a scale-out may take to roll out" }

local ns = function(ctx) return { namespace = ctx.params.namespace } end
local ANNOTATIONS = { "nginx.ingress.kubernetes.io/proxy-read-timeout", "nginx.ingress.kubernetes.io/proxy-send-timeout" }
local NGINX_DEFAULT = 60   -- seconds, when an Ingress says nothing

--- The handshake and a ping, from here: {ok = true, ...} or {ok = false, error, code}.
local function handshake(ctx)
  local url = ctx.params.websocket_url ~= "" and ctx.params.websocket_url or os.getenv("WEBSOCKET_URL") or ""
  if url == "" then return { checked = false } end
  local ok, r = pcall(http.websocket, url, { timeout = "10s" })
  if ok then return { checked = true, ok = true, url = url, connect = r.connect, pong = r.pong } end
  return { checked = true, ok = false, url = url, error = tostring(type(r) == "table" and r.message or r),
    code = type(r) == "table" and r.code or nil }
end

--- The app's /stats: {connections, ready, per_pod, crowded, want (replicas to be
-- under the share), services (those in front of the pods)}.
local function stats(ctx)
  local body, services = nil, {}
  local sh = k8s.service_health("deploy/" .. ctx.params.deployment, { namespace = ctx.params.namespace,
    path = ctx.params.stats_path })
  for _, row in ipairs(sh.services) do
    services[#services + 1] = row.service
    if row.ok and body == nil then body = row.json end
  end
  if ctx.params.stats_url ~= "" then
    body = http.check(ctx.params.stats_url, { timeout = "10s" }).json
  elseif #services == 0 then
    error(("no Service selects %s's pods: set stats_url"):format(ctx.params.deployment), 0)
  elseif body == nil then
    error(("%s through the service proxy: %s"):format(ctx.params.stats_path, sh.services[1].error or "no JSON"), 0)
  end
  local n = type(body) == "table" and tonumber(body.connections)
  if not n then error(ctx.params.stats_path .. " answered without a number of connections", 0) end
  local ready = k8s.deployment_health(ctx.params.namespace, ctx.params.deployment).ready
  local per_pod_max = ctx.params.max_connections * ctx.params.connections_warn
  local per_pod = n / math.max(ready, 1)
  return { connections = n, ready = ready, per_pod = per_pod, crowded = per_pod >= per_pod_max,
    want = math.floor(n / per_pod_max) + 1, services = services }
end

step "Check the pods" {
  description = "kubectl get pods: the deployment's replicas ready, with no waiting reason or recent restarts",
  run = function(ctx)
    local h = k8s.deployment_health(ctx.params.namespace, ctx.params.deployment)
    log.info("%s: %d of %d ready%s", ctx.params.deployment, h.ready, h.desired,
      #h.problems > 0 and (": " .. table.concat(h.problems, "; ")) or "")
    return { healthy = h.healthy, replicas = h.desired, problems = h.problems }
  end,
}

step "Read the connection stats" {
  description = "curl /stats of the app (through the service proxy): open connections per ready pod against max_connections",
  run = function(ctx)
    local s = stats(ctx)
    log.info("%d connections open, %.0f per ready pod (max %d, scale out from %d%%)", s.connections, s.per_pod,
      ctx.params.max_connections, math.floor(ctx.params.connections_warn * 100 + 0.5))
    if s.crowded then log.warn("the pods are near their connection limit: %d replicas would bring them under it", s.want) end
    return s
  end,
}

step "Check resource use" (steps.resource_use {
  description = "kubectl top pod | grep websocket: CPU and memory of each pod against its limits",
})

step "Compare the token secrets" {
  description = "JWT_SECRET must match BETTER_AUTH_SECRET: the same_keys of the Secret hold one value (never printed)",
  run = function(ctx)
    local data = k8s.get("secret/" .. ctx.params.secret, ns(ctx)).data or {}
    local keys, problems = ctx.params.same_keys, {}
    for _, k in ipairs(keys) do
      if data[k] == nil then problems[#problems + 1] = ("secret %s has no key %s"):format(ctx.params.secret, k) end
    end
    for i = 2, #keys do
      if data[keys[i]] ~= nil and data[keys[1]] ~= nil and data[keys[i]] ~= data[keys[1]] then
        problems[#problems + 1] = ("%s and %s differ in secret %s: tokens signed with one fail the check with the other"):format(
          keys[1], keys[i], ctx.params.secret)
      end
    end
    for _, p in ipairs(problems) do log.warn("%s", p) end
    if #problems == 0 then log.info("%s hold the same value", table.concat(keys, " and ")) end
    return { problems = problems }
  end,
}

step "Test the upgrade handshake" {
  description = "curl -H 'Upgrade: websocket' URL: the handshake completes and a ping is answered",
  run = function(ctx)
    local r = handshake(ctx)
    if not r.checked then log.warn("no websocket_url or WEBSOCKET_URL: the handshake is not tested")
    elseif r.ok then log.info("%s: handshake in %s, pong in %s", r.url, duration.format(r.connect), duration.format(r.pong))
    else log.warn("%s", r.error) end
    return r
  end,
}

step "Search the logs" {
  description = "kubectl logs | grep -i websocket: the deployment's WebSocket records of log_since, errors and warnings counted by message",
  run = function(ctx)
    return steps.log_levels(ctx, { deployment = ctx.params.deployment, since = ctx.params.log_since,
      match = "[Ww][Ee][Bb][Ss][Oo][Cc][Kk][Ee][Tt]", what = "WebSocket" })
  end,
}

step "Check the Ingress timeouts" {
  description = "kubectl describe ingress: each Ingress path to the deployment's Services, and its proxy read and send timeouts (nginx: 60s unless set)",
  needs = { "Read the connection stats" },
  run = function(ctx)
    local services = {}
    for _, name in ipairs(ctx.outputs["Read the connection stats"].services) do services[name] = true end
    local found, short = {}, {}
    for _, ing in ipairs(k8s.list("ingresses", ns(ctx))) do
      local routes = false
      for _, rule in ipairs(ing.spec.rules or {}) do
        for _, p in ipairs((rule.http or {}).paths or {}) do
          local svc = p.backend and p.backend.service
          if svc and services[svc.name] then routes = true end
        end
      end
      if routes then
        local ann, values = ing.metadata.annotations or {}, {}
        for i, a in ipairs(ANNOTATIONS) do values[i] = tonumber(ann[a]) or NGINX_DEFAULT end
        log.info("ingress %s: proxy-read-timeout %ds, proxy-send-timeout %ds", ing.metadata.name, values[1], values[2])
        found[#found + 1] = ing.metadata.name
        if values[1] < ctx.params.ingress_timeout or values[2] < ctx.params.ingress_timeout then
          short[#short + 1] = { name = ing.metadata.name, read = ann[ANNOTATIONS[1]] or false, send = ann[ANNOTATIONS[2]] or false }
        end
      end
    end
    if #found == 0 then log.info("no Ingress routes to %s's Services", ctx.params.deployment) end
    if #short > 0 then log.warn("%d Ingress(es) close idle WebSockets before %ds", #short, ctx.params.ingress_timeout) end
    return { ingresses = found, short = short }
  end,
}

step "Raise the Ingress timeouts" {
  description = "kubectl patch ingress: proxy-read-timeout and proxy-send-timeout to ingress_timeout, on each Ingress below it",
  needs = { "Check the Ingress timeouts" },
  when = function(ctx) return #ctx.outputs["Check the Ingress timeouts"].short > 0 end,
  confirm = true,
  run = function(ctx)
    local v = tostring(ctx.params.ingress_timeout)
    for _, ing in ipairs(ctx.outputs["Check the Ingress timeouts"].short) do
      k8s.patch("ingress/" .. ing.name, { metadata = { annotations = { [ANNOTATIONS[1]] = v, [ANNOTATIONS[2]] = v } } },
        { namespace = ctx.params.namespace, type = "merge" })
    end
  end,
  undo = function(ctx)
    for _, ing in ipairs(ctx.outputs["Check the Ingress timeouts"].short) do
      -- false (absent before) becomes JSON null, which removes the annotation
      k8s.patch("ingress/" .. ing.name, { metadata = { annotations = { [ANNOTATIONS[1]] = ing.read or json.null,
        [ANNOTATIONS[2]] = ing.send or json.null } } }, { namespace = ctx.params.namespace, type = "merge" })
    end
  end,
}

step "Restart the pods" {
  description = "kubectl rollout restart, when the handshake fails or the pods are unhealthy; waits for the rollout",
  needs = { "Check the pods", "Test the upgrade handshake" },
  when = function(ctx)
    local hs = ctx.outputs["Test the upgrade handshake"]
    return not ctx.outputs["Check the pods"].healthy or (hs.checked and not hs.ok)
  end,
  confirm = true,
  run = function(ctx)
    k8s.rollout_restart("deploy/" .. ctx.params.deployment, ns(ctx))
    k8s.rollout_status("deploy/" .. ctx.params.deployment, { namespace = ctx.params.namespace,
      timeout = ctx.params.timeout, fail_fast = true })
  end,
}

step "Scale out" {
  description = "kubectl scale to the replicas that bring the connections per pod under the share (at most max_replicas); waits for the new pods",
  needs = { "Read the connection stats" },
  when = function(ctx) return ctx.outputs["Read the connection stats"].crowded end,
  confirm = true,
  run = function(ctx)
    local from = k8s.get("deploy/" .. ctx.params.deployment, ns(ctx)).spec.replicas
    local want = ctx.outputs["Read the connection stats"].want
    if want <= from then
      log.info("%s has %d replicas, enough once all are ready (%d would do)", ctx.params.deployment, from, want)
      return { from = from, to = from }
    end
    local to = math.min(ctx.params.max_replicas, want)
    if to <= from then
      error(("%s needs %d replicas, but has %d and may not have more than %d (max_replicas)"):format(
        ctx.params.deployment, want, from, ctx.params.max_replicas), 0)
    end
    k8s.scale("deploy/" .. ctx.params.deployment, to, ns(ctx))
    k8s.rollout_status("deploy/" .. ctx.params.deployment, { namespace = ctx.params.namespace,
      timeout = ctx.params.timeout, fail_fast = true })
    return { from = from, to = to }
  end,
}

step "Verify" {
  description = "The pods healthy, the handshake completing and the connections per pod under the share (waiting up to settle); the token secrets equal",
  needs = { "Compare the token secrets" },
  run = function(ctx)
    local h, hs, s
    local function problems()
      local out = {}
      if not h.healthy then out[#out + 1] = "not healthy: " .. table.concat(h.problems, "; ") end
      if hs.checked and not hs.ok then out[#out + 1] = hs.error end
      if s.crowded then
        out[#out + 1] = ("%.0f connections per pod, at or above %d%% of %d"):format(s.per_pod,
          math.floor(ctx.params.connections_warn * 100 + 0.5), ctx.params.max_connections)
      end
      return out
    end
    local ok, err = pcall(time.wait_until, { timeout = ctx.params.settle, what = "the WebSocket service to recover" }, function()
      h, hs, s = k8s.deployment_health(ctx.params.namespace, ctx.params.deployment), handshake(ctx), stats(ctx)
      return #problems() == 0
    end)
    if not ok and not (type(err) == "table" and err.code == "timeout" and h) then error(err, 0) end
    log.info("%s: %d of %d ready; %d connections, %.0f per ready pod; handshake %s", ctx.params.deployment, h.ready,
      h.desired, s.connections, s.per_pod, not hs.checked and "not tested" or hs.ok and "ok" or "failing")
    local found = problems()
    for _, p in ipairs(ctx.outputs["Compare the token secrets"].problems) do
      found[#found + 1] = p .. (" (set them equal: runbook run config-update -p object=secret/%s -p key=KEY -p value=...)"):format(ctx.params.secret)
    end
    if #found > 0 and not ctx.dry_run then error(table.concat(found, "; "), 0) end
    for _, p in ipairs(found) do log.warn("now: %s", p) end
    return { problems = found }
  end,
}
