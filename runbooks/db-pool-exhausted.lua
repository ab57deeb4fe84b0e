-- db-pool-exhausted.lua: find what holds PostgreSQL's connections and free them.
--
-- Replaces seed 002 "Database Connection Pool Exhausted" (count
-- pg_stat_activity, kubectl set env DB_POOL_SIZE=30 DB_MAX_OVERFLOW=20,
-- rollout restart, the long-running queries of pg_stat_activity) and seed
-- 004's connection-limit checks. It names the holders first (by application,
-- user and state) and the longest-running statements, ends the sessions stuck
-- "idle in transaction" (the usual leak: they hold a pool slot and their locks
-- until the server's limit), cancels the queries active for longer than
-- running_for (terminating the session of one that ignores the cancel),
-- optionally raises the app's pool, and checks the connections came down.
--
-- And seed 000 and 001 "Database Connection Issues" / "Database
-- Connectivity": first, whether the app reaches the database at all: psql
-- from inside its pod with its own DATABASE_URL (kubectl exec), where that URL
-- comes from and the Secret it is in, shown masked (kubectl get secret -o
-- yaml, without the passwords), and the NetworkPolicies that select its pods:
-- one that restricts egress without allowing the database's address and port
-- is named. A database the app cannot reach stops the run there.
--
-- And seed 004 "Database Connection Issues", when PostgreSQL runs in the
-- cluster (db_workload): its pods, their last log lines and `df -h` in each
-- (kubectl exec), and, when the app cannot reach it, its pods are not ready
-- or restart_db asks, the pods deleted so that they restart (confirm).
--
--   runbook run db-pool-exhausted --step
--   runbook run db-pool-exhausted -p idle_for=1m -p pool_size=30 -p max_overflow=20

name = "db-pool-exhausted"
description = "Can the app reach PostgreSQL (from its pod, its Secret masked, NetworkPolicies; the database's pods, logs, disk, restart); connections against max_connections; end sessions idle in transaction, cancel long-running queries; optionally raise the app's pool; verify"
replaces = { "002-23", "000-9", "001-9", "004-4" }
version = "1.0.0"

param "idle_for" { type = "duration", default = "5m", help = "sessions idle in a transaction longer than this are ended" }
param "running_for" { type = "duration", default = "5m", help = "queries active for longer than this are cancelled (pg_cancel_backend)" }
param "user" { default = "", help = "only end sessions and cancel queries of this database user (default: any but superusers)" }
param "warn_share" { type = "number", default = 0.8, help = "connections at this share of max_connections are too many (seed 003: 80% of pool)" }
param "deployment" { default = "todo-chatbot-backend",
  help = "the app: the database is checked from its pod with its DATABASE_URL, and its pool raised when pool_size is set; "
    .. "'' checks from here only" }
param "namespace" (steps.params.namespace)
param "db_workload" { default = "", help = "PostgreSQL's StatefulSet or Deployment in the namespace (statefulset/postgres): its pods, logs and disk are checked" }
param "db_log_lines" { type = "integer", default = 20, help = "the last log lines shown of each database pod" }
param "restart_db" { type = "boolean", default = false,
  help = "restart the database's pods even when they are ready and the app reaches them (asks first)" }
param "pool_size" { type = "integer", default = 0, help = "set DB_POOL_SIZE on the deployment (seed: 30); 0 leaves the pool alone" }
param "max_overflow" { type = "integer", default = 0, help = "set DB_MAX_OVERFLOW with it (seed: 20)" }

-- Sessions of other users than superusers in this database, in `state`s,
-- for at least $1 seconds since `since` (a pg_stat_activity column); $2 a user or ''.
local function sessions(states, since)
  return ([[
  SELECT a.pid, a.usename AS user, a.application_name AS app, coalesce(a.client_addr::text, 'local') AS client,
         extract(epoch FROM now() - a.%s)::float8 AS seconds, left(a.query, 200) AS query
  FROM pg_stat_activity a JOIN pg_roles r ON r.rolname = a.usename
  WHERE a.datname = current_database() AND a.state IN (%s)
    AND a.pid <> pg_backend_pid() AND NOT r.rolsuper
    AND now() - a.%s >= make_interval(secs => $1) AND ($2 = '' OR a.usename = $2)
  ORDER BY a.%s]]):format(since, states, since, since)
end
local STUCK = sessions("'idle in transaction', 'idle in transaction (aborted)'", "state_change")
local LONG = sessions("'active'", "query_start")

local BY_APP = [[
  SELECT coalesce(nullif(application_name, ''), '(none)') AS app, usename AS user, coalesce(state, 'background') AS state,
         count(*) AS n
  FROM pg_stat_activity WHERE datname = current_database()
  GROUP BY 1, 2, 3 ORDER BY 4 DESC, 1]]

local function measure(db, ctx)
  local a = db:activity()
  local share = a.total / a.max_connections
  log.info("%d of %d connections in use (%.0f%%)", a.total, a.max_connections, share * 100)
  for _, r in ipairs(db:query(BY_APP)) do log.info("  %4d  %-24s %-12s %s", r.n, r.app, r.user, r.state) end
  local stuck = db:query(STUCK, ctx.params.idle_for, ctx.params.user)
  local long = db:query(LONG, ctx.params.running_for, ctx.params.user)
  stuck.columns, long.columns = nil, nil
  return { total = a.total, max = a.max_connections, share = share, stuck = stuck, long = long, longest = a.long_running }
end

local function app(ctx) return "deploy/" .. ctx.params.deployment end
local function has_app(ctx) return ctx.params.deployment ~= "" end

-- postgresql://user:password@host:port/db?x -> {user, host, port, database}, and the URL with its password masked.
local function parse_url(url)
  local scheme, userinfo, hostport, db = url:match("^([%w+.-]+)://([^@/]*)@([^/?]*)/?([^?]*)")
  if not scheme then
    scheme, hostport, db = url:match("^([%w+.-]+)://([^/?]*)/?([^?]*)")
    if not scheme then return nil, "(not a URL)" end
  end
  local user = userinfo and userinfo:match("^([^:]*)")
  local host, port = hostport:match("^%[(.-)%]:?(%d*)$")
  if not host then host, port = hostport:match("^([^:]*):?(%d*)$") end
  local masked = userinfo and userinfo:find(":", 1, true) and url:gsub("^([%w+.-]+://[^:/@]*:)[^@]*@", "%1***@", 1) or url
  return { user = user, host = host, port = tonumber(port) or 5432, database = db }, masked
end

-- A Secret or ConfigMap (nil when missing), and its key's value as the pod sees it.
local function source(ctx, kind, name, key)
  local o = k8s.get(kind .. "/" .. name, { namespace = ctx.params.namespace, missing_ok = true })
  local v = o and key and (o.data or {})[key]
  if v and kind == "secret" then v = base64.decode(v) end
  return o, v
end

step "Connect from the app's pod" {
  description = "kubectl exec deploy/DEPLOYMENT -- psql \"$DATABASE_URL\" -c 'SELECT 1': the database as the app reaches it, with its own env",
  when = has_app,
  run = function(ctx)
    local r = checks.in_pod("postgres", app(ctx), { namespace = ctx.params.namespace })
    if not r.ok then log.warn("postgres from %s: %s", app(ctx), r.error) end
    return { ok = r.ok, skipped = r.skipped, error = r.error }
  end,
}

step "Show the connection settings" {
  description = "Where the app's DATABASE_URL comes from, and the Secret it is in, masked (kubectl get secret -o yaml without the passwords)",
  when = has_app,
  run = function(ctx)
    local c = k8s.get(app(ctx), { namespace = ctx.params.namespace }).spec.template.spec.containers[1]
    local url, from, secrets = nil, nil, {}
    for _, ef in ipairs(c.envFrom or {}) do
      local ref = ef.secretRef or ef.configMapRef
      local kind = ef.secretRef and "secret" or "configmap"
      local o = source(ctx, kind, ref.name)
      if kind == "secret" and o then secrets[#secrets + 1] = o end
      for k in pairs((o or {}).data or {}) do
        if (ef.prefix or "") .. k == "DATABASE_URL" then
          url, from = select(2, source(ctx, kind, ref.name, k)), ("%s %s, key %s"):format(kind, ref.name, k)
        end
      end
    end
    for _, e in ipairs(c.env or {}) do   -- env wins over envFrom, as in the container
      if e.name == "DATABASE_URL" then
        local vf = e.valueFrom or {}
        local ref = vf.secretKeyRef or vf.configMapKeyRef
        if ref then
          url, from = select(2, source(ctx, vf.secretKeyRef and "secret" or "configmap", ref.name, ref.key)),
            ("%s %s, key %s"):format(vf.secretKeyRef and "secret" or "configmap", ref.name, ref.key)
        else url, from = e.value, "the pod template's env" end
      end
    end
    for _, o in ipairs(secrets) do
      log.info("secret %s (%s):", o.metadata.name, o.type or "Opaque")
      local keys = {}
      for k in pairs(o.data or {}) do keys[#keys + 1] = k end
      table.sort(keys)
      for _, k in ipairs(keys) do
        local v = base64.decode(o.data[k])
        local _, masked = parse_url(v)
        log.info("  %s: %s", k, masked ~= "(not a URL)" and masked or ("(%d bytes)"):format(#v))
      end
    end
    if not url then
      log.warn("%s's container %s has no DATABASE_URL", ctx.params.deployment, c.name)
      return { found = false }
    end
    local u, masked = parse_url(url)
    log.info("the app's DATABASE_URL (%s): %s", from, masked)
    if not u then return { found = true, from = from } end
    local here = parse_url(os.getenv("DATABASE_URL") or "")
    if here and (here.host ~= u.host or here.port ~= u.port or here.database ~= u.database) then
      log.warn("the app's database %s:%d/%s is not the one this runbook measures (%s:%d/%s)", u.host, u.port, u.database,
        here.host, here.port, here.database)
    end
    return { found = true, from = from, host = u.host, port = u.port, database = u.database, user = u.user }
  end,
}

local function db_pods(ctx)
  local w = k8s.get(ctx.params.db_workload, { namespace = ctx.params.namespace })
  local sel = {}
  for k, v in pairs(w.spec.selector.matchLabels or {}) do sel[#sel + 1] = k .. "=" .. v end
  table.sort(sel)
  local pods = k8s.list("pods", { namespace = ctx.params.namespace, selector = table.concat(sel, ",") })
  return pods, w.spec.replicas or 1
end

local function ready(p)
  for _, c in ipairs((p.status or {}).conditions or {}) do
    if c.type == "Ready" then return c.status == "True" end
  end
  return false
end

step "Check the database's pods" {
  description = "kubectl get pods -l <db_workload's selector>, kubectl logs --tail=<db_log_lines>, kubectl exec -- df -h in each",
  when = function(ctx) return ctx.params.db_workload ~= "" end,
  run = function(ctx)
    local pods, replicas = db_pods(ctx)
    local out, full = { pods = {}, replicas = replicas, ready = 0 }, {}
    for _, p in ipairs(pods) do
      local name, restarts = p.metadata.name, 0
      for _, cs in ipairs((p.status or {}).containerStatuses or {}) do restarts = restarts + (cs.restartCount or 0) end
      local ok = ready(p)
      out.ready = out.ready + (ok and 1 or 0)
      log[ok and "info" or "warn"]("database pod %s: %s, %s, %d restarts", name, (p.status or {}).phase or "?",
        ok and "ready" or "not ready", restarts)
      local lok, lines = pcall(k8s.logs, "pod/" .. name, { namespace = ctx.params.namespace, tail = ctx.params.db_log_lines })
      if lok then
        for _, l in ipairs(lines) do log.info("  %s", l) end
      else log.warn("  logs: %s", tostring(type(lines) == "table" and lines.message or lines)) end
      local df = k8s.exec("pod/" .. name, { "df", "-h" }, { namespace = ctx.params.namespace, read = true, check = false, timeout = "20s" })
      local fullest = { use = -1 }
      for line in df.stdout:gmatch("[^\n]+") do
        local use, mount = line:match("%s(%d+)%%%s+(%S+)$")
        use = tonumber(use)
        if use and use > fullest.use then fullest = { use = use, mount = mount, line = line } end
        if use and use >= 90 then full[#full + 1] = ("%s %s %d%%"):format(name, mount, use); log.warn("  df: %s", line) end
      end
      if df.status ~= 0 then log.warn("  df -h: %s", (df.stderr:gsub("%s+$", "")))
      elseif fullest.mount then log.info("  df -h: the fullest filesystem is %s at %d%%", fullest.mount, fullest.use) end
      out.pods[#out.pods + 1] = { name = name, uid = p.metadata.uid, ready = ok, restarts = restarts, fullest = fullest.use }
    end
    if #pods == 0 then log.warn("%s has no pods", ctx.params.db_workload) end
    if #full > 0 then log.warn("filesystems 90%% full or more: %s (a full disk stops PostgreSQL's writes)", table.concat(full, ", ")) end
    out.full = full
    return out
  end,
}

step "Restart the database" {
  description = "kubectl delete pod -l <db_workload's selector> (seed 004), when the app cannot reach it, a pod is not ready, or restart_db; "
    .. "wait until new pods are ready",
  needs = { "Check the database's pods" },
  uses = { "Connect from the app's pod" },
  confirm = true,
  when = function(ctx)
    local db, app_side = ctx.outputs["Check the database's pods"], ctx.outputs["Connect from the app's pod"]
    return ctx.params.restart_db or db.ready < db.replicas or (app_side ~= nil and not app_side.ok)
  end,
  run = function(ctx)
    local before = {}
    for _, p in ipairs(ctx.outputs["Check the database's pods"].pods) do
      before[p.uid] = true
      k8s.delete("pod/" .. p.name, { namespace = ctx.params.namespace })
    end
    time.wait_until({ timeout = "5m", what = "the database's pods to be back and ready" }, function()
      local pods, replicas = db_pods(ctx)
      if #pods ~= replicas then return false end
      for _, p in ipairs(pods) do
        if before[p.metadata.uid] or not ready(p) then return false end
      end
      return true
    end)
    if not ctx.dry_run then log.info("%s: every pod restarted and ready", ctx.params.db_workload) end
    return { restarted = true }
  end,
}

-- a.b.c.d -> an integer, or nil
local function ipv4(s)
  local a, b, c, d = (s or ""):match("^(%d+)%.(%d+)%.(%d+)%.(%d+)$")
  return a and ((tonumber(a) * 256 + tonumber(b)) * 256 + tonumber(c)) * 256 + tonumber(d)
end

local function in_cidr(ip, cidr)
  local net, bits = cidr:match("^([%d.]+)/(%d+)$")
  net, bits = ipv4(net), tonumber(bits)
  if not (ip and net) then return false end
  local size = 1 << (32 - bits)
  return ip // size == net // size
end

-- Whether one egress peer lets the pods reach the database: true, false, or nil when it cannot be told.
local function peer_allows(peer, db)
  if peer.ipBlock then
    if not db.ip then return nil end
    if not in_cidr(db.ip, peer.ipBlock.cidr) then return false end
    for _, ex in ipairs(peer.ipBlock.except or {}) do if in_cidr(db.ip, ex) then return false end end
    return true
  end
  if not db.labels then return false end    -- a pod or namespace selector cannot select an address outside the cluster
  return k8s.selects(peer.namespaceSelector or { matchLabels = { ["kubernetes.io/metadata.name"] = db.namespace } },
    { ["kubernetes.io/metadata.name"] = db.namespace }) and k8s.selects(peer.podSelector or {}, db.labels)
end

local function port_allows(ports, port)
  if not ports or #ports == 0 then return true end
  for _, p in ipairs(ports) do
    if (p.protocol or "TCP") == "TCP" and (p.port == nil or type(p.port) == "string" or p.port == port
      or (p.endPort and p.port <= port and port <= p.endPort)) then return true end
  end
  return false
end

step "Check the network policies" {
  description = "The NetworkPolicies that select the app's pods: does one restrict egress without allowing the database's address and port? "
    .. "Then the verdict: the app reaches the database, or the run stops here",
  needs = { "Connect from the app's pod", "Show the connection settings" },
  uses = { "Restart the database" },
  run = function(ctx)
    local ns, conn = ctx.params.namespace, ctx.outputs["Show the connection settings"]
    local labels = k8s.get(app(ctx), { namespace = ns }).spec.template.metadata.labels or {}
    local db, blocked, unknown = nil, {}, {}
    if conn.host then
      db = { host = conn.host, port = conn.port, ip = ipv4(conn.host) }
      -- NAME, NAME.NS, NAME.NS.svc[.cluster.local]: a Service of the cluster, whose pods are the database
      local svc, svc_ns = conn.host:match("^([%w-]+)%.?([%w-]*)")
      if not db.ip and svc then
        local s = k8s.get("svc/" .. svc, { namespace = svc_ns ~= "" and svc_ns or ns, missing_ok = true })
        if s and s.spec.selector then
          db.namespace, db.labels = s.metadata.namespace, s.spec.selector
          local sel = {}
          for k, v in pairs(s.spec.selector) do sel[#sel + 1] = k .. "=" .. v end
          table.sort(sel)
          for _, p in ipairs(k8s.list("pods", { namespace = db.namespace, selector = table.concat(sel, ",") })) do
            log.info("database pod %s: %s", p.metadata.name, (p.status or {}).phase or "?")
          end
        end
      end
    end
    local restricting = 0
    for _, np in ipairs(k8s.list("networkpolicies", { namespace = ns })) do
      local types = np.spec.policyTypes or (np.spec.egress and { "Ingress", "Egress" } or { "Ingress" })
      local egress = false
      for _, t in ipairs(types) do egress = egress or t == "Egress" end
      if egress and k8s.selects(np.spec.podSelector or {}, labels) then
        restricting = restricting + 1
        local verdict = false
        for _, rule in ipairs(np.spec.egress or {}) do
          if db and port_allows(rule.ports, db.port) then
            if not rule.to or #rule.to == 0 then verdict = true end
            for _, peer in ipairs(rule.to or {}) do
              local a = peer_allows(peer, db)
              if a then verdict = true elseif a == nil and verdict == false then verdict = nil end
            end
          end
        end
        if verdict then log.info("networkpolicy %s allows egress to %s:%d", np.metadata.name, db.host, db.port)
        elseif verdict == nil then unknown[#unknown + 1] = np.metadata.name
        else blocked[#blocked + 1] = np.metadata.name end
      end
    end
    -- Egress is allowed where any policy allows it: blocked only when every restricting policy blocks.
    local allowed_by = restricting - #blocked - #unknown
    if restricting == 0 then log.info("no NetworkPolicy restricts the egress of %s's pods", ctx.params.deployment)
    elseif allowed_by == 0 and #unknown > 0 then
      log.warn("networkpolicies %s restrict egress to addresses; whether %s is among them cannot be told from here",
        table.concat(unknown, ", "), db and db.host or "the database")
    end
    local problems = {}
    local pod = ctx.outputs["Connect from the app's pod"]
    if not pod.ok and not ctx.skipped("Restart the database") and not ctx.dry_run then   -- again, after the restart
      pod = checks.in_pod("postgres", app(ctx), { namespace = ctx.params.namespace })
    end
    if not pod.ok then problems[#problems + 1] = "psql from " .. app(ctx) .. ": " .. pod.error end
    if restricting > 0 and allowed_by == 0 and #unknown == 0 then
      problems[#problems + 1] = ("networkpolicy %s selects the pods of %s and allows no egress to %s"):format(
        table.concat(blocked, ", "), ctx.params.deployment, db and ("%s:%d"):format(db.host, db.port) or "the database")
    end
    if #problems > 0 then error("the app cannot reach the database: " .. table.concat(problems, "; "), 0) end
    return { blocked = blocked, restricting = restricting }
  end,
}

step "Measure the connections" {
  description = "SELECT count(*) FROM pg_stat_activity, by application, user and state; the 10 longest-running statements; "
    .. "sessions idle in a transaction for longer than idle_for, queries active for longer than running_for",
  run = function(ctx)
    local db <close> = pg.connect()
    local m = measure(db, ctx)
    if #m.longest > 0 then log.info("the longest-running statements (not idle):") end
    for _, q in ipairs(m.longest) do
      log.info("  pid %d  %s  %-28s %s: %s", q.pid, duration.format(q.seconds), q.state, q.application_name or "", q.query)
    end
    for _, s in ipairs(m.stuck) do
      log.warn("pid %d (%s, %s from %s) idle in a transaction for %s: %s", s.pid, s.app, s.user, s.client,
        duration.format(s.seconds), s.query)
    end
    for _, q in ipairs(m.long) do
      log.warn("pid %d (%s, %s from %s) running a query for %s: %s", q.pid, q.app, q.user, q.client,
        duration.format(q.seconds), q.query)
    end
    if m.share >= ctx.params.warn_share then
      log.warn("%d of %d connections: the pool is exhausted or close to it", m.total, m.max)
    end
    return { total = m.total, max = m.max, stuck = #m.stuck, long = #m.long }
  end,
}

step "End stuck sessions" {
  description = "pg_terminate_backend for each session idle in a transaction longer than idle_for (its transaction rolls back)",
  needs = { "Measure the connections" },
  confirm = true,
  when = function(ctx) return ctx.outputs["Measure the connections"].stuck > 0 end,
  run = function(ctx)
    local db <close> = pg.connect()
    local ended = 0
    for _, s in ipairs(db:query(STUCK, ctx.params.idle_for, ctx.params.user)) do
      if db:terminate(s.pid) then ended = ended + 1 end
    end
    if not ctx.dry_run then log.info("ended %d sessions", ended) end
    return { ended = ended }
  end,
}

step "Cancel long-running queries" {
  description = "pg_cancel_backend for each query active for longer than running_for; pg_terminate_backend for one still running 5s later",
  needs = { "Measure the connections" },
  confirm = true,
  when = function(ctx) return ctx.outputs["Measure the connections"].long > 0 end,
  run = function(ctx)
    local db <close> = pg.connect()
    local cancelled, pids = 0, {}
    for _, q in ipairs(db:query(LONG, ctx.params.running_for, ctx.params.user)) do
      if db:cancel(q.pid) then cancelled, pids[q.pid] = cancelled + 1, true end
    end
    if ctx.dry_run then return { cancelled = 0, terminated = 0 } end
    -- A query inside a function that never checks for interrupts ignores the cancel: end its session.
    local still, deadline = {}, time.monotonic() + 5
    repeat
      if #still > 0 then time.sleep(0.5) end
      still = {}
      for _, q in ipairs(db:query(LONG, ctx.params.running_for, ctx.params.user)) do
        if pids[q.pid] then still[#still + 1] = q.pid end
      end
    until #still == 0 or time.monotonic() >= deadline
    local terminated = 0
    for _, pid in ipairs(still) do if db:terminate(pid) then terminated = terminated + 1 end end
    log.info("cancelled %d %s%s", cancelled, cancelled == 1 and "query" or "queries", terminated > 0 and (", ended the sessions of %d that kept running"):format(terminated) or "")
    return { cancelled = cancelled, terminated = terminated }
  end,
}

step "Raise the pool" {
  description = "kubectl set env DB_POOL_SIZE / DB_MAX_OVERFLOW on the deployment (a rolling restart), and wait for it",
  needs = { "Measure the connections" },
  confirm = true,
  when = function(ctx) return ctx.params.pool_size > 0 end,
  run = function(ctx, m)
    local want = ctx.params.pool_size + ctx.params.max_overflow
    local d = k8s.get("deploy/" .. ctx.params.deployment, { namespace = ctx.params.namespace })
    local replicas = d.spec.replicas or 1
    if want * replicas > m.max then
      log.warn("%d replicas x (pool %d + overflow %d) = %d connections, more than max_connections %d: the pool can "
        .. "exhaust the server", replicas, ctx.params.pool_size, ctx.params.max_overflow, want * replicas, m.max)
    end
    local env = { DB_POOL_SIZE = tostring(ctx.params.pool_size) }
    if ctx.params.max_overflow > 0 then env.DB_MAX_OVERFLOW = tostring(ctx.params.max_overflow) end
    k8s.set_env("deploy/" .. ctx.params.deployment, env, { namespace = ctx.params.namespace })
    k8s.rollout_status("deploy/" .. ctx.params.deployment, { namespace = ctx.params.namespace, timeout = "5m", fail_fast = true })
  end,
}

step "Verify" {
  description = "No session idle in a transaction past idle_for, no query active past running_for, and the connections below warn_share of max_connections",
  needs = { "Measure the connections" },
  retry = { attempts = 5, base = "1s", max = "3s" },
  run = function(ctx)
    local db <close> = pg.connect()
    local m = measure(db, ctx)
    if ctx.dry_run then return end
    local problems = {}
    if #m.stuck > 0 then problems[#problems + 1] = ("%d sessions still idle in a transaction"):format(#m.stuck) end
    if #m.long > 0 then problems[#problems + 1] = ("%d queries still running past %s"):format(#m.long, duration.format(ctx.params.running_for)) end
    if m.share >= ctx.params.warn_share then
      problems[#problems + 1] = ("%d of %d connections still in use"):format(m.total, m.max)
    end
    if #problems > 0 then error(table.concat(problems, "; "), 0) end
    log.info("%d of %d connections, none stuck: the pool has room (was %d)", m.total, m.max,
      ctx.outputs["Measure the connections"].total)
    return { total = m.total }
  end,
}
