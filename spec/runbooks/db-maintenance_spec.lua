-- runbooks/db-maintenance.lua against the sandbox's PostgreSQL: checkpoints
-- holds 2000 rows, most older than 30 days. The runbook purges those in
-- batches and vacuums; psql checks the rows and the vacuum independently.
local cli = require("spec.support.cli")
local backends = require("spec.support.backends")
local sb = require("spec.sandbox.sandbox_helper")

local RUNBOOK = "runbooks/db-maintenance.lua"

local function count(where) return tonumber((sb.psql("SELECT count(*) FROM checkpoints WHERE " .. where))) end

describe("db-maintenance", function()
  local saved
  setup(function()
    saved = cli.tmpdir() .. "/checkpoints.copy"
    sb.psql("\\copy checkpoints TO '" .. saved .. "'")
  end)
  after_each(function()
    sb.psql("TRUNCATE checkpoints")
    sb.psql("\\copy checkpoints FROM '" .. saved .. "'")
  end)
  teardown(cli.cleanup)

  it("purges the checkpoints older than 30 days in batches, keeps the rest, and vacuums", function()
    local old, recent = count("created_at < now() - interval '30 days'"), count("created_at >= now() - interval '30 days'")
    assert.is_true(old > 1000)
    local function last_vacuum()
      return (sb.psql("SELECT coalesce(last_vacuum::text, '') FROM pg_stat_user_tables WHERE relname = 'checkpoints'"))
    end
    local vacuumed = last_vacuum()
    local r = cli.run { "run", RUNBOOK, "--yes", "-p", "batch_size=500", "--output", "json" }
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    local deletes = 0
    for _, e in ipairs(cli.only(cli.events(r.stdout), "effect")) do
      if e.op == "exec" and e.summary:match("^delete %d+ rows from checkpoints") then deletes = deletes + 1 end
    end
    assert.are.equal(math.ceil((old + 1) / 500), deletes)            -- batches of 500, the last one short
    -- checked with psql: no old row left, every recent row kept, VACUUM ran
    assert.are.equal(0, count("created_at < now() - interval '30 days'"))
    assert.are.equal(recent, count("true"))
    assert.truthy(sb.wait_until(10, function() return last_vacuum() ~= vacuumed end), "checkpoints was not vacuumed")
  end)

  it("keeps a given age, and only vacuums with purge=false", function()
    local r = cli.run { "run", RUNBOOK, "--yes", "-p", "older_than=60d" }
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.are.equal(0, count("created_at < now() - interval '60 days'"))
    assert.is_true(count("created_at < now() - interval '30 days'") > 0)
    local before = count("true")
    r = cli.run { "run", RUNBOOK, "--yes", "-p", "purge=false" }
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.are.equal(before, count("true"))
  end)

  it("counts what it would delete in a dry run, and changes nothing", function()
    local old = count("created_at < now() - interval '30 days'")
    local r = backends.assert_unchanged(function()
      return cli.run { "run", RUNBOOK, "--dry-run" }
    end)
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches(("would delete %d rows from checkpoints"):format(old), r.stdout)
    assert.matches("VACUUM %(ANALYZE%) %(not simulated, skipped%)", r.stdout)
  end)
end)
