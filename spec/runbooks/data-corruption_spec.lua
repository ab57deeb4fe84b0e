-- runbooks/data-corruption.lua against the sandbox: tasks lose their owner
-- (seed 002's check) after a good backup was taken; the runbook finds it,
-- restores the good set and resumes writes. psql and curl to the Kubernetes
-- API check the outcome, never runbook's own modules.
local cli = require("spec.support.cli")
local backends = require("spec.support.backends")
local sb = require("spec.sandbox.sandbox_helper")
local kh = require("spec.runbooks.k8s_helper")

local RUNBOOK = "runbooks/data-corruption.lua"

local function psql(sql)
  local out, ok = sb.psql(sql)
  assert(ok, out)
  return (out:gsub("%s+$", ""))
end

local function state()
  return psql("SELECT (SELECT count(*) FROM tasks WHERE user_id IS NULL) || ' ' || (SELECT count(*) FROM audit_log)"
    .. " || ' ' || (SELECT md5(string_agg(t::text, ',' ORDER BY id)) FROM tasks t)")
end

local function replicas()
  return { kh.deployment("backend").spec.replicas, kh.deployment("recurring-task").spec.replicas }
end

local function sets(dir, pattern)
  local out = sb.sh("ls " .. sb.quote(dir))
  local names = {}
  for n in out:gmatch("[^\n]+") do if n:match(pattern) then names[#names + 1] = n end end
  table.sort(names)
  return names
end

local function backup(dir)
  local r = cli.run { "run", "runbooks/backup.lua", "--yes", "-p", "dir=" .. dir }
  assert(r.code == 0, r.stdout .. r.stderr)
end

local function corrupt()
  psql("UPDATE tasks SET user_id = NULL WHERE id % 5 = 0")
end

describe("data-corruption", function()
  local dir, good, good_dump, before
  before_each(function()
    dir = cli.tmpdir()
    good = state()
    backup(dir)
    good_dump = dir .. "/" .. sets(dir, "^todo%-2")[1] .. "/database.dump"
    before = replicas()
  end)
  after_each(function()
    sb.sh("pg_restore --clean --if-exists --single-transaction --no-owner -d " .. sb.quote(sb.env("DATABASE_URL"))
      .. " " .. sb.quote(good_dump))
    sb.k8s("PATCH", "/apis/apps/v1/namespaces/todo-chatbot/deployments/todo-chatbot-backend", { spec = { replicas = before[1] } })
    sb.k8s("PATCH", "/apis/apps/v1/namespaces/todo-chatbot/deployments/todo-chatbot-recurring-task", { spec = { replicas = before[2] } })
    cli.cleanup()
  end)

  it("restores the newest set taken before the corruption, keeps the corrupted state, and resumes writes", function()
    local good_set = sets(dir, "^todo%-2")[1]
    sb.sleep(1.1)
    corrupt()
    backup(dir) -- a later, already corrupted set the runbook must not pick
    local bad_set = sets(dir, "^todo%-2")[2]
    assert.is_not_nil(bad_set)
    local corrupted = state()
    local r = cli.run { "run", RUNBOOK, "--yes", "-p", "dir=" .. dir,
      "-p", "before=" .. bad_set:match("%-(%d+T%d+Z)$") }
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("user_id IS NULL %-> 600", r.stdout)
    assert.matches("good backup: [^\n]*" .. good_set:gsub("%p", "%%%0"), r.stdout)
    assert.are.equal(good, state())
    assert.are.equal("0", psql("SELECT count(*) FROM tasks WHERE user_id IS NULL"))
    assert.are.same(before, replicas())
    assert.truthy(kh.wait_rolled_out("backend"))
    -- the corrupted database was kept, and restoring it would give the corruption back
    local kept = sets(dir, "^todo%-corrupted%-")
    assert.are.equal(1, #kept)
    local m = require("cjson").decode((sb.sh("cat " .. sb.quote(dir .. "/" .. kept[1] .. "/manifest.json"))))
    assert.are.equal(3000, m.database.tables["public.tasks"])
    assert.are_not.equal(good, corrupted)
  end)

  it("seed 001's data loss: finds the audit log's gap, restores, and sets the consumers back to replay the events since", function()
    -- a topic and a consumer group of this test's own, committed at the end of the topic (everything processed)
    local topic, group = ("dl-spec-%d-%d"):format(os.time(), math.random(1e6)), "dl-spec-group"
    local function produce(from, to)
      local lines = {}
      for i = from, to do lines[#lines + 1] = ("k%d:event-%d"):format(i, i) end
      assert(select(2, sb.sh(("printf '%s\\n' | timeout 20 kcat -b %s -P -t %s -K:"):format(table.concat(lines, "\\n"),
        sb.quote(sb.env("KAFKA_BROKERS")), topic))))
    end
    local commit = cli.runbook(([[
name = "commit-latest"
description = "the group has processed everything"
replaces = {}
step "commit" { run = function() kafka.reset_offsets { group = %q, topics = { %q }, to = "latest" } end }
]]):format(group, topic))
    local function processed() assert.are.equal(0, cli.run({ "run", commit, "--yes" }).code) end
    produce(1, 30)
    processed()
    local r = cli.run { "run", "runbooks/backup.lua", "--yes", "-p", "dir=" .. dir, "-p", ("groups=%s:%s"):format(group, topic) }
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    local set = dir .. "/" .. sets(dir, "^todo%-2")[#sets(dir, "^todo%-2")]
    local function committed()
      local out = {}
      for _, part in ipairs(select(2, sb.lag(group, topic))) do out[part.partition] = part.committed end
      return out
    end
    local at_backup = committed()
    -- 10 more events processed; then their rows, and the audit entries 101..110, are lost
    produce(31, 40)
    processed()
    assert.are.equal(0, (sb.lag(group, topic)))
    psql("DELETE FROM audit_log WHERE sequence_number BETWEEN 101 AND 110")
    r = cli.run { "run", RUNBOOK, "--yes", "-p", "dir=" .. dir, "-p", "set=" .. set }
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("audit_log.sequence_number is missing 101%-110", r.stdout)
    assert.are.equal(good, state())
    assert.are.equal("6000 0", psql("SELECT count(*) || ' ' || (SELECT count(*) FROM (SELECT sequence_number - lag(sequence_number)"
      .. " OVER (ORDER BY sequence_number) AS d FROM audit_log) x WHERE d > 1) FROM audit_log"))
    -- the group is back where it was at the backup: the 10 events since are to be processed again
    assert.are.equal(10, (sb.lag(group, topic)))
    assert.are.same(at_backup, committed())
    assert.are.same(before, replicas())
  end)

  it("on a terminal: the operator keeps the writers running and confirms the restore; nothing is scaled", function()
    sb.sleep(1.1)
    corrupt()
    -- the two confirm steps ask: Stop writes (no), Restore the good backup (yes)
    local code, out = cli.pty("n,y", { "run", RUNBOOK, "-p", "dir=" .. dir })
    assert.are.equal(0, code, out)
    assert.truthy(out:find("Stop writes skipped (by the operator)", 1, true), out)
    assert.truthy(out:find("Resume writes skipped (it needs 'Stop writes', which was skipped)", 1, true), out)
    assert.falsy(out:find("scale deployment", 1, true), out)
    assert.are.equal(good, state())
    assert.are.same(before, replicas())
  end)

  it("stops without touching anything when no check finds corruption", function()
    local rv = kh.deployment("backend").metadata.resourceVersion
    local r = cli.run { "run", RUNBOOK, "--yes", "-p", "dir=" .. dir }
    assert.are.equal(1, r.code, r.stdout .. r.stderr)
    assert.matches("no check finds corruption", r.stdout .. r.stderr)
    assert.are.equal(rv, kh.deployment("backend").metadata.resourceVersion)
    assert.are.same({}, sets(dir, "corrupted"))
  end)

  it("changes nothing in a dry run, and says what it would do", function()
    corrupt()
    local corrupted = state()
    local r = backends.assert_unchanged(function()
      return cli.run { "run", RUNBOOK, "--dry-run", "-p", "dir=" .. dir }
    end)
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("would scale deployment todo%-chatbot%-recurring%-task to 0", r.stdout)
    assert.matches("would restore [^\n]*database.dump into todo", r.stdout)
    assert.matches("user_id IS NULL returned 600, expected 0", r.stdout)
    assert.are.equal(corrupted, state())
    assert.are.same({}, sets(dir, "corrupted"))
  end)
end)
