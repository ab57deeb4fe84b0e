-- backupset: sets written against the sandbox's PostgreSQL, then damaged with
-- the shell (a flipped byte, a missing file, a half-written set) to show that
-- verify, list, find and prune see what is on disk, not what they were told.
local backupset = require("backupset")
local cli = require("spec.support.cli")

local function sh(cmd)
  local ok = os.execute(cmd)
  assert(ok, cmd)
end

local function err_of(fn, ...)
  local ok, e = pcall(fn, ...)
  assert(not ok, "expected an error")
  return e
end

describe("backupset", function()
  after_each(cli.cleanup)

  local function sealed(dir, prefix)
    local set = backupset.new(dir, prefix or "todo")
    local m = backupset.seal(set, { database = backupset.dump_database(set) })
    return set.final, m
  end

  it("writes a set under a partial name and renames it when sealed; verify reads it back", function()
    local dir = cli.tmpdir()
    local set = backupset.new(dir, "todo")
    assert.matches("/%.todo%-%d+T%d+Z%.partial$", set.partial)
    local db = backupset.dump_database(set)
    assert.are.same({}, backupset.list(dir, "todo")) -- not listed while partial
    local m = backupset.seal(set, { database = db })
    assert.are.equal(set.final, backupset.latest(dir, "todo"))
    local v = backupset.verify(set.final)
    assert.are.same(m.files, v.files)
    assert.are.equal(3000, v.database.tables["public.tasks"])
    local p = io.popen("sha256sum " .. cli.quote(set.final .. "/database.dump"))
    assert.are.equal(p:read("a"):match("^%x+"), v.files[1].sha256)
    p:close()
    -- a second set in the same second takes the next second's name
    local again = backupset.new(dir, "todo")
    assert.is_true(again.stamp > set.stamp)
  end)

  it("refuses a set with a changed byte, a missing file or no manifest, naming the file", function()
    local dir = cli.tmpdir()
    local path = sealed(dir)
    sh(("printf 'XXXX' | dd of=%s bs=1 seek=3000 conv=notrunc 2>/dev/null"):format(cli.quote(path .. "/database.dump")))
    local e = err_of(backupset.verify, path)
    assert.are.equal("checksum_mismatch", e.code)
    assert.matches("database.dump does not match the manifest", tostring(e))
    sh("rm " .. cli.quote(path .. "/database.dump.manifest.json"))
    sh("rm " .. cli.quote(path .. "/database.dump"))
    assert.are.equal("missing_file", err_of(backupset.verify, path).code)
    sh("rm " .. cli.quote(path .. "/manifest.json"))
    assert.are.equal("bad_manifest", err_of(backupset.verify, path).code)
  end)

  it("finds the newest set before a time, keeps the newest N and leaves other prefixes alone", function()
    local dir = cli.tmpdir()
    for _, name in ipairs { "todo-20260101T000000Z", "todo-20260102T000000Z", "todo-20260103T000000Z",
        "todo-pre-restore-20260104T000000Z", ".todo-20260105T000000Z.partial" } do
      sh(("mkdir -p %s/%s/k8s && echo x > %s/%s/k8s/a.yaml"):format(dir, name, dir, name))
    end
    assert.are.equal(dir .. "/todo-20260103T000000Z", backupset.find(dir, "todo"))
    assert.are.equal(dir .. "/todo-20260102T000000Z", backupset.find(dir, "todo", { before = "2026-01-03T00:00:00Z" }))
    assert.are.equal("no_backup", err_of(backupset.find, dir, "todo", { before = "2025-12-31T00:00:00Z" }).code)
    assert.matches("not a time", tostring(err_of(backupset.find, dir, "todo", { before = "yesterday" })))
    assert.are.equal("/x/y", backupset.find(dir, "todo", { set = "/x/y/" }))

    local removed = backupset.prune(dir, "todo", 2)
    assert.are.same({ dir .. "/todo-20260101T000000Z" }, removed)
    local p = io.popen("ls -A " .. cli.quote(dir))
    local left = {}
    for n in p:read("a"):gmatch("[^\n]+") do left[#left + 1] = n end
    p:close()
    table.sort(left)
    assert.are.same({ ".todo-20260105T000000Z.partial", "todo-20260102T000000Z", "todo-20260103T000000Z",
      "todo-pre-restore-20260104T000000Z" }, left)
    assert.has_error(function() backupset.prune(dir, "todo", 0) end)
  end)

  it("reads the free space df reports", function()
    local p = io.popen("df -P -B1 /tmp | awk 'NR==2 {print $4}'")
    local want = tonumber(p:read("a"))
    p:close()
    local got = backupset.free_bytes("/tmp/does/not/exist/yet")
    assert.is_true(math.abs(got - want) < 64 * 1024 * 1024, ("%d vs %d"):format(got, want))
  end)
end)
