-- runbooks/restore.lua against the sandbox: rows are corrupted with psql, the
-- runbook restores the set backup.lua took, and psql and curl to the
-- Kubernetes API (never runbook's own modules) check the data and the writers.
local cli = require("spec.support.cli")
local backends = require("spec.support.backends")
local sb = require("spec.sandbox.sandbox_helper")
local kh = require("spec.runbooks.k8s_helper")

local RUNBOOK = "runbooks/restore.lua"

local function psql(sql)
  local out, ok = sb.psql(sql)
  assert(ok, out)
  return out:gsub("%s+$", "")
end

local function counts()
  return psql("SELECT (SELECT count(*) FROM tasks) || ' ' || (SELECT count(*) FROM audit_log) || ' ' ||"
    .. " (SELECT count(*) FROM tasks WHERE user_id IS NULL) || ' ' || (SELECT md5(string_agg(t::text, ',' ORDER BY id)) FROM tasks t)")
end

local function replicas()
  return { kh.deployment("backend").spec.replicas, kh.deployment("recurring-task").spec.replicas }
end

-- A backup set of the database as it is now, taken by backup.lua.
local function backup(dir)
  local r = cli.run { "run", "runbooks/backup.lua", "--yes", "-p", "dir=" .. dir }
  assert(r.code == 0, r.stdout .. r.stderr)
  return (sb.sh("ls -d " .. sb.quote(dir) .. "/todo-2*"):gsub("%s+$", ""))
end

-- The seed-002 corruption: tasks lost their owner, and audit entries vanished.
local function corrupt()
  psql("UPDATE tasks SET user_id = NULL WHERE id % 7 = 0")
  psql("DELETE FROM audit_log WHERE sequence_number > 5000")
end

describe("restore", function()
  local dir, set, good, before
  before_each(function()
    dir = cli.tmpdir()
    good = counts()
    set = backup(dir)
    before = replicas()
  end)
  after_each(function()
    -- the sandbox as it was, whatever a test left: the good data and the writers
    sb.sh("pg_restore --clean --if-exists --single-transaction --no-owner -d " .. sb.quote(sb.env("DATABASE_URL"))
      .. " " .. sb.quote(set .. "/database.dump"))
    sb.k8s("PATCH", "/apis/apps/v1/namespaces/todo-chatbot/deployments/todo-chatbot-backend", { spec = { replicas = before[1] } })
    sb.k8s("PATCH", "/apis/apps/v1/namespaces/todo-chatbot/deployments/todo-chatbot-recurring-task", { spec = { replicas = before[2] } })
    cli.cleanup()
  end)

  it("restores corrupted rows from the newest set, with a safety backup, and brings the writers back", function()
    corrupt()
    assert.are_not.equal(good, counts())
    local r = cli.run { "run", RUNBOOK, "--yes", "-p", "dir=" .. dir }
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.are.equal(good, counts())
    assert.are.equal("0", psql("SELECT count(*) FROM tasks WHERE user_id IS NULL"))
    assert.matches("scale deployment todo%-chatbot%-backend to 0", r.stdout)
    assert.are.same(before, replicas())
    assert.truthy(kh.wait_rolled_out("backend"))
    -- the corrupted state was kept: its dump holds the 1000 rows fewer
    local safety = sb.sh("ls -d " .. sb.quote(dir) .. "/todo-pre-restore-2*"):gsub("%s+$", "")
    local list, ok = sb.sh("pg_restore --list " .. sb.quote(safety .. "/database.dump"))
    assert.is_true(ok, list)
    local m = require("cjson").decode((sb.sh("cat " .. sb.quote(safety .. "/database.dump.manifest.json"))))
    assert.are.equal(5000, m.tables["public.audit_log"])
  end)

  it("with kubernetes=true and topics: deleted objects and a topic come back beside the database", function()
    local r = cli.run { "run", "runbooks/backup.lua", "--yes", "-p", "dir=" .. dir, "-p", "kubernetes=true", "-p", "topics=reminders-dlq" }
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    local full = (sb.sh("ls -d " .. sb.quote(dir) .. "/todo-2* | tail -1"):gsub("%s+$", ""))
    assert(sb.kubectl("-n todo-chatbot delete configmap todo-chatbot-config"))
    assert(sb.kubectl("-n todo-chatbot delete service todo-chatbot-frontend"))
    corrupt()
    local target = ("restore-spec-%d-%d"):format(os.time(), math.random(1e6))
    sb.kcat("-L -t " .. target) -- an empty topic, as a new cluster's (the mock brokers create it)
    r = cli.run { "run", RUNBOOK, "--yes", "-p", "set=" .. full, "-p", "safety_backup=false", "-p", "kubernetes=true",
      "-p", "topics=reminders-dlq=" .. target }
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.are.equal(good, counts())
    assert.matches("LOG_LEVEL", (sb.kubectl("-n todo-chatbot get configmap todo-chatbot-config -o jsonpath='{.data}'")))
    assert.is_true(select(2, sb.kubectl("-n todo-chatbot get service todo-chatbot-frontend")))
    local m = require("cjson").decode((sb.sh("cat " .. sb.quote(full .. "/manifest.json"))))
    local out = sb.kcat(("-C -t %s -e -q -f '%%o\\n'"):format(target))
    local n = 0
    for _ in out:gmatch("[^\n]+") do n = n + 1 end
    assert.are.equal(m.kafka.topics["reminders-dlq"], n)
    assert.are.same(before, replicas())
  end)

  it("on a terminal: the operator keeps the writers running and confirms the restore; nothing is scaled", function()
    corrupt()
    -- the two confirm steps ask: Stop writes (no), Restore the database (yes)
    local code, out = cli.pty("n,y", { "run", RUNBOOK, "-p", "dir=" .. dir, "-p", "safety_backup=false" })
    assert.are.equal(0, code, out)
    assert.truthy(out:find("Stop writes skipped (by the operator)", 1, true), out)
    assert.truthy(out:find("Start writes skipped", 1, true), out)
    assert.falsy(out:find("scale deployment", 1, true), out)
    assert.are.equal(good, counts())
    assert.are.same(before, replicas())
  end)

  it("refuses a set whose dump does not match its manifest, before stopping anything", function()
    corrupt()
    local damaged = counts()
    local dump = sb.quote(set .. "/database.dump")
    assert(sb.sh(("cp %s %s.good && printf 'XXXX' | dd of=%s bs=1 seek=2000 conv=notrunc 2>/dev/null"):format(dump, dump, dump)))
    local rv = kh.deployment("backend").metadata.resourceVersion
    local r = cli.run { "run", RUNBOOK, "--yes", "-p", "set=" .. set }
    assert.are.equal(1, r.code, r.stdout .. r.stderr)
    assert.matches("database.dump does not match the manifest", r.stdout .. r.stderr)
    assert.are.equal(damaged, counts())
    assert.are.equal(rv, kh.deployment("backend").metadata.resourceVersion)
    sb.sh(("mv %s.good %s"):format(dump, dump)) -- the good dump back, for after_each
  end)

  it("brings the writers back when validation fails", function()
    local r = cli.run { "run", RUNBOOK, "--yes", "-p", "dir=" .. dir, "-p", "safety_backup=false",
      "-p", "validate=SELECT count(*) FROM users WHERE id < 0; SELECT count(*) FROM tasks WHERE id <= 3" }
    assert.are.equal(1, r.code, r.stdout .. r.stderr)
    assert.matches("not valid: SELECT count%(%*%) FROM tasks WHERE id <= 3 returned 3, expected 0", r.stdout .. r.stderr)
    assert.matches("scale deployment todo%-chatbot%-backend to 2", r.stdout)
    assert.are.same(before, replicas())
  end)

  it("changes nothing in a dry run, and says what it would do", function()
    corrupt()
    local damaged = counts()
    local r = backends.assert_unchanged(function()
      return cli.run { "run", RUNBOOK, "--dry-run", "-p", "dir=" .. dir }
    end)
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("would scale deployment todo%-chatbot%-backend to 0", r.stdout)
    assert.matches("would restore [^\n]*database.dump into todo", r.stdout)
    assert.matches("public.audit_log has 5000 rows, the backup 6000", r.stdout)
    assert.are.equal(damaged, counts())
  end)
end)
