-- runbooks/disaster-recovery.lua against the sandbox: backup.lua takes a set
-- with the namespace's objects, its Secrets and a topic; then the namespace
-- is deleted (or some of its objects) and a table truncated, and kubectl, psql
-- and kcat (never runbook's own modules) check that the runbook brought them
-- back, and that its dry run changed nothing.
local cli = require("spec.support.cli")
local backends = require("spec.support.backends")
local json = require("json")
local sb = require("spec.sandbox.sandbox_helper")
local kh = require("spec.runbooks.k8s_helper")

local RUNBOOK = "runbooks/disaster-recovery.lua"
local NS = "todo-chatbot"

local function psql(sql)
  local out, ok = sb.psql(sql)
  assert(ok, out)
  return out:gsub("%s+$", "")
end

local function kubectl(args)
  local out, ok = sb.kubectl(args)
  assert(ok, "kubectl " .. args .. ": " .. out)
  return out
end

local function rows() return psql("SELECT (SELECT count(*) FROM tasks) || ' ' || (SELECT md5(string_agg(t::text, ',' ORDER BY id)) FROM tasks t)") end

-- Each deployment of the namespace with its replicas, and the names of its Services, ConfigMaps and Secrets, as kubectl lists them.
local function objects()
  local out = {}
  for _, kind in ipairs { "deployments", "services", "configmaps", "secrets", "ingresses", "hpa" } do
    local list = json.decode(kubectl(("-n %s get %s -o json"):format(NS, kind))).items
    for _, o in ipairs(list) do
      out[#out + 1] = kind .. "/" .. o.metadata.name .. (kind == "deployments" and (" " .. o.spec.replicas) or "")
    end
  end
  table.sort(out)
  return table.concat(out, "\n")
end

-- The messages of a topic as kcat reads them: "key value" lines, sorted.
local function messages(topic) return sb.topic_lines(topic, "%k %s\\n") end

describe("disaster-recovery", function()
  local dir, set, good, before, topic
  setup(function()
    dir = cli.tmpdir()
    topic = ("dr-spec-%d-%d"):format(os.time(), math.random(1e6))
    local lines = {}
    for i = 1, 20 do lines[i] = ("k%d:v%d"):format(i, i) end
    assert(select(2, sb.sh(("printf '%s\\n' | timeout 20 kcat -b %s -P -t %s -K:"):format(table.concat(lines, "\\n"),
      sb.quote(sb.env("KAFKA_BROKERS")), topic))))
    good, before = rows(), objects()
    local r = cli.run { "run", "runbooks/backup.lua", "--yes", "-p", "dir=" .. dir, "-p", "kubernetes=true",
      "-p", "secrets=true", "-p", "topics=" .. topic }
    assert(r.code == 0, r.stdout .. r.stderr)
    set = (sb.sh("ls -d " .. sb.quote(dir) .. "/todo-2*"):gsub("%s+$", ""))
  end)
  teardown(function()
    sb.sh("pg_restore --clean --if-exists --single-transaction --no-owner -d " .. sb.quote(sb.env("DATABASE_URL"))
      .. " " .. sb.quote(set .. "/database.dump"))
    kh.reset_world()
    cli.cleanup()
  end)

  it("refuses when nothing of the set is missing or failing, and changes nothing", function()
    local rv = kh.deployment("backend").metadata.resourceVersion
    local r = cli.run { "run", RUNBOOK, "--yes", "-p", "set=" .. set }
    assert.are.equal(1, r.code, r.stdout .. r.stderr)
    assert.matches("nothing of the set is missing or failing", r.stdout .. r.stderr)
    assert.are.equal(rv, kh.deployment("backend").metadata.resourceVersion)
  end)

  it("a partial outage: its dry run changes nothing; then the deleted objects come back", function()
    kubectl(("-n %s delete deployment todo-chatbot-frontend"):format(NS))
    kubectl(("-n %s delete service todo-chatbot-frontend"):format(NS))
    kubectl(("-n %s delete configmap todo-chatbot-config"):format(NS))
    local r = backends.assert_unchanged(function()
      return cli.run { "run", RUNBOOK, "--dry-run", "-p", "set=" .. set }
    end)
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("3 of the set's %d+ objects are missing: ConfigMap/todo%-chatbot%-config, Service/todo%-chatbot%-frontend, Deployment/todo%-chatbot%-frontend", r.stdout)
    assert.matches("would apply deployment todo%-chatbot%-frontend", r.stdout)
    assert.are_not.equal(before, objects())
    r = cli.run { "run", RUNBOOK, "--yes", "-p", "set=" .. set }
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.are.equal(before, objects())
    assert.truthy(kh.wait_rolled_out("frontend"))
    assert.are.equal(200, kh.health("frontend", 3000))
  end)

  it("a lost namespace and a truncated table: objects, Secrets, rows and the topic come back, in dependency order", function()
    kubectl("delete namespace " .. NS .. " --wait=true")
    assert.truthy(sb.wait_until(20, function() return not select(2, sb.kubectl("get namespace " .. NS)) end), "namespace not gone")
    psql("TRUNCATE tasks CASCADE")
    -- the new cluster's topic exists, empty (kcat's metadata request creates it on the mock brokers)
    local target = topic .. "-new"
    sb.kcat("-L -t " .. target)
    local r = cli.run { "run", RUNBOOK, "--yes", "-p", "set=" .. set, "-p", ("topics=%s,%s=%s"):format(topic, topic, target) }
    local out = r.stdout .. r.stderr
    assert.are.equal(0, r.code, out)
    assert.matches("namespace todo%-chatbot is gone", out)
    assert.matches("public.tasks has 0 rows, the backup 3000", out)
    -- dependency order: the namespace, Secrets and ConfigMaps, then Services, then deployments; the data after them
    local order = {}
    for _, what in ipairs { "apply namespace todo-chatbot", "apply secret todo-chatbot-secrets", "apply configmap todo-chatbot-config",
        "apply service todo-chatbot-backend", "apply deployment todo-chatbot-backend", "database.dump into todo",
        "restore 20 messages" } do
      order[#order + 1] = assert(out:find(what, 1, true), what .. " not in the output\n" .. out)
    end
    for i = 2, #order do assert.truthy(order[i - 1] < order[i], out) end
    assert.are.equal(before, objects())
    assert.matches("DATABASE_URL", kubectl(("-n %s get secret todo-chatbot-secrets -o jsonpath='{.data}'"):format(NS)))
    for _, app in ipairs { "backend", "frontend", "websocket", "recurring-task", "notification" } do
      assert.truthy(kh.wait_rolled_out(app), app)
    end
    assert.are.equal(200, kh.health("backend", 8000))
    assert.are.equal(good, rows())
    -- the topic that still held its messages was kept; the new one holds the set's
    assert.matches("topic " .. topic:gsub("%-", "%%-") .. " kept as it was", out)
    assert.are.same(messages(topic), messages(target))
    assert.are.equal(20, #messages(target))
  end)
end)
