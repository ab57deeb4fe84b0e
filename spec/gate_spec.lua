-- The effect gate end to end: a dry run changes nothing, a normal run does it
-- all, and a runbook has no way around the gate.
local cli = require("spec.support.cli")
local cjson = require("cjson")

local function start_server(dir)
  local p = io.popen(([[python3 spec/fixtures/http_server.py %s/port >%s/server.log 2>&1 & echo $!;
    i=0; while [ ! -s %s/port ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done]]):format(dir, dir, dir))
  local pid = p:read("l")
  p:close()
  return "http://127.0.0.1:" .. cli.slurp(dir .. "/port"):gsub("%s", ""), pid
end

local function requests(base)
  local p = io.popen("curl -s " .. base .. "/requests")
  local log = cjson.decode(p:read("a"))
  p:close()
  local methods = {}
  for _, r in ipairs(log) do methods[#methods + 1] = r.method .. " " .. r.path end
  return methods
end

local RB = [[
name = "writes" description = "one of each kind of write"
param "dir" { required = true }
param "url" { required = true }
step "write a file" { run = function(ctx) fs.write(ctx.params.dir .. "/note.txt", "hello\n") end }
step "run a command" { run = function(ctx) exec.run { "touch", ctx.params.dir .. "/marker" } end }
step "post" { run = function(ctx)
  local r = http.post(ctx.params.url .. "/echo", { json = { hello = "world" } })
  return { status = r.status, skipped = r.skipped }
end }
step "read" { run = function(ctx) return { status = http.get(ctx.params.url .. "/json").status } end }
]]

describe("the effect gate", function()
  local dir, base, pid, path
  setup(function()
    dir = cli.tmpdir()
    base, pid = start_server(dir)
    path = cli.runbook(RB)
  end)
  teardown(function()
    os.execute("kill " .. pid)
    cli.cleanup()
  end)

  it("in a dry run performs no write: no file, no command, no POST; reads still run", function()
    local r = cli.run { "run", path, "--dry-run", "--output", "json", "-p", "dir=" .. dir, "-p", "url=" .. base }
    assert.are.equal(0, r.code, r.stderr)
    assert.is_nil(io.open(dir .. "/note.txt"))
    assert.is_nil(io.open(dir .. "/marker"))
    assert.are.same({ "GET /json" }, requests(base))
    local effects = cli.only(cli.events(r.stdout), "effect")
    assert.are.equal(3, #effects)
    for _, e in ipairs(effects) do assert.are.equal("skipped", e.decision) end
    assert.are.same({ "fs", "exec", "http" }, { effects[1].module, effects[2].module, effects[3].module })
    assert.are.same({ skipped = true }, cli.only(cli.events(r.stdout), "step_end")[3].outputs)
  end)

  it("shows would-be effects as 'would ...' lines", function()
    local r = cli.run { "run", path, "--dry-run", "-p", "dir=" .. dir, "-p", "url=" .. base }
    assert.truthy(r.stdout:find("would write 6 bytes to " .. dir .. "/note.txt (not simulated, skipped)", 1, true), r.stdout)
    assert.truthy(r.stdout:find("would run touch " .. dir .. "/marker", 1, true), r.stdout)
    assert.truthy(r.stdout:find("would POST " .. base .. "/echo", 1, true), r.stdout)
  end)

  it("in a normal run performs all three", function()
    local r = cli.run { "run", path, "--output", "json", "-p", "dir=" .. dir, "-p", "url=" .. base }
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("hello\n", cli.slurp(dir .. "/note.txt"))
    assert.truthy(io.open(dir .. "/marker"))
    local seen = requests(base)
    assert.are.equal("POST /echo", seen[#seen - 1])
    for _, e in ipairs(cli.only(cli.events(r.stdout), "effect")) do assert.are.equal("performed", e.decision) end
  end)

  local refusals = {
    { "os.execute('touch /tmp/x')", "os.execute is not available in a runbook: use exec.run" },
    { "io.popen('ls')", "io.popen is not available in a runbook: use exec.run" },
    { "os.remove('/tmp/x')", "os.remove is not available in a runbook: use fs.remove" },
    { "os.rename('/tmp/x', '/tmp/y')", "os.rename is not available in a runbook: use fs.rename" },
    { "io.open('/tmp/x', 'w')", "runbooks write files with fs.write" },
    { "io.open('/tmp/x', 'a+')", "runbooks write files with fs.write" },
    { "require('runbook.host').set_mode('run')", "not a runbook library" },
    { "assert(load(string.dump(function() end)))()", "attempt to load a binary chunk" },
    { "debug.getregistry()", "undeclared global 'debug'" },
    { "package.loaded['runbook.host'].set_mode('run')", "undeclared global 'package'" },
  }
  for _, c in ipairs(refusals) do
    it("refuses " .. c[1], function()
      local r = cli.run { "run", cli.runbook("name = 'x' description = 'd'\nstep 'a' { run = function() " .. c[1] .. " end }\n"),
        "--output", "json" }
      assert.are.equal(1, r.code)
      local e = cli.only(cli.events(r.stdout), "step_end")[1]
      assert.truthy(e.error.message:find(c[2], 1, true), e.error.message)
    end)
  end
end)

describe("the standard library's writers in a dry run", function()
  local host = require("runbook.host")
  local dir
  setup(function() dir = cli.tmpdir() end)
  teardown(function() host.set_mode("run"); cli.cleanup() end)

  local calls = {
    { "io.open for writing", function(d) return io.open(d .. "/x", "w") end },
    { "io.open for update", function(d) return io.open(d .. "/x", "r+") end },
    { "io.output to a file", function(d) return io.output(d .. "/x") end },
    { "io.popen", function(d) return io.popen("touch " .. d .. "/x") end },
    { "os.execute", function(d) return os.execute("touch " .. d .. "/x") end },
    { "os.rename", function(d) return os.rename(d .. "/r", d .. "/x") end },
    { "os.remove", function(d) return os.remove(d .. "/r") end },
    { "os.tmpname", function() return os.tmpname() end },
    { "host.mkdir", function(d) return host.mkdir(d .. "/x") end },
  }
  for _, c in ipairs(calls) do
    it("refuses " .. c[1] .. " in C, and leaves the directory as it was", function()
      assert(io.open(dir .. "/r", "w")):close()
      host.set_mode("dry-run")
      local ok, err = pcall(c[2], dir)
      host.set_mode("run")
      assert.is_false(ok)
      assert.truthy(tostring(err):find("refused: this is a dry run", 1, true), tostring(err))
      local p = io.popen("ls -A " .. cli.quote(dir))
      assert.are.equal("r\n", p:read("a"))
      p:close()
    end)
  end

  it("still reads", function()
    host.set_mode("dry-run")
    local f = io.open(dir .. "/r", "rb")
    host.set_mode("run")
    assert.truthy(f)
    f:close()
  end)
end)
