-- rate-limit.lua: a service throttled (429 Too Many Requests, an upstream
-- provider's rate-limit errors): how much, since when, with how many API
-- keys; more keys spread the load, the readers restarted onto them; verify.
--
-- Replaces seed 004 "API Rate Limiting": kubectl logs | grep "rate limit";
-- curl /metrics | grep rate_limit (here the 429 share of the service's
-- requests, from Prometheus); more API keys in the Secret (kubectl edit
-- secret); Redis (the response cache) answering. Exponential backoff (a code
-- change) and a higher limit from the provider stay the team's. No key is
-- ever printed.
--
--   runbook run rate-limit -p service=backend
--   runbook run rate-limit -p service=backend -p secret=llm-secrets -p add_keys="$KEY2,$KEY3" --step

name = "rate-limit"
description = "A throttled service: its 429 share and rate-limit log records, its API keys, the cache; more API keys in its Secret and its readers restarted onto them; the 429 share verified"
replaces = { "004-6" }
version = "1.0.0"

params (steps.metric_params) { "service", "deployment", "namespace", "window", "hold", "every" }
param "max_throttled" { type = "number", default = 0.01, help = "the share of requests answered 429 the service must stay under" }
param "log_since" (steps.params.log_since)
param "log_pattern" { default = "[Rr]ate[%s_-]?[Ll]imit", help = "a Lua pattern a rate-limit log record matches (grep \"rate limit\")" }
param "secret" { default = "todo-chatbot-secrets", help = "the Secret holding the service's API keys" }
param "key_prefix" { default = "LLM_API_KEY", help = "the API keys' names: KEY_PREFIX, KEY_PREFIX_2, KEY_PREFIX_3 ..." }
param "add_keys" { type = "list", default = "", secret = true, help = "new API keys, added as the next KEY_PREFIX_N (none: nothing is added)" }
param "cache_selector" { default = "app=redis", help = "labels of the cache's pods (kubectl get pods -l), if it runs in the namespace" }
param "timeout" { type = "duration", default = "5m", help = "how long each restart may take to roll out" }

local deployment = steps.service_deployment
local ns = function(ctx) return { namespace = ctx.params.namespace } end

local THROTTLED = steps.metric { name = "throttled share", unit = "percent", max = "max_throttled", by = "service",
  query = function(selector, window, by) return checks.error_rate_query(selector, window, by, "429") end }

--- The Secret's API keys, by name: {names = {...} (sorted), next = the next free KEY_PREFIX_N}.
local function api_keys(ctx)
  local data = k8s.get("secret/" .. ctx.params.secret, ns(ctx)).data or {}
  local prefix, names, n = ctx.params.key_prefix, {}, 1
  for k in pairs(data) do
    local i = k == prefix and 1 or tonumber(k:match("^" .. prefix:gsub("%p", "%%%0") .. "_(%d+)$"))
    if i then names[#names + 1] = k; n = math.max(n, i + 1) end
  end
  table.sort(names)
  return { names = names, next = #names == 0 and 1 or n }
end

step "Measure the throttled share" (steps.measure_metric {
  description = "curl /metrics | grep rate_limit: the share of each service's requests answered 429, and the service's own",
  metric = THROTTLED,
})

step "Search the logs" {
  description = "kubectl logs | grep \"rate limit\": the deployment's rate-limit records of log_since, counted by message",
  run = function(ctx)
    local q = k8s.log_query { target = "deploy/" .. deployment(ctx), namespace = ctx.params.namespace,
      since = ctx.params.log_since, match = ctx.params.log_pattern, count_by = "message", top = 5 }
    log.info("%d rate-limit records in the last %s across %d pod(s)%s", q.count, duration.format(ctx.params.log_since),
      #q.pods, q.count > 0 and (", the first at " .. os.date("!%H:%M:%S", math.floor(q.first.time)) .. " UTC:") or "")
    for _, b in ipairs(q.by) do log.info("  %5d  %s", b.count, b.value) end
    return { records = q.count, top = q.by }
  end,
}

step "Count the API keys" {
  description = "kubectl get secret: the keys named KEY_PREFIX[_N] (names only) the load is spread over",
  run = function(ctx)
    local k = api_keys(ctx)
    log.info("secret %s holds %d API key(s)%s", ctx.params.secret, #k.names,
      #k.names > 0 and (": " .. table.concat(k.names, ", ")) or (" named " .. ctx.params.key_prefix .. "[_N]"))
    return { keys = #k.names }
  end,
}

step "Check the cache" {
  description = "kubectl get pods -l cache_selector, and Redis answering PING ($REDIS_URL): cached responses save API calls",
  run = function(ctx)
    local pods = k8s.list("pods", { namespace = ctx.params.namespace, selector = ctx.params.cache_selector })
    for _, p in ipairs(pods) do log.info("cache pod %s: %s", p.metadata.name, (p.status or {}).phase or "unknown") end
    if #pods == 0 then log.info("no pod labelled %s in %s", ctx.params.cache_selector, ctx.params.namespace) end
    if (os.getenv("REDIS_URL") or "") == "" then
      log.warn("no REDIS_URL: the cache is not checked")
      return { pods = #pods }
    end
    local r <close> = redis.connect(nil, { timeout = "5s" })
    local pong = r:ping()
    log.info("Redis answers %s", tostring(pong))
    return { pods = #pods, redis = true }
  end,
}

step "Add API keys" {
  description = "kubectl edit secret: each of add_keys as the next KEY_PREFIX_N (never printed); undo removes them",
  needs = { "Measure the throttled share" },
  when = function(ctx) return #ctx.params.add_keys > 0 end,
  confirm = true,
  run = function(ctx)
    local k, data, added = api_keys(ctx), {}, {}
    for _, v in ipairs(ctx.params.add_keys) do
      local name = k.next == 1 and ctx.params.key_prefix or ("%s_%d"):format(ctx.params.key_prefix, k.next)
      data[name], k.next = base64.encode(v), k.next + 1
      added[#added + 1] = name
    end
    k8s.patch("secret/" .. ctx.params.secret, { data = data }, { namespace = ctx.params.namespace, type = "merge" })
    log.info("secret %s: %s added, %d key(s) in all", ctx.params.secret, table.concat(added, ", "), #k.names + #added)
    return { added = added }
  end,
  undo = function(ctx, out)
    local data = {}
    for _, name in ipairs(out.added) do data[name] = json.null end
    k8s.patch("secret/" .. ctx.params.secret, { data = data }, { namespace = ctx.params.namespace, type = "merge" })
  end,
}

step "Restart the readers" {
  description = "kubectl rollout restart of each deployment, statefulset and daemonset reading the Secret, so they start with the new keys; waits for each",
  needs = { "Add API keys" },
  confirm = true,
  run = function(ctx)
    local refs, others = rotation.readers(ctx.params.namespace, ctx.params.secret)
    for _, ref in ipairs(others) do log.warn("%s reads the Secret too: restart it by hand", ref) end
    rotation.restart(refs, { namespace = ctx.params.namespace, timeout = ctx.params.timeout })
    return { restarted = refs }
  end,
}

step "Verify the throttled share" (steps.verify_metric {
  description = "After one rate window (so only the time since the change counts), the 429 share must stay under max_throttled for `hold`",
  metric = THROTTLED, measured = "Measure the throttled share",
})
