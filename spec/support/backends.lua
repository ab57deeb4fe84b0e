--- Snapshots of everything a runbook could change in the sandbox, read with the
--- backends' own clients (curl to the Kubernetes API, psql, redis-cli, kcat and
--- the sandbox's read-only lag client), never through runbook's modules: specs
--- use them to show that a dry run changed nothing.
local sb = require("spec.sandbox.sandbox_helper")

local M = {}

-- Every kind a runbook can write, as list paths of the Kubernetes stand-in.
M.k8s_lists = {
  "/api/v1/namespaces", "/api/v1/nodes", "/api/v1/pods", "/api/v1/services", "/api/v1/endpoints",
  "/api/v1/configmaps", "/api/v1/secrets", "/api/v1/serviceaccounts", "/api/v1/events",
  "/apis/apps/v1/deployments", "/apis/apps/v1/replicasets", "/apis/apps/v1/statefulsets",
  "/apis/coordination.k8s.io/v1/leases", "/apis/autoscaling/v2/horizontalpodautoscalers",
  "/apis/networking.k8s.io/v1/ingresses", "/apis/networking.k8s.io/v1/networkpolicies",
  "/apis/dapr.io/v1alpha1/components", "/apis/dapr.io/v1alpha1/subscriptions",
  "/apis/cert-manager.io/v1/certificates",
}

-- The sandbox's consumer groups; specs add the groups their runbooks commit for.
M.kafka_groups = { "recurring-task-service", "websocket-service", "notification-service" }

local function k8s_state(into)
  local got = sb.k8s_get_all(M.k8s_lists)
  for i, path in ipairs(M.k8s_lists) do
    local status, doc = table.unpack(got[i] or {})
    assert(status == 200, ("GET %s: %s %s"):format(path, tostring(status), tostring(doc)))
    for _, item in ipairs(doc.items) do
      local md = item.metadata
      into[("k8s %s %s/%s"):format(path:match("[^/]+$"), md.namespace or "-", md.name)] = md.resourceVersion
    end
  end
end

local function psql_rows(sql)
  local out, ok = sb.psql(sql)
  assert(ok, out)
  local rows = {}
  for line in out:gmatch("[^\n]+") do rows[#rows + 1] = line end
  return rows
end

-- A checksum and row count of every user table, and every sequence's position
-- (nextval is not rolled back with a transaction, so a dry run must not call it).
local function pg_state(into)
  local parts = {}
  for _, row in ipairs(psql_rows([[select 't' || format('%I.%I', schemaname, relname) from pg_stat_user_tables
      union all select 's' || format('%I.%I', schemaname, sequencename) from pg_sequences order by 1]])) do
    local kind, name = row:sub(1, 1), row:sub(2)
    parts[#parts + 1] = kind == "t"
      and ("select %s, count(*) || ' ' || coalesce(md5(string_agg(x::text, ',' order by x::text)), '') from %s x")
        :format(sb.quote(name), name)
      or ("select %s, last_value || ' ' || is_called from %s"):format(sb.quote(name), name)
  end
  if #parts == 0 then return end
  for _, row in ipairs(psql_rows(table.concat(parts, " union all "))) do
    local name, value = row:match("^(.-)|(.*)$")
    into["pg " .. name] = value
  end
end

-- Each key's type, a digest of its DUMP and whether it expires.
local REDIS_SCRIPT = [[
local out = {}
for _, k in ipairs(redis.call('KEYS', '*')) do
  local ttl = redis.call('PTTL', k) > 0 and ' expires' or ''
  out[#out + 1] = k .. '\t' .. redis.call('TYPE', k).ok .. ' ' .. redis.sha1hex(redis.call('DUMP', k)) .. ttl
end
return out
]]

local function redis_state(into)
  local out, ok = sb.redis("--raw EVAL " .. sb.quote(REDIS_SCRIPT) .. " 0")
  assert(ok, out)
  for line in out:gmatch("[^\n]+") do
    local key, value = line:match("^(.-)\t(.*)$")
    assert(key, "unexpected redis-cli output: " .. line)
    into["redis " .. key] = value
  end
end

-- Every topic's high watermarks in one kcat, every group's committed offsets
-- on every topic read at once.
local function kafka_state(into, groups)
  local meta, ok = sb.kcat("-L -J")
  assert(ok, meta)
  local topics, group_topics = {}, {}
  for _, t in ipairs(require("cjson").decode(meta).topics) do
    if not t.topic:match("^__") then
      topics[t.topic] = #t.partitions
      for _, g in ipairs(groups) do group_topics[#group_topics + 1] = { g, t.topic } end
    end
  end
  for topic, marks in pairs(sb.all_watermarks(topics)) do
    for p, high in pairs(marks) do into(("kafka %s[%d] high"):format(topic, p), high) end
  end
  for i, lag in ipairs(sb.lags(group_topics)) do
    for _, part in ipairs(lag[2]) do
      into(("kafka %s %s[%d] committed"):format(group_topics[i][1], group_topics[i][2], part.partition), part.committed)
    end
  end
end

--- A table of "backend object" → version/checksum for the whole sandbox.
--- opts.groups: more consumer groups whose committed offsets count.
function M.snapshot(opts)
  local snap = {}
  local function put(k, v) snap[k] = tostring(v) end
  local groups = { table.unpack(M.kafka_groups) }
  for _, g in ipairs(opts and opts.groups or {}) do groups[#groups + 1] = g end
  k8s_state(snap)
  pg_state(snap)
  redis_state(snap)
  kafka_state(put, groups)
  return snap
end

--- The differences between two snapshots, one line each, sorted.
function M.diff(before, after)
  local lines = {}
  for k, v in pairs(before) do
    if after[k] == nil then
      lines[#lines + 1] = k .. ": removed (was " .. v .. ")"
    elseif after[k] ~= v then
      lines[#lines + 1] = k .. ": " .. v .. " -> " .. after[k]
    end
  end
  for k, v in pairs(after) do
    if before[k] == nil then lines[#lines + 1] = k .. ": added (" .. v .. ")" end
  end
  table.sort(lines)
  return lines
end

--- Runs fn with the sandbox's workload paused and fails, naming every
--- difference, when anything in Kubernetes, PostgreSQL, Redis or Kafka changed.
--- Returns what fn returned.
function M.assert_unchanged(fn, opts)
  local out, ok = sb.ctl("workload pause")
  assert(ok, out)
  local results = table.pack(pcall(function()
    local before = M.snapshot(opts)
    local r = table.pack(fn())
    local changed = M.diff(before, M.snapshot(opts))
    assert(#changed == 0, "the backends changed:\n  " .. table.concat(changed, "\n  "))
    return table.unpack(r, 1, r.n)
  end))
  sb.ctl("workload resume")
  if not results[1] then error(results[2], 0) end
  return table.unpack(results, 2, results.n)
end

return M
