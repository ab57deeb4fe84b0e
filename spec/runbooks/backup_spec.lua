-- runbooks/backup.lua against the sandbox: the set it writes is checked with
-- sha256sum, pg_restore and psql (never through runbook's own modules), old
-- sets are pruned, and a dry run writes and deletes nothing.
local cli = require("spec.support.cli")
local backends = require("spec.support.backends")
local sb = require("spec.sandbox.sandbox_helper")

local RUNBOOK = "runbooks/backup.lua"

local function ls(dir)
  local out = sb.sh("ls -A " .. sb.quote(dir))
  local names = {}
  for n in out:gmatch("[^\n]+") do names[#names + 1] = n end
  table.sort(names)
  return names
end

local function read(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("a")
  f:close()
  return s
end

-- Two old sets, as earlier runs left them.
local function old_sets(dir)
  for _, stamp in ipairs { "20200101T000000Z", "20200102T000000Z" } do
    assert(sb.sh(("mkdir -p %s/todo-%s && echo old > %s/todo-%s/manifest.json"):format(dir, stamp, dir, stamp)))
  end
end

local function psql_count(tbl)
  local out, ok = sb.psql("SELECT count(*) FROM " .. tbl)
  assert(ok, out)
  return tonumber(out:match("%d+"))
end

describe("backup", function()
  after_each(cli.cleanup)

  it("writes one verified set (database, Kubernetes configuration, a topic) and keeps the newest N", function()
    local dir = cli.tmpdir()
    old_sets(dir)
    local r = cli.run { "run", RUNBOOK, "--yes", "-p", "dir=" .. dir, "-p", "keep=2", "-p", "kubernetes=true",
      "-p", "topics=reminders-dlq" }
    assert.are.equal(0, r.code, r.stdout .. r.stderr)

    local names = ls(dir)
    assert.are.equal(2, #names, table.concat(names, " "))
    assert.are.equal("todo-20200102T000000Z", names[1]) -- the oldest went, through the gate
    local set = dir .. "/" .. names[2]
    assert.matches("^todo%-%d+T%d+Z$", names[2])
    assert.matches("delete backup set " .. dir:gsub("%p", "%%%0") .. "/todo%-20200101T000000Z", r.stdout)

    -- every file the manifest lists has the sha256 and size sha256sum and stat give
    local m = require("cjson").decode(read(set .. "/manifest.json"))
    local paths = {}
    for _, f in ipairs(m.files) do
      paths[f.path] = true
      local sum = sb.sh("sha256sum " .. sb.quote(set .. "/" .. f.path)):match("^(%x+)")
      assert.are.equal(sum, f.sha256, f.path)
      assert.are.equal(tonumber(sb.sh("stat -c %s " .. sb.quote(set .. "/" .. f.path)):match("%d+")), f.size)
    end
    for _, p in ipairs { "database.dump", "k8s/deployments.yaml", "k8s/services.yaml", "k8s/configmaps.yaml",
        "k8s/hpas.yaml", "k8s/ingresses.yaml", "k8s/dapr-components.yaml", "kafka/reminders-dlq.jsonl" } do
      assert.is_true(paths[p], p .. " missing from the manifest")
    end
    assert.is_nil(paths["k8s/secrets.yaml"]) -- secrets only when asked for
    assert.are.equal("700", (sb.sh("stat -c %a " .. sb.quote(set)):gsub("%s+$", ""))) -- the owner's only

    -- the dump reads back and holds the tables; the counts are the database's
    local list, ok = sb.sh("pg_restore --list " .. sb.quote(set .. "/database.dump"))
    assert.is_true(ok, list)
    assert.matches("TABLE DATA public tasks", list)
    for _, t in ipairs { "tasks", "users", "audit_log", "checkpoints" } do
      assert.are.equal(psql_count(t), m.database.tables["public." .. t], t)
    end
    assert.are.equal(25, m.kafka.topics["reminders-dlq"])
    local _, lines = read(set .. "/kafka/reminders-dlq.jsonl"):gsub("\n", "")
    assert.are.equal(25, lines)
    assert.matches("name: todo%-chatbot%-backend", read(set .. "/k8s/deployments.yaml"))
    assert.is_nil(read(set .. "/k8s/deployments.yaml"):find("resourceVersion", 1, true))
  end)

  it("backs up Secrets only with secrets=true, and never prints them", function()
    local dir = cli.tmpdir()
    local status, list = sb.k8s("GET", "/api/v1/namespaces/todo-chatbot/secrets")
    assert.are.equal(200, status)
    assert.is_true(#list.items > 0)
    local r = cli.run { "run", RUNBOOK, "--yes", "-p", "dir=" .. dir, "-p", "kubernetes=true", "-p", "secrets=true" }
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    local set = (sb.sh("ls -d " .. sb.quote(dir) .. "/todo-2*"):gsub("%s+$", ""))
    local text = read(set .. "/k8s/secrets.yaml")
    for _, secret in ipairs(list.items) do
      assert.matches("name: " .. secret.metadata.name:gsub("%p", "%%%0"), text)
      for _, v in pairs(secret.data or {}) do
        assert.truthy(text:find(v, 1, true))
        assert.is_nil((r.stdout .. r.stderr):find(v, 1, true))
      end
    end
    local r2 = cli.run { "run", RUNBOOK, "--yes", "-p", "dir=" .. dir, "-p", "secrets=true" }
    assert.are.equal(1, r2.code)
    assert.matches("secrets: needs kubernetes=true", r2.stdout .. r2.stderr)
  end)

  it("seed 004's configuration backup, encrypted: openssl enc decrypts it; restore reads it with the passphrase, and refuses a wrong one", function()
    local dir = cli.tmpdir()
    local env = { BACKUP_PASSPHRASE = "correct horse battery staple" }
    local r = cli.run({ "run", RUNBOOK, "--yes", "-p", "dir=" .. dir, "-p", "kubernetes=true", "-p", "secrets=true",
      "-p", "encrypt=true" }, env)
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    local set = (sb.sh("ls -d " .. sb.quote(dir) .. "/todo-2*"):gsub("%s+$", ""))
    assert.is_nil(io.open(set .. "/k8s/secrets.yaml"), "a plaintext secrets.yaml")
    local status, list = sb.k8s("GET", "/api/v1/namespaces/todo-chatbot/secrets")
    assert.are.equal(200, status)
    local value = select(2, next(list.items[1].data))
    assert.is_nil(read(set .. "/k8s/secrets.yaml.enc"):find(value, 1, true))
    -- openssl, not this program, decrypts it: the Secrets, as the API gives them
    local text, ok = sb.sh("BACKUP_PASSPHRASE=" .. sb.quote(env.BACKUP_PASSPHRASE) .. " openssl enc -d -aes-256-cbc -pbkdf2"
      .. " -iter 100000 -md sha256 -pass env:BACKUP_PASSPHRASE -in " .. sb.quote(set .. "/k8s/secrets.yaml.enc"))
    assert.is_true(ok, text)
    assert.matches("name: " .. list.items[1].metadata.name:gsub("%p", "%%%0"), text)
    assert.truthy(text:find(value, 1, true))
    -- restore's dry run reads the encrypted objects with the passphrase; a wrong one is refused, naming the file
    local d = cli.run({ "run", "runbooks/restore.lua", "--dry-run", "-p", "set=" .. set, "-p", "kubernetes=true" }, env)
    assert.are.equal(0, d.code, d.stdout .. d.stderr)
    assert.matches("would apply secret todo%-chatbot%-secrets", d.stdout)
    local w = cli.run({ "run", "runbooks/restore.lua", "--dry-run", "-p", "set=" .. set, "-p", "kubernetes=true" },
      { BACKUP_PASSPHRASE = "not-the-passphrase" })
    assert.are.equal(1, w.code, w.stdout .. w.stderr)
    assert.matches("%.yaml%.enc cannot be decrypted: a wrong passphrase", w.stdout .. w.stderr)
  end)

  it("stops before writing anything when the destination has too little room", function()
    local dir = cli.tmpdir()
    local r = cli.run { "run", RUNBOOK, "--yes", "-p", "dir=" .. dir, "-p", "min_free=1e12" }
    assert.are.equal(1, r.code, r.stdout .. r.stderr)
    assert.matches("not enough space at", r.stdout .. r.stderr)
    assert.are.same({}, ls(dir))
  end)

  it("changes nothing in a dry run, and says what it would write and delete", function()
    local dir = cli.tmpdir()
    old_sets(dir)
    local r = backends.assert_unchanged(function()
      return cli.run { "run", RUNBOOK, "--dry-run", "-p", "dir=" .. dir, "-p", "keep=2", "-p", "kubernetes=true",
        "-p", "topics=reminders-dlq" }
    end)
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("would dump todo", r.stdout)
    assert.matches("would delete backup set [^\n]*todo%-20200101T000000Z", r.stdout)
    assert.are.same({ "todo-20200101T000000Z", "todo-20200102T000000Z" }, ls(dir))
  end)
end)
