-- exec: real processes, no fakes.
local exec = require("exec")

local function tmpdir()
  return (exec.read{ "mktemp", "-d" }.stdout:gsub("%s+$", ""))
end

local function raises(f)
  local ok, err = pcall(f)
  assert.is_false(ok, "expected an error")
  assert.is_table(err, "expected a structured error, got " .. tostring(err))
  return err
end

-- A process counts as gone once it is absent or a zombie awaiting its reaper.
local function alive(pid)
  local f = io.open("/proc/" .. pid .. "/stat")
  if not f then return false end
  local stat = f:read("a")
  f:close()
  return stat:match("^%d+ %b() (%a)") ~= "Z"
end

describe("exec.run", function()
  it("passes argv without a shell: hostile strings stay literal", function()
    local hostile = { "$(touch /tmp/pwned)", "; rm -rf /", "`id`", "a b", "'\"", "*", "$HOME" }
    local argv = { "printf", "%s\\n" }
    for _, s in ipairs(hostile) do argv[#argv + 1] = s end
    argv.read = true
    local r = exec.run(argv)
    assert.are.equal(table.concat(hostile, "\n") .. "\n", r.stdout)
    assert.are.equal(0, r.status)
    assert.is_nil(r.signal)
    assert.is_number(r.duration)
  end)

  it("runs /bin/sh -c when given shell=", function()
    local r = exec.run{ shell = "echo one; echo two | tr a-z A-Z", read = true }
    assert.are.equal("one\nTWO\n", r.stdout)
    r = exec.read{ shell = 'printf "%s|" "$@"', "a b", "$(id)" }
    assert.are.equal("a b|$(id)|", r.stdout)
  end)

  it("adds env to the environment, or replaces it with clear_env", function()
    local r = exec.read{ "sh", "-c", 'echo "$RB_X|$PATH"', env = { RB_X = "x y" } }
    assert.are.equal("x y|" .. os.getenv("PATH") .. "\n", r.stdout)
    r = exec.read{ "/usr/bin/env", env = { ONLY = "1" }, clear_env = true }
    assert.are.equal("ONLY=1\n", r.stdout)
  end)

  it("feeds stdin and runs in cwd", function()
    assert.are.equal("hello\0world", exec.read{ "cat", stdin = "hello\0world" }.stdout)
    local dir = tmpdir()
    assert.are.equal(dir .. "\n", exec.read{ "pwd", cwd = dir }.stdout)
    exec.run{ "rmdir", dir }
  end)

  local exits = {
    { "exit 3", "3", "exited with status 3: boom" },
    { "kill -TERM $$", "143", "killed by signal 15" },
  }
  for _, case in ipairs(exits) do
    it("check=true raises on '" .. case[1] .. "'", function()
      local err = raises(function()
        exec.run{ shell = "echo ignored >&2; echo boom >&2; " .. case[1], read = true }
      end)
      assert.are.equal("exec", err.module)
      assert.are.equal(case[2], err.code)
      assert.is_false(err.retryable)
      assert.matches("sh -c " .. case[3], err.message, 1, true)
    end)
  end

  it("check=false returns a non-zero exit", function()
    local r = exec.run{ shell = "echo out; echo err >&2; exit 7", read = true, check = false }
    assert.are.same({ 7, "out\n", "err\n" }, { r.status, r.stdout, r.stderr })
  end)

  it("raises structured errors for a missing command or directory", function()
    assert.are.equal("not_found", raises(function() exec.read{ "rb-no-such-command" } end).code)
    assert.are.equal("bad_cwd", raises(function() exec.read{ "pwd", cwd = "/nonexistent/dir" } end).code)
  end)

  it("rejects misuse", function()
    assert.has_error(function() exec.run{} end)
    assert.has_error(function() exec.read{ "true", timeout = "soon" } end)
    assert.has_error(function() exec.read{ "true", env = { X = {} } } end)
  end)

  it("kills the whole process group on timeout", function()
    local dir = tmpdir()
    local started = os.time()
    local err = raises(function()
      exec.run{ shell = "sleep 100 & echo $$ $! > pids; sleep 100", cwd = dir, timeout = "300ms" }
    end)
    assert.are.equal("timeout", err.code)
    assert.is_true(err.retryable)
    assert.is_true(os.time() - started < 5)
    local f = assert(io.open(dir .. "/pids"))
    local sh, bg = f:read("n", "n")
    f:close()
    assert.is_false(alive(sh))
    assert.is_false(alive(bg))
    exec.run{ "rm", "-r", dir }
  end)

  it("captures 1 MB on both streams without deadlock", function()
    local mb = 1024 * 1024
    local r = exec.read{
      shell = ("head -c %d /dev/zero | tr '\\0' o; head -c %d /dev/zero | tr '\\0' e >&2"):format(mb, mb),
    }
    assert.are.equal(mb, #r.stdout)
    assert.are.equal(mb, #r.stderr)
    assert.are.equal(string.rep("o", 16), r.stdout:sub(-16))
    -- and the reverse: a 1 MB stdin echoed back while we read
    local input = string.rep("0123456789abcdef", 65536)
    assert.are.equal(input, exec.read{ "cat", stdin = input }.stdout)
  end)

  it("runs a command that closes stdin early without dying of SIGPIPE", function()
    local r = exec.read{ "true", stdin = string.rep("x", 4 * 1024 * 1024) }
    assert.are.equal(0, r.status)
  end)
end)

describe("exec and the effect gate", function()
  local host = require("runbook.host")
  local effects

  before_each(function()
    effects = {}
    host.set_effect_sink(function(e) effects[#effects + 1] = e end)
  end)

  after_each(function()
    host.set_mode("run")
    host.set_effect_sink(nil)
  end)

  it("records a run as an effect with a shell-quoted summary", function()
    exec.run{ "printf", "%s", "a b" }
    assert.are.equal(1, #effects)
    local e = effects[1]
    assert.are.same({ "exec", "run", "printf", "run printf %s 'a b'", "performed", true },
      { e.module, e.op, e.target, e.summary, e.decision, e.ok })
  end)

  it("skips writes in dry-run and still runs reads", function()
    host.set_mode("dry-run")
    local dir = exec.read{ "mktemp", "-d" }.stdout:gsub("%s+$", "")
    local r = exec.run{ "touch", dir .. "/written" }
    assert.are.same({ skipped = true, status = 0, stdout = "", stderr = "" }, r)
    assert.is_nil(io.open(dir .. "/written"))
    assert.are.same({ "skipped", "run touch " .. dir .. "/written" }, { effects[1].decision, effects[1].summary })
    host.set_mode("run")
    exec.run{ "rmdir", dir }
  end)

  it("treats env values with credential-like names as secrets", function()
    local ok, err = pcall(exec.run, { shell = 'echo "auth failed for $PGPASSWORD" >&2; exit 2',
                                      env = { PGPASSWORD = "pw-s3cret-9" } })
    assert.is_false(ok)
    assert.is_nil(err.message:find("pw-s3cret-9", 1, true))
    assert.are.equal("***", host.redact("pw-s3cret-9"))
  end)

  it("forwards Ctrl-C to the process group and raises interrupted", function()
    host.install_signal_handlers()
    local t0 = os.time()
    local ok, err = pcall(exec.run, { shell = "kill -INT $PPID; sleep 30", timeout = 20 })
    host.clear_interrupt()
    assert.is_false(ok)
    assert.are.equal("interrupted", err.code)
    assert.is_true(os.time() - t0 < 5)
    assert.is_false(effects[1].ok)
  end)
end)
