--- pg: PostgreSQL for runbooks, over libpq (modules/pg.c).
--
--   local db <close> = pg.connect(url, opts)   url defaults to $DATABASE_URL;
--       opts: connect_timeout ("10s"), timeout (per statement; default the step's remaining time),
--             lock_timeout (a statement's wait for a lock, "30s"; false: only the statement's timeout),
--             application_name ("runbook"), numeric ("string"|"number")
--   db:query(sql, params...) -> rows            {{col = value, ...}, ...; columns = {names}}
--   db:exec(sql, params...) -> n, how           affected rows; how = "performed"|"simulated"|"skipped"
--   db:query{sql, params..., write = true}      a statement the runbook marks as a write
--   db:one(sql, params...) -> row | nil         the first row
--   db:value(sql, params...) -> value | nil     the first column of the first row
--   db:transaction(function(tx) ... end)        BEGIN; COMMIT, or ROLLBACK on error (always in a dry run)
--   db:copy_to(sql_or_table, path, opts)        COPY ... TO STDOUT streamed into a file (csv by default)
--   db:copy_from(path, table, opts)             a file streamed into COPY table FROM STDIN
--   db:activity(opts)  db:max_connections()  db:database_size(name)  db:terminate(pid)
--   db:slow_statements(limit) (pg_stat_statements)  db:cache_hit_ratio()  db:bloat{min_rows=, min_share=}
--   db:cancel(pid)  db:vacuum_analyze(table)  db:advisory_lock(key, opts)
--   pg.dump{...}  pg.restore{...}               through Debian's pg_dump / pg_restore / psql
--   pg.null                                     SQL NULL (the same value as json.null)
--
-- The helpers also exist as pg.activity(), pg.query(...) etc., on one shared
-- connection to $DATABASE_URL opened on first use.
--
-- Values convert by type (integers, floats, booleans, json/jsonb decoded,
-- bytea as bytes, numeric as strings unless numeric = "number"; timestamps,
-- intervals and arrays as PostgreSQL's text). Tables passed as parameters are
-- sent as JSON. Parameters are always bound ($1, $2...), never interpolated.
--
-- In a dry run every statement runs in a transaction the module opens and
-- always rolls back, after the server has checked it (modules/pg.c, "the dry
-- run"): writes report their counts ("would delete 1234 rows from
-- checkpoints"; exec returns n, "simulated"; query's rows carry `affected`);
-- statements whose effects a rollback would not undo (nextval and serial
-- defaults, pg_notify, pg_terminate_backend, set_config, functions the server
-- cannot show the body of, foreign tables), utility statements other than
-- SHOW/SET/RESET (COPY, DO, VACUUM, CREATE...) and writes marked write = true
-- are reported as not simulated and never sent. BEGIN/COMMIT/ROLLBACK are the
-- module's: a dry run never commits. SET and RESET last for the run, never for
-- the session. See README "What a dry run guarantees".
--
-- Errors are structured: code is the SQLSTATE ("42P01", "23505", "57014"),
-- "08001" when connecting fails, "timeout" when the step's time runs out.
local native = require("runbook.pg")
local json = require("json")
local duration = require("duration")
local exec = require("exec")
local gate = require("gate")
local library_effect = require("runbook.effect").library
local host = require("runbook.host")

native.set_json(json.encode, json.decode, json.null)

local raise = host.raiser "pg"

local pg = { null = json.null, classify = native.classify }
local conn = native.methods
-- The C COPY functions, which copy_to/copy_from below wrap. The methods table
-- outlives a reload of this file (it is the connection metatable's, kept in the
-- registry; busted reloads modules for each spec file), so a second load must
-- not take the first load's wrappers for the C functions.
conn._native_copy = conn._native_copy or { conn.copy_to, conn.copy_from }
local native_copy_to, native_copy_from = conn._native_copy[1], conn._native_copy[2]

local function env_url()
  local url = os.getenv("DATABASE_URL")
  if not url or url == "" then
    error("pg.connect: no URL given and DATABASE_URL is not set", 3)
  end
  return url
end

function pg.connect(url, opts)
  if url ~= nil and type(url) ~= "string" then error("pg.connect: the URL must be a string", 2) end
  opts = opts or {}
  return native.connect(url or env_url(), {
    connect_timeout = opts.connect_timeout and duration.check(opts.connect_timeout, "pg connect_timeout"),
    timeout = opts.timeout and duration.check(opts.timeout, "pg timeout"),
    lock_timeout = opts.lock_timeout == false and false or opts.lock_timeout and duration.check(opts.lock_timeout, "pg lock_timeout"),
    application_name = opts.application_name, numeric = opts.numeric,
  })
end

--- Quotes an identifier, schema-qualified names part by part: "public"."tasks".
function pg.quote_ident(name)
  if type(name) ~= "string" or name == "" then error("pg: expected a table name, got " .. tostring(name), 3) end
  local parts = {}
  for part in (name .. "."):gmatch("([^.]*)%.") do
    if part == "" then error(("pg: %q is not a valid table name"):format(name), 3) end
    parts[#parts + 1] = '"' .. part:gsub('^"(.*)"$', "%1"):gsub('"', '""') .. '"'
  end
  return table.concat(parts, ".")
end

function conn:one(sql, ...)
  local rows = self:query(sql, ...)
  return rows[1]
end

function conn:value(sql, ...)
  local rows = self:query(sql, ...)
  local row = rows[1]
  if not row then return nil end
  return row[rows.columns[1]]
end

--- Runs fn(self) in a transaction: COMMIT when it returns, ROLLBACK when it
-- raises (the error goes on). A dry run always rolls back.
function conn:transaction(fn)
  if type(fn) ~= "function" then error("transaction expects a function", 2) end
  self:exec("BEGIN READ WRITE")
  local res = table.pack(pcall(fn, self))
  local status = self:status()
  if not res[1] or gate.dry_run() or status.transaction == "failed" then
    if status.connected then self:exec("ROLLBACK") end
    if not res[1] then error(res[2], 0) end
    if status.transaction == "failed" then
      raise { op = "transaction", code = "25P02", message = "the transaction failed and was rolled back" }
    end
  else
    self:exec("COMMIT")
  end
  return table.unpack(res, 2, res.n)
end

-- COPY options: format (csv|text|binary), header, delimiter, null.
local function copy_options(opts)
  opts = opts or {}
  local format = opts.format or "csv"
  if format ~= "csv" and format ~= "text" and format ~= "binary" then
    error("copy: format must be csv, text or binary", 3)
  end
  local o = { "FORMAT " .. format }
  if format == "csv" and opts.header ~= false then o[#o + 1] = "HEADER" end
  local function literal(v) return "'" .. tostring(v):gsub("'", "''") .. "'" end
  if opts.delimiter then o[#o + 1] = "DELIMITER " .. literal(opts.delimiter) end
  if opts.null then o[#o + 1] = "NULL " .. literal(opts.null) end
  return "(" .. table.concat(o, ", ") .. ")"
end

--- copy_to("tasks", path) copies a table; copy_to("SELECT ...", path) a
-- query; a full "COPY ... TO STDOUT" statement is used as given.
function conn:copy_to(what, path, opts)
  if type(what) ~= "string" or type(path) ~= "string" then error("copy_to(sql_or_table, path)", 2) end
  local sql = what
  if not what:match("^%s*[Cc][Oo][Pp][Yy]%s") then
    local source = what:match("^%s*[%w_.\"]+%s*$") and pg.quote_ident(what:match("^%s*(.-)%s*$"))
      or ("(" .. what .. ")")
    sql = ("COPY %s TO STDOUT WITH %s"):format(source, copy_options(opts))
  end
  return native_copy_to(self, sql, path)
end

function conn:copy_from(path, tbl, opts)
  if type(path) ~= "string" or type(tbl) ~= "string" then error("copy_from(path, table)", 2) end
  opts = opts or {}
  copy_options(opts) -- checks them; the module builds the statement itself
  return native_copy_from(self, path, tbl, opts)
end

-- ---- helpers from the seeds -------------------------------------------------

--- Connections by state, against max_connections, and the long-running
-- queries (not idle, running longer than opts.min_duration, default 0).
function conn:activity(opts)
  opts = opts or {}
  local min = opts.min_duration and duration.check(opts.min_duration, "activity min_duration") or 0
  local limit = opts.limit or 10
  local where = opts.all_databases and "true" or "datname = current_database()"
  local out = { by_state = {}, total = 0, max_connections = self:max_connections() }
  for _, r in ipairs(self:query(([[
      SELECT coalesce(state, 'background') AS state, count(*) AS n
      FROM pg_stat_activity WHERE %s GROUP BY 1]]):format(where))) do
    out.by_state[r.state] = r.n
    out.total = out.total + r.n
  end
  out.long_running = self:query(([[
      SELECT pid, usename AS user, application_name, client_addr::text AS client_addr, state,
             wait_event_type, wait_event,
             extract(epoch FROM now() - query_start)::float8 AS seconds, left(query, 500) AS query
      FROM pg_stat_activity
      WHERE %s AND state IS NOT NULL AND state <> 'idle' AND pid <> pg_backend_pid()
        AND now() - query_start >= make_interval(secs => $1)
      ORDER BY query_start LIMIT $2]]):format(where), min, limit)
  out.long_running.columns = nil
  return out
end

--- The `limit` (10) statements with the highest mean execution time, from
-- pg_stat_statements: {{query (first 100 characters, spaces squeezed), calls,
-- mean_ms, total_ms}...}; nil and why when the extension is not in this database.
function conn:slow_statements(limit)
  if not self:value("SELECT to_regclass('pg_stat_statements') IS NOT NULL") then
    return nil, "pg_stat_statements is not installed in this database"
  end
  local rows = self:query([[SELECT left(regexp_replace(query, '\s+', ' ', 'g'), 100) AS query, calls,
      round(mean_exec_time::numeric, 2)::float8 AS mean_ms, round(total_exec_time::numeric, 2)::float8 AS total_ms
    FROM pg_stat_statements ORDER BY mean_exec_time DESC LIMIT $1]], limit or 10)
  rows.columns = nil
  return rows
end

--- The share of this database's block reads served from the buffer cache
-- (pg_stat_database: blks_hit / (blks_hit + blks_read)); nil before any read.
function conn:cache_hit_ratio()
  return self:value([[SELECT blks_hit::float8 / nullif(blks_hit + blks_read, 0)
    FROM pg_stat_database WHERE datname = current_database()]])
end

--- Tables whose dead rows are at least opts.min_share (0.2) of their rows, with
-- at least opts.min_rows (1000) rows: {{table, live, dead, dead_share,
-- last_vacuum}...} (pg_stat_user_tables), the most bloated first.
function conn:bloat(opts)
  opts = opts or {}
  local rows = self:query([[SELECT schemaname || '.' || relname AS table, n_live_tup AS live, n_dead_tup AS dead,
      n_dead_tup::float8 / nullif(n_live_tup + n_dead_tup, 0) AS dead_share,
      greatest(last_vacuum, last_autovacuum)::text AS last_vacuum
    FROM pg_stat_user_tables
    WHERE n_live_tup + n_dead_tup >= $1 AND n_dead_tup::float8 / nullif(n_live_tup + n_dead_tup, 0) >= $2
    ORDER BY 4 DESC]], opts.min_rows or 1000, opts.min_share or 0.2)
  rows.columns = nil
  return rows
end

function conn:max_connections()
  return math.tointeger(tonumber(self:value("SHOW max_connections")))
end

--- Size of a database (default: this one) in bytes, and pretty-printed.
function conn:database_size(name)
  local r = self:one("SELECT pg_database_size(coalesce($1, current_database())) AS bytes, "
    .. "pg_size_pretty(pg_database_size(coalesce($1, current_database()))) AS pretty", name)
  return r.bytes, r.pretty
end

local function backend(self, verb, fn, pid)
  pid = math.type(pid) and math.tointeger(pid)
  if not pid then error(verb .. ": expected a backend pid (an integer)", 3) end
  if pid == self:status().pid then error(verb .. ": refusing to " .. verb .. " this runbook's own connection", 3) end
  local r = self:query { ("SELECT %s($1) AS ok"):format(fn), pid, write = true }
  if r.skipped then return nil, "skipped" end
  return r[1].ok
end

--- pg_terminate_backend / pg_cancel_backend: true when the backend was
-- signalled, false when no such backend; a write a dry run does not perform.
function conn:terminate(pid) return backend(self, "terminate", "pg_terminate_backend", pid) end
function conn:cancel(pid) return backend(self, "cancel", "pg_cancel_backend", pid) end

--- VACUUM (ANALYZE) one table or the whole database; never simulated.
function conn:vacuum_analyze(tbl)
  local n, how = self:exec("VACUUM (ANALYZE)" .. (tbl and (" " .. pg.quote_ident(tbl)) or ""))
  return how ~= "skipped", how
end

--- A session-level advisory lock, held until released or the connection
-- closes. key: an integer or a string (hashed). opts.wait: how long to keep
-- trying (default: once). Raises code "lock_held" when another session holds
-- it. The lock is a <close> value. In a dry run the lock is only tested.
function conn:advisory_lock(key, opts)
  opts = opts or {}
  local arg, expr
  if math.type(key) == "integer" then
    arg, expr = key, "$1::bigint"
  elseif type(key) == "string" and key ~= "" then
    arg, expr = key, "hashtextextended($1, 0)"
  else
    error("advisory_lock: the key must be an integer or a non-empty string", 2)
  end
  local wait = opts.wait and duration.check(opts.wait, "advisory_lock wait") or 0
  local deadline = host.now() + wait
  -- a dry run tests the lock with the transaction-level function, which its rollback releases
  local try = gate.dry_run() and "pg_try_advisory_xact_lock" or "pg_try_advisory_lock"
  while not self:value(("SELECT %s(%s)"):format(try, expr), arg) do
    if host.now() >= deadline then
      raise { op = "advisory_lock", code = "lock_held", retryable = true,
        message = ("advisory lock %s is held by another session"):format(tostring(key)) }
    end
    host.sleep(math.min(0.2, math.max(0.01, deadline - host.now())))
  end
  local db, held = self, true
  local lock = {}
  function lock.release()
    if held then
      held = false
      db:value(("SELECT pg_advisory_unlock(%s)"):format(expr), arg)
    end
    return true
  end
  if gate.dry_run() then held = false end -- tested, not held: a dry run must not block a real run
  return setmetatable(lock, { __close = function() lock.release() end, __index = { key = key } })
end

-- ---- the shared connection --------------------------------------------------

local shared
local function default()
  if not shared or not shared:status().connected then shared = pg.connect() end
  return shared
end

for _, name in ipairs { "query", "exec", "one", "value", "transaction", "copy_to", "copy_from", "activity",
  "slow_statements", "cache_hit_ratio", "bloat",
  "max_connections", "database_size", "terminate", "cancel", "vacuum_analyze", "advisory_lock" } do
  pg[name] = function(...) local db = default(); return db[name](db, ...) end
end

-- ---- backup and restore -----------------------------------------------------

-- libpq's environment variables, so neither the password nor the URL is on
-- the command line (where ps would show it).
local PGENV = {
  host = "PGHOST", hostaddr = "PGHOSTADDR", port = "PGPORT", dbname = "PGDATABASE", user = "PGUSER",
  password = "PGPASSWORD", sslmode = "PGSSLMODE", sslrootcert = "PGSSLROOTCERT", sslcert = "PGSSLCERT",
  sslkey = "PGSSLKEY", sslcrl = "PGSSLCRL", connect_timeout = "PGCONNECT_TIMEOUT", options = "PGOPTIONS",
  application_name = "PGAPPNAME", target_session_attrs = "PGTARGETSESSIONATTRS", service = "PGSERVICE",
  passfile = "PGPASSFILE", channel_binding = "PGCHANNELBINDING", gssencmode = "PGGSSENCMODE",
  sslcompression = "PGSSLCOMPRESSION", sslsni = "PGSSLSNI", krbsrvname = "PGKRBSRVNAME",
  requirepeer = "PGREQUIREPEER", ssl_min_protocol_version = "PGSSLMINPROTOCOLVERSION",
  ssl_max_protocol_version = "PGSSLMAXPROTOCOLVERSION",
}

local function pg_env(url)
  local env = {}
  for k, v in pairs(native.conninfo(url)) do
    if PGENV[k] then env[PGENV[k]] = v
    elseif k ~= "fallback_application_name" and k ~= "client_encoding" then
      raise { op = "conninfo", code = "unsupported",
        message = ("%s= cannot be passed to pg_dump; set it in the environment"):format(k) }
    end
  end
  env.PGAPPNAME = env.PGAPPNAME or "runbook"
  return env
end

local function is_dir(path)
  return require("lfs").attributes(path, "mode") == "directory"
end

-- A directory-format dump's checksum: of its files' sorted sha256sum lines.
local function dump_digest(path)
  if not is_dir(path) then
    -- in this process (nettle: SHA extensions where the CPU has them), no sha256sum
    local hash, size = host.sha256_file(path)
    if not hash then raise { op = "checksum", code = "read_failed", message = size } end
    return hash, size
  end
  local r = exec.read { shell = 'cd "$1" && find . -type f -print0 | sort -z | xargs -0 sha256sum', path }
  local size = exec.read { shell = 'cd "$1" && find . -type f -printf "%s\\n" | awk "{s+=\\$1} END {print s+0}"', path }
  local hash = exec.read { "sha256sum", stdin = r.stdout }.stdout:match("^(%x+)")
  return hash, math.tointeger(tonumber(size.stdout))
end

-- Checks a dump parses: pg_restore --list for archives, the trailer for plain SQL.
local function verify_parses(file, format, env)
  if format == "plain" then
    local r = exec.read { "tail", "-c", "200", "--", file }
    if not r.stdout:find("PostgreSQL database dump complete", 1, true) then
      raise { op = "verify", code = "corrupt_dump",
        message = file .. ": plain dump is truncated (no completion trailer)" }
    end
    return
  end
  local r = exec.read { "pg_restore", "--list", "--", file, env = env, check = false }
  if r.status ~= 0 then
    raise { op = "verify", code = "corrupt_dump", message = ("%s: pg_restore cannot read it: %s"):format(file,
      (r.stderr:gsub("%s+$", ""):match("([^\n]*)$"))) }
  end
end

local TABLES = [[
  SELECT n.nspname || '.' || c.relname AS name FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
  WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
    AND n.nspname NOT LIKE 'pg_toast%' ORDER BY 1]]

local function table_counts(db)
  local counts = {}
  for _, t in ipairs(db:query(TABLES)) do
    counts[t.name] = db:value(("SELECT count(*) FROM %s"):format(pg.quote_ident(t.name)))
  end
  return counts
end

local FORMATS = { custom = "c", directory = "d", plain = "p", tar = "t" }

--- pg.dump{url = $DATABASE_URL, file = path, format = "custom", jobs = n,
-- compress = 0..9, counts = true}: pg_dump, then checks and a manifest
-- (path .. ".manifest.json": sha256, size, server version, per-table row
-- counts taken in the dump's own snapshot). Returns the manifest.
function pg.dump(opts)
  if type(opts) ~= "table" or type(opts.file) ~= "string" then error("pg.dump{file = path, ...}", 2) end
  local format = opts.format or "custom"
  if not FORMATS[format] then error("pg.dump: format must be custom, directory, plain or tar", 2) end
  if opts.jobs and format ~= "directory" then error("pg.dump: jobs needs format = \"directory\"", 2) end
  local url = opts.url or env_url()
  local file = opts.file
  return library_effect {
    module = "pg", op = "dump", target = file,
    summary = ("dump %s to %s (%s)"):format(native.conninfo(url).dbname or "the database", file, format),
    perform = function()
      local env = pg_env(url)
      local db <close> = pg.connect(url)
      -- one snapshot for pg_dump and the row counts, so the manifest describes the dump exactly
      db:exec("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
      local snapshot = db:value("SELECT pg_export_snapshot()")
      local argv = { "pg_dump", "--format=" .. FORMATS[format], "--file=" .. file, "--snapshot=" .. snapshot }
      if opts.jobs then argv[#argv + 1] = "--jobs=" .. math.tointeger(opts.jobs) end
      if opts.compress then argv[#argv + 1] = "--compress=" .. math.tointeger(opts.compress) end
      if format == "plain" and opts.clean ~= false then
        argv[#argv + 1] = "--clean"; argv[#argv + 1] = "--if-exists"
      end
      local t0 = host.now()
      argv.env = env
      exec.read(argv)
      local secs = host.now() - t0
      -- After the dump, not beside it: counted by psql in its snapshot while pg_dump ran, the
      -- dump took longer on this 2-core machine than the counts do after it (spec/bench/pg_dump_large.sh).
      local counts = opts.counts ~= false and table_counts(db) or nil
      local version = db:value("SHOW server_version")
      db:exec("COMMIT")
      verify_parses(file, format, env)
      local hash, size = dump_digest(file)
      if not size or size == 0 then raise { op = "dump", code = "empty_dump",
        message = file .. ": pg_dump wrote nothing" } end
      local manifest = {
        file = file:match("([^/]+)$"), format = format, sha256 = hash, size = size,
        database = env.PGDATABASE, server_version = version, tables = counts,
        created_at = os.date("!%Y-%m-%dT%H:%M:%SZ"), pg_dump_seconds = math.floor(secs * 1000 + 0.5) / 1000,
        pg_dump_version = exec.read { "pg_dump", "--version" }.stdout:gsub("%s+$", ""),
      }
      local f = assert(io.open(file .. ".manifest.json", "wb"))
      f:write(json.encode(manifest), "\n")
      f:close()
      return manifest
    end,
  }
end

local function read_manifest(file)
  local f = io.open(file .. ".manifest.json", "rb")
  if not f then return nil end
  local ok, m = pcall(json.decode, f:read("a"))
  f:close()
  if not ok or type(m) ~= "table" then raise { op = "restore", code = "bad_manifest",
    message = file .. ".manifest.json is not valid JSON" } end
  return m
end

--- pg.restore{url = $DATABASE_URL, file = path, clean = true,
-- single_transaction = true, manifest = true}: checks the dump against its
-- manifest (checksum, size) and that it parses before anything is dropped,
-- restores with pg_restore (psql for plain dumps), then compares the
-- restored row counts with the manifest's.
function pg.restore(opts)
  if type(opts) ~= "table" or type(opts.file) ~= "string" then error("pg.restore{file = path, ...}", 2) end
  local url, file = opts.url or env_url(), opts.file
  local m = read_manifest(file)
  if not m and opts.manifest ~= false then
    raise { op = "restore", code = "no_manifest",
      message = file .. ": no manifest (" .. file .. ".manifest.json); pass manifest = false to skip the checks" }
  end
  local format = m and m.format or (is_dir(file) and "directory") or opts.format or "custom"
  local env = pg_env(url)
  if m then
    local hash, size = dump_digest(file)
    if size ~= m.size or hash ~= m.sha256 then
      raise { op = "restore", code = "corrupt_dump",
        message = ("%s does not match its manifest (size %s, expected %s; sha256 %s, expected %s): refusing to restore")
        :format(file, tostring(size), tostring(m.size), tostring(hash):sub(1, 12), tostring(m.sha256):sub(1, 12)) }
    end
  end
  verify_parses(file, format, env)
  return library_effect {
    module = "pg", op = "restore", target = env.PGDATABASE or "the database",
    summary = ("restore %s into %s%s"):format(file, env.PGDATABASE or "the database",
      opts.clean ~= false and " (replacing its objects)" or ""),
    perform = function()
      local argv
      if format == "plain" then
        argv = { "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", file }
        if opts.single_transaction ~= false then argv[#argv + 1] = "--single-transaction" end
      else
        argv = { "pg_restore", "--dbname=" .. (env.PGDATABASE or ""), "--exit-on-error", "--no-owner" }
        if opts.clean ~= false then argv[#argv + 1] = "--clean"; argv[#argv + 1] = "--if-exists" end
        if opts.single_transaction ~= false then argv[#argv + 1] = "--single-transaction"
        elseif opts.jobs then argv[#argv + 1] = "--jobs=" .. math.tointeger(opts.jobs) end
        argv[#argv + 1] = file
      end
      argv.env = env
      exec.read(argv)
      local result = { file = file }
      if m and m.tables then
        local db <close> = pg.connect(url)
        result.tables = table_counts(db)
        for name, n in pairs(m.tables) do
          if result.tables[name] ~= n then
            raise { op = "restore", code = "count_mismatch",
              message = ("%s has %s rows after the restore, the dump had %d")
              :format(name, tostring(result.tables[name]), n) }
          end
        end
      end
      return result
    end,
  }
end

return pg
