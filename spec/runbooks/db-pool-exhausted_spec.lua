-- runbooks/db-pool-exhausted.lua against the sandbox's PostgreSQL: a leaking
-- worker holds sessions idle in a transaction (psql processes that began a
-- transaction and never ended it). The runbook ends them; psql counts them
-- independently. A report holds a query running (psql in pg_sleep): the
-- runbook cancels it; psql sees it no longer active. The pool raise is checked
-- with curl against Kubernetes. A NetworkPolicy that denies the backend's
-- egress to the database is named (kubectl reads the same policy), one that
-- allows it is not, and the app's Secret is shown with its passwords masked.
-- A PostgreSQL StatefulSet in the cluster (the stand-in's pods): its pods,
-- logs and disk are read, and a restart replaces its pod (kubectl sees a new
-- uid, ready); a dry run leaves the pod.
local cli = require("spec.support.cli")
local backends = require("spec.support.backends")
local sb = require("spec.sandbox.sandbox_helper")
local kh = require("spec.runbooks.k8s_helper")

local RUNBOOK = "runbooks/db-pool-exhausted.lua"

local function leaked()
  return tonumber((sb.psql("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'leaky-worker' "
    .. "AND state = 'idle in transaction'")))
end

-- n sessions that BEGIN, touch a table and then wait for two minutes.
local leakers = {}
local function leak(n)
  for _ = 1, n do
    local p = io.popen(("sh -c \"(printf 'BEGIN;\\nSELECT count(*) FROM tasks;\\n'; sleep 120) | PGAPPNAME=leaky-worker "
      .. "psql -X -q %s\" >/dev/null 2>&1 & echo $!"):format(sb.env("DATABASE_URL")))
    leakers[#leakers + 1] = p:read("l")
    p:close()
  end
  assert(sb.wait_until(10, function() return leaked() == n end), "the leaking sessions did not start")
  sb.sleep(2) -- idle for longer than the specs' idle_for of 1s
end

local function running()
  return tonumber((sb.psql("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'long-report' "
    .. "AND state = 'active'")))
end

-- A session that runs a ten-minute query, then stays connected (idle).
local function long_query()
  local p = io.popen(("sh -c \"(printf 'SELECT pg_sleep(600);\\n'; sleep 120) | PGAPPNAME=long-report "
    .. "psql -X -q %s\" >/dev/null 2>&1 & echo $!"):format(sb.env("DATABASE_URL")))
  leakers[#leakers + 1] = p:read("l")
  p:close()
  assert(sb.wait_until(10, function() return running() == 1 end), "the long query did not start")
  sb.sleep(2) -- running for longer than the specs' running_for of 1s
end

local function stop_leaks()
  sb.psql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name IN ('leaky-worker', 'long-report')")
  for _, pid in ipairs(leakers) do os.execute(("pkill -P %s; kill %s 2>/dev/null"):format(pid, pid)) end
  leakers = {}
end

describe("db-pool-exhausted", function()
  after_each(function()
    stop_leaks()
    cli.cleanup()
  end)

  it("ends the sessions stuck idle in a transaction, and the connections come down", function()
    leak(4)
    local before = tonumber((sb.psql("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()")))
    local r = cli.run { "run", RUNBOOK, "-p", "idle_for=1s", "--yes" }
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("ended 4 sessions", r.stdout)
    assert.matches("leaky%-worker", r.stdout)
    -- checked with psql: none left, and fewer connections
    assert.are.equal(0, leaked())
    assert.is_true(tonumber((sb.psql("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"))) <= before - 4)
  end)

  it("cancels a query running for longer than running_for, and lists it among the longest-running", function()
    long_query()
    local r = cli.run { "run", RUNBOOK, "-p", "running_for=1s", "--yes" }
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("pid %d+ %(long%-report, todo from [^)]+%) running a query for [%d.]+s: SELECT pg_sleep%(600%)", r.stdout)
    assert.matches("cancelled 1 query", r.stdout)
    -- checked with psql: the session is still there, its query is not
    assert.are.equal(0, running())
    assert.are.equal("1", sb.psql("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'long-report'"):match("%d+"))
  end)

  it("leaves sessions younger than idle_for, and other users' sessions", function()
    leak(2)
    local r = cli.run { "run", RUNBOOK, "-p", "idle_for=10m", "--yes" }
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    r = cli.run { "run", RUNBOOK, "-p", "idle_for=1s", "-p", "user=todo_readonly", "--yes" }
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.are.equal(2, leaked())
  end)

  it("raises the app's pool as the seed does (set env, rolling restart)", function()
    finally(kh.reset_world)
    local r = cli.run { "run", RUNBOOK, "-p", "pool_size=30", "-p", "max_overflow=20", "--yes" }
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    local env = {}
    for _, e in ipairs(kh.deployment("backend").spec.template.spec.containers[1].env or {}) do env[e.name] = e.value end
    assert.are.same({ "30", "20" }, { env.DB_POOL_SIZE, env.DB_MAX_OVERFLOW })
    assert.truthy(kh.wait_rolled_out("backend"))
  end)

  it("changes nothing in a dry run: the stuck sessions and the long query stay", function()
    leak(2)
    long_query()
    local r = backends.assert_unchanged(function()
      return cli.run { "run", RUNBOOK, "-p", "idle_for=1s", "-p", "running_for=1s", "-p", "pool_size=30", "--dry-run" }
    end)
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("would .*pg_terminate_backend", r.stdout)
    assert.matches("would .*pg_cancel_backend", r.stdout)
    assert.are.equal(2, leaked())
    assert.are.equal(1, running())
  end)

  it("names a NetworkPolicy that denies the app's egress to the database, and shows its Secret masked", function()
    local url = sb.env("DATABASE_URL")
    local password, port = url:match("^postgresql://[^:]+:([^@]+)@[^:]+:(%d+)/")
    local function policy(name, egress)
      return require("cjson").encode { apiVersion = "networking.k8s.io/v1", kind = "NetworkPolicy",
        metadata = { name = name, namespace = kh.NS },
        spec = { podSelector = { matchLabels = { ["app.kubernetes.io/component"] = "backend" } },
          policyTypes = { "Egress" }, egress = egress } }
    end
    finally(function() sb.kubectl("-n todo-chatbot delete networkpolicy deny-db-egress allow-db-egress --ignore-not-found") end)
    -- the fault: the backend's pods may only resolve names
    local out, ok = sb.kubectl("apply -f -", policy("deny-db-egress", { { ports = { { protocol = "UDP", port = 53 } } } }))
    assert(ok, out)
    local r = backends.assert_unchanged(function() return cli.run { "run", RUNBOOK, "--dry-run" } end)
    assert.are.equal(1, r.code, r.stdout .. r.stderr)
    assert.matches("the app cannot reach the database: networkpolicy deny%-db%-egress selects the pods of "
      .. "todo%-chatbot%-backend and allows no egress to 127%.0%.0%.1:" .. port, r.stdout .. r.stderr)
    -- kubectl: that policy restricts the backend pods' egress
    out = sb.kubectl("-n todo-chatbot get networkpolicy deny-db-egress -o jsonpath='{.spec.policyTypes[0]} {.spec.podSelector.matchLabels}'")
    assert.matches('^Egress {"app.kubernetes.io/component":"backend"}', out)

    -- a second policy that allows the database's address and port: egress is allowed where any policy allows it
    out, ok = sb.kubectl("apply -f -", policy("allow-db-egress",
      { { to = { { ipBlock = { cidr = "127.0.0.0/8" } } }, ports = { { protocol = "TCP", port = tonumber(port) } } } }))
    assert(ok, out)
    r = cli.run { "run", RUNBOOK, "--dry-run" }
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("networkpolicy allow%-db%-egress allows egress to 127%.0%.0%.1:" .. port, r.stdout)
    assert.matches("postgres from deploy/todo%-chatbot%-backend: answers", r.stdout)
    -- the Secret the app reads, masked: the URL without its password, other values by size
    assert.matches("the app's DATABASE_URL %(secret todo%-chatbot%-secrets, key DATABASE_URL%): postgresql://todo:%*%*%*@127%.0%.0%.1:"
      .. port .. "/todo", r.stdout)
    assert.matches("JWT_SECRET: %(%d+ bytes%)", r.stdout)
    assert.falsy((r.stdout .. r.stderr):find(password, 1, true), "the password printed")
  end)

  it("reads a database StatefulSet's pods, logs and disk, and restarts it when asked; a dry run leaves it", function()
    finally(function() sb.kubectl("-n todo-chatbot delete statefulset postgres --ignore-not-found") end)
    local out, ok = sb.kubectl("apply -f -", require("cjson").encode { apiVersion = "apps/v1", kind = "StatefulSet",
      metadata = { name = "postgres", namespace = kh.NS, labels = { app = "postgres" } },
      spec = { replicas = 1, serviceName = "postgres", selector = { matchLabels = { app = "postgres" } },
        template = { metadata = { labels = { app = "postgres" } }, spec = { containers = {
          { name = "postgres", image = "postgres:15-alpine", ports = { { containerPort = 5432 } } } } } } } })
    assert(ok, out)
    local function pod()
      local o, k = sb.kubectl("-n todo-chatbot get pod postgres-0 -o jsonpath='{.metadata.uid} {.status.conditions[?(@.type==\"Ready\")].status}'")
      return k and o:match("^(%S+) True") or nil
    end
    local uid = sb.wait_until(30, pod)
    assert(uid, "postgres-0 never became ready")
    local function run(mode)
      return cli.run { "run", RUNBOOK, "-p", "db_workload=statefulset/postgres", "-p", "restart_db=true", mode }
    end
    local r = run("--dry-run")
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("database pod postgres%-0: Running, ready, 0 restarts", r.stdout)
    assert.matches("starting postgres", r.stdout)                       -- its log
    assert.matches("df %-h: the fullest filesystem is %S+ at %d+%%", r.stdout)
    assert.matches("would delete pod postgres%-0", r.stdout)
    assert.are.equal(uid, pod())
    r = run("--yes")
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("statefulset/postgres: every pod restarted and ready", r.stdout)
    -- kubectl: a new postgres-0, ready
    local new = sb.wait_until(30, pod)
    assert.truthy(new and new ~= uid, "postgres-0 was not replaced")
  end)
end)
