-- pg: against the sandbox's PostgreSQL, cross-checked with psql.
package.path = "spec/sandbox/?.lua;" .. package.path
local sb = require("sandbox_helper")
local pg = require("pg")
local json = require("json")
local host = require("runbook.host")
local cli = require("spec.support.cli")

local function url() return sb.env("DATABASE_URL") end

-- The independent client runs outside the dry run a test may have set (a
-- dry run refuses io.popen).
local function outside_dry_run(f, ...)
  local mode = host.mode()
  host.set_mode("run")
  local out, ok = f(...)
  host.set_mode(mode)
  return out, ok
end

local function psql(sql, u)
  local out, ok = outside_dry_run(sb.psql, sql, u)
  assert(ok, out)
  return (out:gsub("%s+$", ""))
end

local function raises(f, ...)
  local ok, err = pcall(f, ...)
  assert.is_false(ok, "expected an error")
  assert.is_table(err, "expected a structured error, got " .. tostring(err))
  return err
end

-- A database owned by todo for restores, made with the sandbox's superuser.
local function superuser_psql(sql)
  local pw = io.open(sb.state .. "/secrets/postgres"):read("l")
  local su = url():gsub("//todo:[^@]+@", "//postgres:" .. pw .. "@"):gsub("/todo$", "/postgres")
  return psql(sql, su)
end

local effects
local function record_effects()
  effects = {}
  host.set_effect_sink(function(e) effects[#effects + 1] = e end)
end

local function back_to_run()
  host.set_mode("run")
  host.set_effect_sink(nil)
end

local db
setup(function()
  db = pg.connect(url())
  db:exec("DROP TABLE IF EXISTS rb_spec")
  db:exec("CREATE TABLE rb_spec (id int PRIMARY KEY, note text)")
end)
-- every test starts from an empty scratch table, whatever the one before left
before_each(function() db:exec("DELETE FROM rb_spec") end)
teardown(function()
  back_to_run()
  if db then
    pcall(db.query, db, "SELECT 1") -- the connection may have been lost with the server: this reconnects
    db:exec("DROP TABLE IF EXISTS rb_spec")
    db:exec("DROP FUNCTION IF EXISTS rb_spec_sneaky()")
    db:close()
  end
  cli.cleanup()
end)

describe("pg.connect", function()
  it("connects with the URL, as application runbook, and registers the password as a secret", function()
    local st = db:status()
    assert.are.same({ "todo", "todo", true, "idle" }, { st.user, st.database, st.connected, st.transaction })
    assert.are.equal("runbook", psql("SELECT application_name FROM pg_stat_activity WHERE pid = " .. st.pid))
    local pw = url():match("//todo:([^@]+)@")
    assert.are.equal("***", host.redact(pw))
  end)

  it("accepts libpq key=value strings", function()
    local u = url()
    local user, pw, h, port, name = u:match("//([^:]+):([^@]+)@([^:]+):(%d+)/(.+)$")
    local c <close> = pg.connect(("host=%s port=%s dbname=%s user=%s password=%s"):format(h, port, name, user, pw))
    assert.are.equal(1, c:value("SELECT 1"))
  end)

  it("defaults to DATABASE_URL", function()
    local c <close> = pg.connect()
    assert.are.equal("todo", c:status().database)
  end)

  it("raises 08001 for a wrong password, without printing it", function()
    local bad = url():gsub("//todo:[^@]+@", "//todo:wrong-pass-123@")
    local err = raises(pg.connect, bad)
    assert.are.same({ "pg", "connect", "08001" }, { err.module, err.op, err.code })
    assert.matches("password authentication failed", err.message)
    assert.is_nil(err.message:find("wrong-pass-123", 1, true))
  end)

  it("gives up within connect_timeout on a server that never answers", function()
    local dir = cli.tmpdir()
    local pid = sb.sh(([[python3 -c 'import socket,time,sys
s=socket.socket(); s.bind(("127.0.0.1",0)); s.listen(8)
open(sys.argv[1],"w").write(str(s.getsockname()[1])); time.sleep(30)' %s/port >/dev/null 2>&1 & echo $!;
      i=0; while [ ! -s %s/port ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i+1)); done]]):format(dir, dir)):match("%d+")
    local port = cli.slurp(dir .. "/port")
    local t0 = host.now()
    local err = raises(pg.connect, "postgresql://todo:x@127.0.0.1:" .. port .. "/todo", { connect_timeout = "700ms" })
    local took = host.now() - t0
    sb.sh("kill " .. pid)
    assert.are.equal("timeout", err.code)
    assert.is_true(err.retryable)
    assert.matches("connect to 127.0.0.1:" .. port .. " timed out after 0.7s", err.message, 1, true)
    assert.is_true(took >= 0.6 and took < 2, "took " .. took)
  end)

  it("rejects what is not a connection string", function()
    assert.are.equal("invalid_conninfo", raises(pg.connect, "postgresql://h:notaport/x?bogus=1").code)
    assert.has_error(function() pg.connect(url(), { numeric = "float" }) end)
    assert.has_error(function() pg.connect(url(), { connect_timeout = "soon" }) end)
  end)
end)

describe("pg values", function()
  -- SQL expression, expected Lua value (or a predicate)
  local cases = {
    { "1::smallint", 1 }, { "2147483647::int", 2147483647 }, { "9007199254740993::bigint", 9007199254740993 },
    { "-5::bigint", -5 }, { "'pg_class'::regclass::oid", 1259 },
    { "1.5::real", 1.5 }, { "0.1::float8", 0.1 }, { "'NaN'::float8", function(v) return v ~= v end },
    { "'Infinity'::float8", math.huge }, { "'-Infinity'::float8", -math.huge },
    { "12.30::numeric", "12.30" }, { "123456789012345678901234567890::numeric", "123456789012345678901234567890" },
    { "true", true }, { "false", false },
    { "'héllo'::text", "héllo" }, { "'x'::varchar(3)", "x" }, { "'a'::char(3)", "a  " },
    { [['{"a": [1, 2, {"b": null}]}'::json]], function(v) return v.a[2] == 2 and v.a[3].b == json.null end },
    { [['{"k": "v", "n": 1.5}'::jsonb]], function(v) return v.k == "v" and v.n == 1.5 end },
    { "'\\x00ff41'::bytea", "\0\255A" },
    { "'2024-03-01 12:34:56+00'::timestamptz", "2024-03-01 12:34:56+00" },
    { "'2024-03-01 12:34:56'::timestamp", "2024-03-01 12:34:56" },
    { "'2024-03-01'::date", "2024-03-01" }, { "'1 day 02:00'::interval", "1 day 02:00:00" },
    { "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11" },
    { "ARRAY[1,2,3]", "{1,2,3}" }, { "NULL::int", json.null }, { "NULL::jsonb", json.null },
  }
  for _, c in ipairs(cases) do
    it("converts " .. c[1], function()
      local v = db:value("SELECT " .. c[1] .. " AS v")
      if type(c[2]) == "function" then
        assert.is_true(c[2](v), "got " .. tostring(v))
      else
        assert.are.same(c[2], v)
        if math.type(c[2]) then assert.are.equal(math.type(c[2]), math.type(v)) end
      end
    end)
  end

  it("converts numeric to numbers on request", function()
    local c <close> = pg.connect(url(), { numeric = "number" })
    assert.are.equal(12.5, c:value("SELECT 12.50::numeric"))
  end)

  it("keeps NULL columns in the row as pg.null and gives column order", function()
    local rows = db:query("SELECT 1 AS a, NULL AS b, 'x' AS c")
    assert.are.same({ "a", "b", "c" }, rows.columns)
    assert.are.equal(pg.null, rows[1].b)
    assert.are.equal(json.null, pg.null)
  end)

  it("sends nil and pg.null as NULL, booleans, integers, floats and tables as JSON", function()
    local r = db:one("SELECT $1::text IS NULL AS a, $2::text IS NULL AS b, $3::bool AS c, $4::bigint AS d, "
      .. "$5::float8 AS e, $6::jsonb ->> 'k' AS f", nil, pg.null, true, 9007199254740993, 0.1, { k = "v" })
    assert.are.same({ a = true, b = true, c = true, d = 9007199254740993, e = 0.1, f = "v" }, r)
  end)

  it("sends a nil in the middle with the table form", function()
    assert.are.same({ true, 7 }, (function()
      local r = db:one { "SELECT $1::int IS NULL AS a, $2::int AS b", nil, 7, n = 3 }
      return { r.a, r.b }
    end)())
  end)

  local hostile = {
    "it's", "'; DROP TABLE rb_spec; --", "a\"b", "back\\slash", "semi;colon", "$1", "E'\\x41'", "😀 ünïcode",
    "line\nbreak", "/* comment */", "--", "",
  }
  for _, s in ipairs(hostile) do
    it("binds the hostile string " .. ("%q"):format(s) .. " as data", function()
      db:exec("INSERT INTO rb_spec (id, note) VALUES ($1, $2)", 1, s)
      assert.are.equal(s, db:value("SELECT note FROM rb_spec WHERE id = 1"))
      assert.are.equal(s, db:value("SELECT $1::text", s))
      assert.are.equal("1", psql("SELECT count(*) FROM rb_spec"))
      db:exec("DELETE FROM rb_spec")
    end)
  end

  it("refuses a second statement smuggled into one call", function()
    local err = raises(db.query, db, "SELECT 1; DELETE FROM rb_spec")
    assert.are.equal("42601", err.code)
  end)

  it("refuses NUL bytes and unsupported values in parameters", function()
    assert.has_error(function() db:query("SELECT $1::text", "a\0b") end)
    assert.has_error(function() db:query("SELECT $1::text", function() end) end)
  end)
end)

describe("pg errors", function()
  local cases = {
    { "SELECT * FROM no_such_table", "42P01", "relation \"no_such_table\" does not exist" },
    { "SELECT 'x'::int", "22P02", "invalid input syntax for type integer" },
    { "SELEC 1", "42601", "syntax error" },
    { "SELECT 1/0", "22012", "division by zero" },
  }
  for _, c in ipairs(cases) do
    it("raises " .. c[2] .. " for " .. c[1], function()
      local err = raises(db.query, db, c[1])
      assert.are.same({ "pg", "query", c[2], false }, { err.module, err.op, err.code, err.retryable })
      assert.matches(c[3], err.message, 1, true)
      assert.matches("^pg%.query: ", tostring(err))
    end)
  end

  it("raises 23505 with the detail for a duplicate key", function()
    db:exec("INSERT INTO rb_spec VALUES (1, 'a')")
    local err = raises(db.exec, db, "INSERT INTO rb_spec VALUES (1, 'b')")
    db:exec("DELETE FROM rb_spec")
    assert.are.equal("23505", err.code)
    assert.matches("Key (id)=(1) already exists", err.message, 1, true)
  end)

  it("cancels a statement that outlives its timeout and keeps the connection usable", function()
    local c <close> = pg.connect(url(), { timeout = "500ms" })
    local t0 = host.now()
    local err = raises(c.query, c, "SELECT pg_sleep(5)")
    assert.is_true(host.now() - t0 < 2)
    assert.are.same({ "timeout", true }, { err.code, err.retryable })
    assert.are.equal(1, c:value("SELECT 1"))
  end)

  it("bounds a statement by the step's deadline, on the server too", function()
    local c <close> = pg.connect(url())
    host.set_deadline(host.now() + 3)
    local setting = c:value("SHOW statement_timeout")
    local ok, err = pcall(c.query, c, "SELECT pg_sleep(0.1), current_setting('statement_timeout') AS s")
    host.set_deadline(nil)
    assert.is_true(ok, tostring(err))
    assert.matches("^%d+ms$", setting)
    assert.is_true(tonumber(setting:match("%d+")) <= 4000, setting)
  end)
end)

describe("pg transactions", function()
  it("commits when the function returns", function()
    db:transaction(function(tx)
      tx:exec("INSERT INTO rb_spec VALUES (1, 'a'), (2, 'b')")
    end)
    assert.are.equal("2", psql("SELECT count(*) FROM rb_spec"))
    db:exec("DELETE FROM rb_spec")
  end)

  it("rolls back when the function raises, and raises on", function()
    local ok, err = pcall(db.transaction, db, function(tx)
      tx:exec("INSERT INTO rb_spec VALUES (1, 'a')")
      tx:exec("INSERT INTO rb_spec VALUES (1, 'duplicate')")
    end)
    assert.is_false(ok)
    assert.are.equal("23505", err.code)
    assert.are.equal("0", psql("SELECT count(*) FROM rb_spec"))
    assert.are.equal("idle", db:status().transaction)
  end)

  it("exec returns the affected row count", function()
    db:exec("INSERT INTO rb_spec SELECT g, 'n' FROM generate_series(1, 25) g")
    assert.are.same({ 10, "performed" }, { db:exec("UPDATE rb_spec SET note = 'u' WHERE id <= $1", 10) })
    assert.are.same({ 25, "performed" }, { db:exec("DELETE FROM rb_spec") })
  end)
end)

describe("pg and the effect gate", function()
  before_each(record_effects)
  after_each(back_to_run)

  local OLD = "created_at < now() - interval '30 days'"

  it("records a write with its outcome", function()
    db:exec("INSERT INTO rb_spec VALUES (1, 'a'), (2, 'b'), (3, 'c')")
    assert.are.equal(1, #effects)
    assert.are.same({ "pg", "exec", "insert 3 rows into rb_spec", "performed", true },
      { effects[1].module, effects[1].op, effects[1].summary, effects[1].decision, effects[1].ok })
    assert.matches("%.rb_spec$", effects[1].target) -- database.table
    db:exec("DELETE FROM rb_spec")
  end)

  it("does not record reads", function()
    db:query("SELECT count(*) FROM tasks")
    db:query("SHOW max_connections")
    db:query("EXPLAIN DELETE FROM tasks")
    assert.are.equal(0, #effects)
  end)

  it("simulates a DELETE in a dry run: reports the count, leaves the rows", function()
    local before = psql("SELECT count(*) FROM checkpoints WHERE " .. OLD)
    local total = psql("SELECT count(*) FROM checkpoints")
    host.set_mode("dry-run")
    local n, how = db:exec("DELETE FROM checkpoints WHERE " .. OLD)
    assert.are.same({ tonumber(before), "simulated" }, { n, how })
    assert.are.equal(before, psql("SELECT count(*) FROM checkpoints WHERE " .. OLD))
    assert.are.equal(total, psql("SELECT count(*) FROM checkpoints"))
    assert.are.same({ "simulated", "delete " .. before .. " rows from checkpoints", "rolled back" },
      { effects[1].decision, effects[1].summary, effects[1].result })
    assert.are.equal("idle", db:status().transaction)
  end)

  it("simulates inside a transaction with a savepoint and rolls the transaction back", function()
    host.set_mode("dry-run")
    db:transaction(function(tx)
      assert.are.same({ 2, "simulated" }, { tx:exec("INSERT INTO rb_spec VALUES (1, 'a'), (2, 'b')") })
      assert.are.same({ 0, "simulated" }, { tx:exec("DELETE FROM rb_spec") })
    end)
    assert.are.equal("0", psql("SELECT count(*) FROM rb_spec"))
    assert.are.equal("idle", db:status().transaction)
  end)

  it("reports a simulated write's error and rolls it back", function()
    host.set_mode("dry-run")
    local err = raises(db.exec, db, "UPDATE tasks SET no_such_column = 1")
    assert.are.equal("42703", err.code)
    assert.is_false(effects[1].ok)
    assert.are.equal("idle", db:status().transaction)
  end)

  local not_simulated = {
    "VACUUM (ANALYZE) checkpoints", "CREATE DATABASE rb_never", "SELECT nextval('audit_log_sequence_number_seq')",
    "CREATE INDEX CONCURRENTLY rb_never_idx ON tasks (title)",
  }
  for _, sql in ipairs(not_simulated) do
    it("reports " .. sql .. " as not simulated in a dry run", function()
      local seq = psql("SELECT last_value FROM audit_log_sequence_number_seq")
      host.set_mode("dry-run")
      assert.are.same({ 0, "skipped" }, { db:exec(sql) })
      assert.are.same({ "skipped", "run: " .. sql }, { effects[1].decision, (effects[1].summary:gsub(";.*", "")) })
      assert.are.equal(seq, psql("SELECT last_value FROM audit_log_sequence_number_seq"))
      assert.are.equal("0", psql("SELECT count(*) FROM pg_indexes WHERE indexname = 'rb_never_idx'"))
    end)
  end

  it("does not run a function whose body the server cannot show, and says which", function()
    db:exec("CREATE OR REPLACE FUNCTION rb_spec_sneaky() RETURNS int LANGUAGE sql AS "
      .. "'INSERT INTO rb_spec VALUES (99, ''sneaky'') RETURNING 1'")
    host.set_mode("dry-run")
    assert.is_true(db:query("SELECT rb_spec_sneaky()").skipped)
    assert.are.same({ "skipped", "run: SELECT rb_spec_sneaky(); it calls rb_spec_sneaky()" },
      { effects[#effects].decision, effects[#effects].summary })
    host.set_mode("run")
    assert.are.equal(1, db:value("SELECT rb_spec_sneaky()"))
    assert.are.equal("1", psql("SELECT count(*) FROM rb_spec"))
    db:exec("DELETE FROM rb_spec")
  end)

  it("treats a statement marked write = true as a write that is not simulated", function()
    host.set_mode("dry-run")
    local r = db:query { "SELECT pg_notify('rb', $1)", "x", write = true }
    assert.is_true(r.skipped)
    assert.are.equal("skipped", effects[1].decision)
  end)

  it("says 'would delete N rows from checkpoints' in a dry run of a runbook", function()
    local path = cli.runbook([[
name = "prune" description = "prune old checkpoints"
step "prune" { run = function()
  local db <close> = pg.connect()
  local n = db:exec("DELETE FROM checkpoints WHERE created_at < now() - interval '30 days'")
  return { would_delete = n }
end }
]])
    local before = psql("SELECT count(*) FROM checkpoints")
    local old = psql("SELECT count(*) FROM checkpoints WHERE " .. OLD)
    local r = cli.run({ "run", path, "--dry-run" }, { DATABASE_URL = url() })
    assert.are.equal(0, r.code, r.stderr)
    assert.truthy(r.stdout:find("would delete " .. old .. " rows from checkpoints → rolled back", 1, true), r.stdout)
    assert.are.equal(before, psql("SELECT count(*) FROM checkpoints"))
    assert.is_nil(r.stdout:find(url():match("//todo:([^@]+)@"), 1, true))
  end)
end)

describe("pg COPY", function()
  local dir
  setup(function() dir = cli.tmpdir() end)
  after_each(back_to_run)

  it("copies a table to a file byte for byte as psql does", function()
    local r = db:copy_to("tasks", dir .. "/tasks.csv")
    assert.are.equal(3000, r.rows)
    sb.sh(("psql -X %s -c 'COPY tasks TO STDOUT WITH (FORMAT csv, HEADER)' > %s/psql.csv"):format(sb.quote(url()), dir))
    assert.are.equal(cli.slurp(dir .. "/psql.csv"), cli.slurp(dir .. "/tasks.csv"))
  end)

  it("copies a query's rows", function()
    local r = db:copy_to("SELECT id, email FROM users WHERE id <= 5 ORDER BY id", dir .. "/users.csv", { header = false })
    assert.are.equal(5, r.rows)
    assert.are.equal("1,user1@example.com\n", cli.slurp(dir .. "/users.csv"):match("^[^\n]*\n"))
  end)

  it("copies a file into a table, and only pretends to in a dry run", function()
    local f = io.open(dir .. "/in.csv", "w")
    f:write("id,note\n")
    for i = 1, 1000 do f:write(i, ",note ", i, "\n") end
    f:close()
    record_effects()
    host.set_mode("dry-run")
    assert.are.equal(1000, db:copy_from(dir .. "/in.csv", "rb_spec").rows)
    assert.are.equal("0", psql("SELECT count(*) FROM rb_spec"))
    assert.are.same({ "simulated", "copy 1000 rows into rb_spec" }, { effects[1].decision, effects[1].summary })
    host.set_mode("run")
    assert.are.equal(1000, db:copy_from(dir .. "/in.csv", "rb_spec").rows)
    assert.are.equal("1000|500500", psql("SELECT count(*), sum(id) FROM rb_spec"))
    db:exec("DELETE FROM rb_spec")
  end)

  it("skips copy_to in a dry run and writes no file", function()
    host.set_mode("dry-run")
    assert.is_true(db:copy_to("users", dir .. "/dry.csv").skipped)
    assert.is_nil(io.open(dir .. "/dry.csv"))
  end)

  it("raises the server's error for a bad file and leaves nothing behind", function()
    local f = io.open(dir .. "/bad.csv", "w")
    f:write("id,note\n1,ok\nnot-a-number,x\n")
    f:close()
    local err = raises(db.copy_from, db, dir .. "/bad.csv", "rb_spec")
    assert.are.equal("22P02", err.code)
    assert.are.equal("0", psql("SELECT count(*) FROM rb_spec"))
    assert.are.equal(1, db:value("SELECT 1"))
    assert.are.equal("io_error", raises(db.copy_from, db, dir .. "/missing.csv", "rb_spec").code)
  end)
end)

describe("pg helpers", function()
  after_each(back_to_run)

  local function background_sleep(secs)
    sb.sh(("psql -X %s -c 'SELECT pg_sleep(%d)' >/dev/null 2>&1 &"):format(sb.quote(url()), secs))
    return sb.wait_until(5, function()
      local pid = psql("SELECT pid FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(%' AND state = 'active' LIMIT 1")
      return tonumber(pid)
    end)
  end

  it("activity() counts connections by state and lists long-running queries", function()
    local pid = background_sleep(3)
    sb.sleep(0.6)
    local a = db:activity { min_duration = "500ms" }
    assert.are.equal(tonumber(psql("SHOW max_connections")), a.max_connections)
    assert.is_true(a.by_state.active >= 2)
    local found
    for _, q in ipairs(a.long_running) do if q.pid == pid then found = q end end
    assert.is_table(found)
    assert.matches("pg_sleep", found.query)
    assert.is_true(found.seconds >= 0.5)
    db:cancel(pid)
  end)

  it("max_connections() and database_size() agree with psql", function()
    assert.are.equal(tonumber(psql("SHOW max_connections")), db:max_connections())
    local bytes, pretty = db:database_size()
    assert.are.equal(tonumber(psql("SELECT pg_database_size('todo')")), bytes)
    assert.are.equal(psql("SELECT pg_size_pretty(pg_database_size('todo'))"), pretty)
  end)

  it("cancel(pid) cancels a running query; terminate(pid) ends the backend", function()
    local pid = background_sleep(20)
    assert.is_true(db:cancel(pid))
    assert.is_true(sb.wait_until(5, function()
      return psql("SELECT count(*) FROM pg_stat_activity WHERE pid = " .. pid .. " AND state = 'active'") == "0"
    end))
    local victim = pg.connect(url())
    local vpid = victim:status().pid
    assert.is_true(db:terminate(vpid))
    assert.is_true(sb.wait_until(5, function() return psql("SELECT count(*) FROM pg_stat_activity WHERE pid = " .. vpid) == "0" end))
    -- the victim's next statement fails (retryable), the one after reconnects
    local err = raises(victim.query, victim, "SELECT 1")
    assert.is_true(err.retryable)
    assert.are.equal(1, victim:value("SELECT 1"))
    assert.are_not.equal(vpid, victim:status().pid)
    victim:close()
  end)

  it("does not terminate in a dry run", function()
    local other <close> = pg.connect(url())
    host.set_mode("dry-run")
    assert.are.same({ nil, "skipped" }, { db:terminate(other:status().pid) })
    host.set_mode("run")
    assert.are.equal(1, other:value("SELECT 1"))
  end)

  it("refuses to terminate its own connection", function()
    assert.has_error(function() db:terminate(db:status().pid) end)
    assert.has_error(function() db:terminate("12") end)
  end)

  it("vacuum_analyze(table) runs VACUUM; a dry run skips it", function()
    local before = tonumber(psql("SELECT vacuum_count FROM pg_stat_user_tables WHERE relname = 'users'"))
    assert.are.same({ true, "performed" }, { db:vacuum_analyze("users") })
    assert.is_true(sb.wait_until(5, function()
      return tonumber(psql("SELECT vacuum_count FROM pg_stat_user_tables WHERE relname = 'users'")) == before + 1
    end))
    host.set_mode("dry-run")
    assert.are.same({ false, "skipped" }, { db:vacuum_analyze("users") })
  end)

  it("advisory_lock holds a lock other sessions cannot take until it is released", function()
    local other <close> = pg.connect(url())
    do
      local lock <close> = db:advisory_lock("rb-spec-maintenance")
      assert.are.equal("1", psql("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = " .. db:status().pid))
      local t0 = host.now()
      local err = raises(other.advisory_lock, other, "rb-spec-maintenance", { wait = "300ms" })
      assert.are.same({ "lock_held", true }, { err.code, err.retryable })
      assert.is_true(host.now() - t0 >= 0.3)
    end
    assert.are.equal("0", psql("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = " .. db:status().pid))
    local lock = other:advisory_lock("rb-spec-maintenance")
    lock.release()
  end)

  it("has the helpers on a shared DATABASE_URL connection", function()
    assert.are.equal(tonumber(psql("SHOW max_connections")), pg.max_connections())
    assert.are.equal(3000, pg.value("SELECT count(*) FROM tasks"))
  end)
end)

describe("pg.dump and pg.restore", function()
  local dir, restore_url
  local TABLES = { "users", "tasks", "audit_log", "checkpoints" }
  local ORDER = { users = "id", tasks = "id", audit_log = "sequence_number", checkpoints = "thread_id, checkpoint_id" }

  local function checksums(u)
    local out = {}
    for _, t in ipairs(TABLES) do
      out[t] = psql(("SELECT count(*) || ':' || md5(string_agg(x::text, '|' ORDER BY %s)) FROM %s x"):format(ORDER[t], t), u)
    end
    return out
  end

  setup(function()
    dir = cli.tmpdir()
    superuser_psql("DROP DATABASE IF EXISTS todo_restore WITH (FORCE)")
    superuser_psql("CREATE DATABASE todo_restore OWNER todo")
    restore_url = url():gsub("/todo$", "/todo_restore")
  end)
  teardown(function()
    superuser_psql("DROP DATABASE IF EXISTS todo_restore WITH (FORCE)")
  end)
  after_each(back_to_run)

  it("dumps with a verified manifest: sha256, size, server version, row counts", function()
    local m = pg.dump { file = dir .. "/todo.dump" }
    assert.are.equal(sb.sh("sha256sum " .. dir .. "/todo.dump"):match("^%x+"), m.sha256)
    assert.are.equal(tonumber((sb.sh("stat -c %s " .. dir .. "/todo.dump"))), m.size)
    assert.are.same({ 50, 3000, 6000, 2000 },
      { m.tables["public.users"], m.tables["public.tasks"], m.tables["public.audit_log"], m.tables["public.checkpoints"] })
    assert.matches("^15", m.server_version)
    assert.are.same(m, json.decode(cli.slurp(dir .. "/todo.dump.manifest.json")))
    assert.matches("TABLE DATA public tasks", (sb.sh("pg_restore --list " .. dir .. "/todo.dump")))
  end)

  it("restores into another database reproducing every table's contents", function()
    local r = pg.restore { url = restore_url, file = dir .. "/todo.dump" }
    assert.are.equal(3000, r.tables["public.tasks"])
    assert.are.same(checksums(url()), checksums(restore_url))
  end)

  it("round-trips the plain and directory formats too", function()
    for _, fmt in ipairs { "plain", "directory" } do
      local file = dir .. "/todo." .. fmt
      pg.dump { file = file, format = fmt, jobs = fmt == "directory" and 2 or nil }
      psql("DROP TABLE checkpoints", restore_url)
      pg.restore { url = restore_url, file = file }
      assert.are.same(checksums(url()), checksums(restore_url))
    end
  end)

  local damage = {
    { "truncated", "head -c 20000 %s/todo.dump > %s/bad.dump" },
    { "corrupted", "cp %s/todo.dump %s/bad.dump && printf 'XXXX' | dd of=%s/bad.dump bs=1 seek=30000 conv=notrunc 2>/dev/null" },
  }
  for _, d in ipairs(damage) do
    it("refuses a " .. d[1] .. " dump before dropping anything", function()
      sb.sh(d[2]:format(dir, dir, dir))
      sb.sh(("cp %s/todo.dump.manifest.json %s/bad.dump.manifest.json"):format(dir, dir))
      local before = checksums(restore_url)
      local err = raises(pg.restore, { url = restore_url, file = dir .. "/bad.dump" })
      assert.are.equal("corrupt_dump", err.code)
      assert.matches("does not match its manifest", err.message)
      assert.are.same(before, checksums(restore_url))
    end)
  end

  it("refuses a dump without a manifest unless told, and then still checks it parses", function()
    sb.sh(("head -c 100 %s/todo.dump > %s/nomanifest.dump"):format(dir, dir))
    assert.are.equal("no_manifest", raises(pg.restore, { url = restore_url, file = dir .. "/nomanifest.dump" }).code)
    assert.are.equal("corrupt_dump",
      raises(pg.restore, { url = restore_url, file = dir .. "/nomanifest.dump", manifest = false }).code)
  end)

  it("writes nothing in a dry run", function()
    record_effects()
    host.set_mode("dry-run")
    assert.is_true(pg.dump { file = dir .. "/dry.dump" }.skipped)
    assert.is_nil(io.open(dir .. "/dry.dump"))
    assert.are.equal("skipped", effects[1].decision)
    local before = checksums(restore_url)
    assert.is_true(pg.restore { url = restore_url, file = dir .. "/todo.dump" }.skipped)
    assert.are.same(before, checksums(restore_url))
  end)
end)

describe("pg when the server stops", function()
  after_each(function() sb.ctl("postgres start") end)

  it("raises a clear, retryable error at once and reconnects when it is back", function()
    local c <close> = pg.connect(url())
    assert.is_true(select(2, sb.ctl("postgres stop")))
    local t0 = host.now()
    local err = raises(pg.connect, url(), { connect_timeout = "2s" })
    assert.is_true(host.now() - t0 < 2.5)
    assert.are.same({ "08001", true }, { err.code, err.retryable })
    assert.matches("connecting to [^@]+@127.0.0.1:%d+/[^:]+: .*refused", err.message)
    local lost = raises(c.query, c, "SELECT 1")
    assert.is_true(lost.retryable)
    assert.is_true(select(2, sb.ctl("postgres start")))
    assert.are.equal(1, c:value("SELECT 1"))
  end)
end)
