-- Adversarial: a dry run against PostgreSQL changes nothing, whatever the
-- runbook sends (issue 20, class 3). Each variant is a step body run with
-- --dry-run against the sandbox, then checked with psql: a value that must
-- not change (a row count, a sequence's last_value), a backend that must
-- still be alive, a listener that must hear nothing, a file that must not
-- exist. Adding a variant is one row in `variants`.
package.path = "spec/sandbox/?.lua;" .. package.path
local sb = require("sandbox_helper")
local cli = require("spec.support.cli")
local adv = require("spec.adversarial.support")

local function url() return sb.env("DATABASE_URL") end

local function psql(sql, u)
  local out, ok = sb.psql(sql, u)
  assert(ok, out)
  return (out:gsub("%s+$", ""))
end

local function superuser_psql(sql)
  local pw = io.open(sb.state .. "/secrets/postgres"):read("l")
  return psql(sql, url():gsub("//todo:[^@]+@", "//postgres:" .. pw .. "@"))
end

-- Polls `sql` until it returns "t" (10 s at most).
local function until_true(sql, what)
  cli.eventually(function() return psql(sql) == "t" end, what)
end

-- ---- what a variant watches -----------------------------------------------

--- The result of `sql` is the same after the run as before it.
local function unchanged(sql)
  local before
  return {
    start = function() before = psql(sql) end,
    check = function() assert.are.equal(before, psql(sql), sql) end,
  }
end

local ROWS = unchanged("SELECT count(*) FROM rb_adv")
local SEQ = unchanged("SELECT last_value FROM rb_adv_seq")
local AUDIT_SEQ = unchanged("SELECT last_value FROM audit_log_sequence_number_seq")

--- A backend (application_name rb_adv_victim) that must survive the run.
local VICTIM = {
  start = function()
    os.execute(("PGAPPNAME=rb_adv_victim psql -X -q %s -c 'SELECT pg_sleep(120)' >/dev/null 2>&1 &"):format(sb.quote(url())))
    until_true("SELECT count(*) = 1 FROM pg_stat_activity WHERE application_name = 'rb_adv_victim' AND state = 'active'",
      "the victim backend")
  end,
  check = function()
    local alive = psql("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'rb_adv_victim'")
    psql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'rb_adv_victim'")
    assert.are.equal("1", alive, "the victim backend was terminated")
  end,
}

--- A session LISTENing on rb_adv that must hear nothing.
local LISTENER = {}
function LISTENER.start()
  LISTENER.out = cli.tmpdir() .. "/listener"
  os.execute(("(PGAPPNAME=rb_adv_listener psql -X %s -c 'LISTEN rb_adv' -c 'SELECT pg_sleep(60)' -c 'SELECT 1' >%s 2>&1; echo done >>%s) &")
    :format(sb.quote(url()), LISTENER.out, LISTENER.out))
  until_true("SELECT count(*) = 1 FROM pg_stat_activity WHERE application_name = 'rb_adv_listener' AND query LIKE '%pg_sleep%'",
    "the listener")
end
function LISTENER.check()
  psql("SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE application_name = 'rb_adv_listener'")
  cli.eventually(function() return cli.slurp(LISTENER.out):find("done", 1, true) end, "the listener to finish")
  assert.is_nil(cli.slurp(LISTENER.out):find("Asynchronous notification", 1, true), cli.slurp(LISTENER.out))
end

--- No session may hold advisory lock 4242 while the run lasts (polled in the background).
local NO_ADVISORY_LOCK = {}
function NO_ADVISORY_LOCK.start()
  local d = cli.tmpdir()
  NO_ADVISORY_LOCK.out, NO_ADVISORY_LOCK.stop = d .. "/locks", d .. "/stop"
  os.execute(("(while [ ! -e %s ]; do psql -X -A -t %s -c \"SELECT count(*) FROM pg_locks"
    .. " WHERE locktype = 'advisory' AND objid = 4242\"; sleep 0.05; done >%s 2>&1; echo done >>%s) &"):format(
    NO_ADVISORY_LOCK.stop, sb.quote(url()), NO_ADVISORY_LOCK.out, NO_ADVISORY_LOCK.out))
end
function NO_ADVISORY_LOCK.check()
  io.open(NO_ADVISORY_LOCK.stop, "w"):close()
  cli.eventually(function() return cli.slurp(NO_ADVISORY_LOCK.out):find("done", 1, true) end, "the lock poller")
  local seen = cli.slurp(NO_ADVISORY_LOCK.out)
  assert.is_nil(("\n" .. seen):find("\n1\n"), "a session advisory lock was taken")
  assert.truthy(seen:find("0\n"), seen)
end

--- A file the server must not write (the todo role may write server files).
local SERVER_FILE = "/tmp/rb-adv-copy-" .. os.time()
local NO_SERVER_FILE = {
  start = function() os.remove(SERVER_FILE) end,
  check = function()
    local f = io.open(SERVER_FILE)
    if f then f:close() end
    os.remove(SERVER_FILE)
    assert.is_nil(f, SERVER_FILE .. " was written")
  end,
}

-- ---- the variants ---------------------------------------------------------
-- body: the step's code, with `db` connected and try(sql_or_fn, ...) running
-- one statement (db:exec) or function while ignoring its error, so an attack
-- goes on after a refusal. {{file}} is a CSV file the spec provides.

local variants = {
  { "SET default_transaction_read_only = off, then a function that writes", ROWS, [[
    try("SET default_transaction_read_only = off")
    try("SELECT rb_adv_write('set')") ]] },
  { "RESET ALL, then a function that writes", ROWS, [[
    try("RESET ALL")
    try("SELECT rb_adv_write('reset')") ]] },
  { "set_config() turning read-only off, then a function that writes", ROWS, [[
    try("SELECT set_config('default_transaction_read_only', 'off', false)")
    try("SELECT rb_adv_write('set_config')") ]] },
  { "BEGIN READ WRITE ... COMMIT around a function that writes", ROWS, [[
    try("BEGIN READ WRITE")
    try("SELECT rb_adv_write('begin')")
    try("COMMIT") ]] },
  { "a COMMIT inside db:transaction", ROWS, [[
    try(function() db:transaction(function(tx)
      tx:query("SELECT rb_adv_write('transaction')")
      tx:exec("COMMIT")
    end) end) ]] },
  { "pg_terminate_backend behind a Unicode-escaped identifier", VICTIM, [[
    try([=[SELECT U&"pg_termin\0061te_backend"(pid) FROM pg_stat_activity WHERE application_name = 'rb_adv_victim']=]) ]] },
  { "pg_terminate_backend inside a view", VICTIM, [[
    try("SELECT * FROM rb_adv_kill") ]] },
  { "pg_notify to a listening session", LISTENER, [[
    try("SELECT pg_notify('rb_adv', 'dry run')") ]] },
  { "an INSERT whose serial default takes a sequence number", AUDIT_SEQ, [[
    try("INSERT INTO audit_log (task_id, action) SELECT id, 'rb_adv' FROM tasks LIMIT 1") ]] },
  { "an INSERT inside a data-modifying WITH", AUDIT_SEQ, [[
    try("WITH i AS (INSERT INTO audit_log (task_id, action) SELECT id, 'rb_adv' FROM tasks LIMIT 1 RETURNING 1) SELECT count(*) FROM i") ]] },
  { "UPDATE ... SET a serial column = DEFAULT", AUDIT_SEQ, [[
    try("UPDATE audit_log SET sequence_number = DEFAULT WHERE sequence_number = (SELECT max(sequence_number) FROM audit_log)") ]] },
  { "EXPLAIN ANALYZE of an INSERT", AUDIT_SEQ, [[
    try("EXPLAIN ANALYZE INSERT INTO audit_log (task_id, action) SELECT id, 'rb_adv' FROM tasks LIMIT 1") ]] },
  { "copy_from into a table with a serial default", AUDIT_SEQ, [[
    try(function() db:copy_from("{{file}}", "audit_log", { columns = { "task_id", "action" } }) end) ]] },
  { "a DO block calling nextval", SEQ, [[
    try("DO $$ BEGIN PERFORM nextval('rb_adv_seq'); END $$") ]] },
  { "CALL of a procedure calling nextval", SEQ, [[
    try("CALL rb_adv_proc()") ]] },
  { "an INSERT firing a trigger that calls nextval", SEQ, [[
    try("INSERT INTO rb_adv_trig VALUES (1)") ]] },
  { "an operator whose function calls nextval", SEQ, [[
    try("WITH d AS (DELETE FROM rb_adv WHERE false) SELECT 1 ### 2") ]] },
  { "nextval behind a Unicode escape in a data-modifying WITH", SEQ, [[
    try([=[WITH d AS (DELETE FROM rb_adv WHERE false) SELECT U&"nextv\0061l"('rb_adv_seq')]=]) ]] },
  { "an UPDATE whose rule inserts a row with a serial default", AUDIT_SEQ, [[
    try("UPDATE rb_adv_ruled SET x = x") ]] },
  { "a DELETE whose foreign key sets a default from a sequence", SEQ, [[
    try("DELETE FROM rb_adv_parent") ]] },
  { "a row security policy calling nextval", SEQ, [[
    try("WITH d AS (DELETE FROM rb_adv WHERE false) SELECT count(*) FROM rb_adv_rls") ]] },
  { "a domain whose check calls nextval", SEQ, [[
    try("WITH d AS (DELETE FROM rb_adv WHERE false) SELECT 1::rb_adv_dom") ]] },
  { "PREPARE and EXECUTE of nextval", SEQ, [[
    try([=[PREPARE rb_adv_p AS SELECT U&"nextv\0061l"('rb_adv_seq')]=])
    try("EXECUTE rb_adv_p") ]] },
  { "a session-level advisory lock", NO_ADVISORY_LOCK, [[
    try("SELECT pg_advisory_lock(4242)")
    try("SELECT pg_sleep(2)") ]] },
  { "COPY ... TO a server file", NO_SERVER_FILE, [[
    try("COPY (SELECT 'dry run') TO '{{server_file}}'") ]] },
}

local PREAMBLE = [[
  local db <close> = pg.connect()
  local function try(what)
    pcall(type(what) == "function" and what or function() return db:exec(what) end)
  end
]]

setup(function()
  psql([[
    DROP TABLE IF EXISTS rb_adv, rb_adv_trig, rb_adv_rls, rb_adv_ruled, rb_adv_child, rb_adv_parent CASCADE;
    DROP DOMAIN IF EXISTS rb_adv_dom;
    DROP SEQUENCE IF EXISTS rb_adv_seq;
    CREATE TABLE rb_adv (tag text);
    CREATE SEQUENCE rb_adv_seq;
    SELECT nextval('rb_adv_seq');
    CREATE OR REPLACE FUNCTION rb_adv_write(t text) RETURNS int LANGUAGE plpgsql
      AS $$ BEGIN INSERT INTO rb_adv VALUES (t); RETURN 1; END $$;
    CREATE OR REPLACE FUNCTION rb_adv_tick() RETURNS trigger LANGUAGE plpgsql
      AS $$ BEGIN PERFORM nextval('rb_adv_seq'); RETURN NEW; END $$;
    CREATE TABLE rb_adv_trig (x int);
    CREATE TRIGGER rb_adv_tick BEFORE INSERT ON rb_adv_trig FOR EACH ROW EXECUTE FUNCTION rb_adv_tick();
    CREATE OR REPLACE PROCEDURE rb_adv_proc() LANGUAGE plpgsql AS $$ BEGIN PERFORM nextval('rb_adv_seq'); END $$;
    CREATE OR REPLACE FUNCTION rb_adv_op(int, int) RETURNS bool LANGUAGE plpgsql
      AS $$ BEGIN PERFORM nextval('rb_adv_seq'); RETURN true; END $$;
    DROP OPERATOR IF EXISTS ### (int, int);
    CREATE OPERATOR ### (LEFTARG = int, RIGHTARG = int, FUNCTION = rb_adv_op);
    CREATE TABLE rb_adv_ruled (x int);
    INSERT INTO rb_adv_ruled VALUES (1);
    CREATE RULE rb_adv_audit AS ON UPDATE TO rb_adv_ruled
      DO ALSO INSERT INTO audit_log (task_id, action) SELECT id, 'rb_adv' FROM tasks LIMIT 1;
    CREATE TABLE rb_adv_parent (id int PRIMARY KEY);
    INSERT INTO rb_adv_parent VALUES (1);
    CREATE TABLE rb_adv_child (parent int DEFAULT nextval('rb_adv_seq')
      REFERENCES rb_adv_parent ON DELETE SET DEFAULT);
    INSERT INTO rb_adv_child VALUES (1);
    CREATE TABLE rb_adv_rls (x int);
    INSERT INTO rb_adv_rls VALUES (1);
    ALTER TABLE rb_adv_rls ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
    CREATE POLICY rb_adv_rls ON rb_adv_rls USING (nextval('rb_adv_seq') > 0);
    CREATE DOMAIN rb_adv_dom AS int CHECK (nextval('rb_adv_seq') > 0);
    CREATE OR REPLACE VIEW rb_adv_kill AS
      SELECT pg_terminate_backend(pid) AS ok FROM pg_stat_activity WHERE application_name = 'rb_adv_victim';
  ]])
  superuser_psql("GRANT pg_write_server_files TO todo")
end)

teardown(function()
  superuser_psql("REVOKE pg_write_server_files FROM todo")
  psql([[
    DROP VIEW IF EXISTS rb_adv_kill;
    DROP OPERATOR IF EXISTS ### (int, int);
    DROP TABLE IF EXISTS rb_adv, rb_adv_trig, rb_adv_rls, rb_adv_ruled, rb_adv_child, rb_adv_parent CASCADE;
    DROP DOMAIN IF EXISTS rb_adv_dom;
    DROP SEQUENCE IF EXISTS rb_adv_seq;
    DROP FUNCTION IF EXISTS rb_adv_write(text), rb_adv_tick(), rb_adv_op(int, int);
    DROP PROCEDURE IF EXISTS rb_adv_proc();
  ]])
  cli.cleanup()
end)

describe("a PostgreSQL dry run changes nothing", function()
  for _, v in ipairs(variants) do
    local name, watch, body = v[1], v[2], v[3]
    it("against " .. name, function()
      local csv = cli.runbook("task_id,action\n1,rb_adv\n", "rows.csv")
      local src = adv.runbook(PREAMBLE .. body:gsub("{{file}}", csv):gsub("{{server_file}}", SERVER_FILE))
      watch.start()
      local r = adv.dry_run(src, cli.tmpdir())
      watch.check()
      assert.is_nil(r.stderr:find("traceback", 1, true), r.stderr)
    end)
  end
end)
