-- The command line: describe, lint, list, version, help and usage errors.
local cli = require("spec.support.cli")

describe("cli", function()
  teardown(cli.cleanup)

  it("describes a runbook's params and steps without running it", function()
    local r = cli.run { "describe", "examples/hello.lua" }
    assert.are.equal(0, r.code, r.stderr)
    for _, want in ipairs { "hello 1.0.0", "Params:", "name                 string, required", "who to greet",
      "Steps:", "1. Greet", "3. Write the note  [can be undone]", "4. Touch a marker  [conditional]" } do
      assert.truthy(r.stdout:find(want, 1, true), want .. "\n" .. r.stdout)
    end
  end)

  it("describes the seed procedures a runbook replaces", function()
    local r = cli.run { "describe", "runbooks/rollback.lua" }
    assert.are.equal(0, r.code, r.stderr)
    assert.truthy(r.stdout:find("Replaces seed procedures: 000-5, 004-9\n", 1, true), r.stdout)
    r = cli.run { "describe", "examples/hello.lua" }
    assert.falsy(r.stdout:find("Replaces", 1, true), r.stdout)
  end)

  it("lints runbooks, and lists those on RUNBOOK_PATH with their descriptions", function()
    local r = cli.run { "lint", "examples/hello.lua" }
    assert.are.equal(0, r.code, r.stderr)
    assert.truthy(r.stdout:find("examples/hello.lua: ok (3 params, 4 steps)", 1, true), r.stdout)
    r = cli.run({ "list" }, { RUNBOOK_PATH = "examples" })
    assert.are.equal(0, r.code)
    assert.truthy(r.stdout:find("hello%s+Greets someone"), r.stdout)
  end)

  it("runs a runbook by name from RUNBOOK_PATH", function()
    local r = cli.run({ "run", "hello", "-p", "name=x", "--dry-run" }, { RUNBOOK_PATH = "/nonexistent:examples" })
    assert.are.equal(0, r.code, r.stderr)
    r = cli.run({ "run", "nope" }, { RUNBOOK_PATH = "examples" })
    assert.are.equal(3, r.code)
    assert.truthy(r.stderr:find("no runbook named 'nope' on RUNBOOK_PATH (examples)", 1, true), r.stderr)
  end)

  local usage = {
    { {}, "Usage: runbook" },
    { { "frobnicate" }, "unknown command 'frobnicate'" },
    { { "run" }, "run: expected one runbook FILE or NAME" },
    { { "run", "examples/hello.lua", "--bogus" }, "unknown option '--bogus'" },
    { { "run", "examples/hello.lua", "--from" }, "option '--from' requires an argument" },
    { { "run", "examples/hello.lua", "--output", "xml" }, "argument for option '--output' must be one of 'text', 'json'" },
    { { "run", "examples/hello.lua", "-p" }, "option '-p' requires an argument" },
    { { "run", "examples/hello.lua", "-p", "name=x", "-o" }, "option '-o' requires an argument" },
    { { "run", "examples/hello.lua", "examples/hello.lua" }, "too many arguments" },
    { { "describe" }, "describe: expected one runbook" },
  }
  for _, c in ipairs(usage) do
    it("exits 2 for: runbook " .. table.concat(c[1], " "), function()
      local r = cli.run(c[1])
      assert.are.equal(2, r.code)
      assert.truthy(r.stderr:find(c[2], 1, true), r.stderr)
    end)
  end

  it("prints its version and help", function()
    assert.truthy(cli.run({ "version" }).stdout:match("^runbook %d+%.%d+%.%d+ %(Lua 5%.4%)"))
    local r = cli.run { "help" }
    assert.are.equal(0, r.code)
    assert.truthy(r.stdout:find("Exit status: 0 success", 1, true))
  end)

  it("loads a backend library only when a runbook uses it", function()
    local function libs_loaded(body)
      local path = cli.runbook("name = 'noop' description = 'd'\nstep 'a' { run = function() " .. body .. " end }\n")
      -- Without a Pushgateway: pushing the run's metrics at its end loads libcurl (the sandbox's env sets one).
      local p = io.popen("RUNBOOK_PUSHGATEWAY= LD_DEBUG=libs " .. cli.BIN .. " run " .. path .. " 2>&1 >/dev/null")
      local out = p:read("a")
      p:close()
      return out
    end
    local idle = libs_loaded("")
    for _, lib in ipairs { "libcurl", "librdkafka", "libpq", "libhiredis", "libssl" } do
      assert.falsy(idle:find(lib, 1, true), lib .. " was loaded by a no-op runbook")
    end
    assert.truthy(libs_loaded("local _ = http.get"):find("libcurl", 1, true))
  end)

  it("reads a plain run, as serve and timers start one, without building the command grammar", function()
    local path = cli.runbook("name = 'noop' description = 'd'\nparam 'g' {}\nstep 'a' { run = function() end }\n")
    local state = cli.tmpdir()
    local function opened(args)
      local p = io.popen(("RUNBOOK_STATE_DIR=%s strace -f -qq -e trace=openat %s run %s %s 2>&1 >/dev/null")
        :format(state, cli.BIN, path, args))
      local out = p:read("a")
      p:close()
      return out
    end
    local id = "20261206T170000Z-0a1b2c3d"
    local plain = opened("-p g=x --dry-run -o json --run-id " .. id)
    assert.truthy(plain:find(id .. ".jsonl", 1, true), plain)
    assert.falsy(plain:find("grammar", 1, true), "the grammar was built for a plain run")
    assert.truthy(opened("--from a --dry-run"):find("grammar", 1, true))
  end)

  it("reports a library's failure as module.op: message, naming the file once", function()
    local missing = cli.tmpdir() .. "/missing.txt"
    local path = cli.runbook(("name = 'fs-error' description = 'd'\n"
      .. "step 'read' { run = function() fs.read(%q) end }\n"):format(missing))
    local r = cli.run { "run", path }
    assert.are.equal(1, r.code, r.stderr)
    local out = r.stdout .. r.stderr
    assert.truthy(out:find("fs.read: " .. missing .. ": No such file or directory", 1, true), out)
    assert.are.equal(1, select(2, out:gsub(missing:gsub("%p", "%%%0"), "")), out)
  end)
end)
