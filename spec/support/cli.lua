--- Helpers for specs that drive the runbook executable as users do.
local M = {}

M.BIN = os.getenv("RUNBOOK_BIN") or "./runbook"

local function shell_quote(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end
M.quote = shell_quote

local function slurp(path)
  local f = io.open(path, "rb")
  if not f then return "" end
  local s = f:read("a")
  f:close()
  return s
end
M.slurp = slurp

--- Writes text to path (binary), returns path.
function M.write(path, text)
  local f = assert(io.open(path, "wb"))
  f:write(text)
  f:close()
  return path
end

--- A fresh temporary directory (removed by M.cleanup()).
local made = {}
function M.tmpdir()
  local p = io.popen("mktemp -d")
  local d = p:read("l")
  p:close()
  made[#made + 1] = d
  return d
end

function M.cleanup()
  for _, d in ipairs(made) do os.execute("rm -rf " .. shell_quote(d)) end
  made = {}
end

--- Write a runbook source to a temporary file and return its path.
function M.runbook(src, name)
  local d = M.tmpdir()
  local path = d .. "/" .. (name or "rb.lua")
  local f = assert(io.open(path, "wb"))
  f:write(src)
  f:close()
  return path
end

--- The JSON lines of every run this process starts with `--output json` (and
-- every resume that writes them) are kept in build/spec-events/PID/, for
-- spec/validate_events_spec.lua to check against the schemas once the other
-- specs ran; those of processes that ended are removed. spec/suite, which runs
-- each file in a process of its own, names one directory for them all instead
-- (RUNBOOK_SPEC_EVENTS). A run ended by SIGKILL is left out: its last line may
-- be torn. A runbook that writes to standard output itself (io.write,
-- io.stdout) puts lines of its own among the events: its run is marked
-- (FILE.raw), and the check passes over them.
M.EVENTS = "build/spec-events"

local events
local function events_dir()
  if events then return events end
  local lfs = require("lfs")
  events = os.getenv("RUNBOOK_SPEC_EVENTS")
  if events then
    os.execute("mkdir -p " .. shell_quote(events))
    return events
  end
  local f = assert(io.open("/proc/self/stat"))
  local pid = f:read("n")
  f:close()
  events = ("%s/%d"):format(M.EVENTS, pid)
  if lfs.attributes(events, "mode") ~= "directory" then
    os.execute("mkdir -p " .. shell_quote(events))
    for old in lfs.dir(M.EVENTS) do
      if old:match("^%d+$") and not lfs.attributes("/proc/" .. old, "mode") then
        os.execute("rm -rf " .. shell_quote(M.EVENTS .. "/" .. old))
      end
    end
  end
  return events
end
M.events_dir = events_dir

local function wants_json(args)
  for i, a in ipairs(args) do
    if a == "--output=json" or a == "-ojson" or (a == "--output" or a == "-o") and args[i + 1] == "json" then
      return true
    end
  end
  return false
end

local function keep_events(args, code, stdout, tmp)
  if code == 137 or not (wants_json(args) or args[1] == "resume" and stdout:match('^{"event":')) then return end
  local base = events_dir() .. "/" .. tmp:match("[^/]+$")
  local f = assert(io.open(base .. ".jsonl", "wb"))
  f:write(stdout)
  f:close()
  f = assert(io.open(base .. ".cmd", "wb"))
  f:write(table.concat(args, " "), "\n")
  f:close()
  local src = args[1] == "run" and slurp(args[2] or "") or ""
  if src:find("io%.write") or src:find("io%.stdout") then assert(io.open(base .. ".raw", "wb")):close() end
end

--- Run `runbook ARGS...` with stdin from /dev/null (no terminal), an optional
-- env prefix table and an optional command to run it under (a list of words,
-- e.g. {"unshare", ...}). Returns {code, stdout, stderr}.
function M.run(args, env, under)
  local d = M.tmpdir()
  os.execute(M.command(args, env, under) .. (" </dev/null >%s/out 2>%s/err; echo $? >%s/code"):format(d, d, d))
  return M.result(args, d)
end

--- The shell words of M.run's `runbook ARGS...`, with env and under.
function M.command(args, env, under)
  local parts = {}
  for k, v in pairs(env or {}) do parts[#parts + 1] = k .. "=" .. shell_quote(v) end
  for _, a in ipairs(under or {}) do parts[#parts + 1] = shell_quote(a) end
  parts[#parts + 1] = M.BIN
  for _, a in ipairs(args) do parts[#parts + 1] = shell_quote(a) end
  return table.concat(parts, " ")
end

--- {code, stdout, stderr} of the run of ARGS that wrote into dir d (out, err,
-- code), its events kept as M.run keeps them.
function M.result(args, d)
  local r = { code = tonumber(slurp(d .. "/code")), stdout = slurp(d .. "/out"), stderr = slurp(d .. "/err") }
  keep_events(args, r.code, r.stdout, d)
  return r
end

--- Run `runbook ARGS...` on a pseudo-terminal, typing each of `answers` (a
-- comma-separated list, "p,y,n") at the next "Run this step?" prompt (see
-- spec/fixtures/pty_run.py). `env` is an optional env prefix table. Returns
-- the exit code and everything written to the terminal.
function M.pty(answers, args, env)
  local parts = {}
  for k, v in pairs(env or {}) do parts[#parts + 1] = k .. "=" .. shell_quote(v) end
  for _, a in ipairs { "python3", "spec/fixtures/pty_run.py", answers, "--" } do parts[#parts + 1] = shell_quote(a) end
  for word in M.BIN:gmatch("%S+") do parts[#parts + 1] = shell_quote(word) end   -- RUNBOOK_BIN may be "valgrind ... ./runbook"
  for _, a in ipairs(args) do parts[#parts + 1] = shell_quote(a) end
  local p = io.popen(table.concat(parts, " ") .. "; echo \"exit=$?\"")
  local out = p:read("a")
  p:close()
  return tonumber(out:match("exit=(%d+)%s*$")), out
end

local FIXTURES = debug.getinfo(1, "S").source:match("^@(.*)/support/[^/]*$") .. "/fixtures"

--- Starts the fixture server spec/fixtures/SCRIPT in the background (it
-- writes its port to the file given as its first argument, then ARGS...);
-- returns the port once it listens, and the pid to kill.
function M.fixture(script, ...)
  local d = M.tmpdir()
  local args = {}
  for _, a in ipairs { ... } do args[#args + 1] = shell_quote(a) end
  local portfile = d .. "/port"
  local p = io.popen(("python3 %s %s %s >%s/log 2>&1 & echo $!;"
    .. " i=0; while [ ! -s %s ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done"):format(
    shell_quote(FIXTURES .. "/" .. script), shell_quote(portfile), table.concat(args, " "), d, shell_quote(portfile)))
  local pid = p:read("l")
  p:close()
  local port = slurp(portfile):match("%d+")
  assert(port, script .. " did not start: " .. slurp(d .. "/log"))
  return port, pid
end

--- A local webhook receiver (http_server.py): {url, posts() -> {{path, body, headers}...}, stop()}.
function M.webhook()
  local port, pid = M.fixture("http_server.py")
  local base = "http://127.0.0.1:" .. port
  return {
    url = base .. "/capture/hook",
    stop = function() os.execute("kill " .. pid) end,
    posts = function()
      local p = io.popen("curl -s -m 5 " .. base .. "/requests")
      local log = require("cjson").decode(p:read("a"))
      p:close()
      local out = {}
      for _, r in ipairs(log) do if r.path:match("^/capture/") then out[#out + 1] = r end end
      return out
    end,
  }
end

--- Decode JSON Lines output into a list of events.
function M.events(stdout)
  local cjson = require("cjson")
  local out = {}
  for line in stdout:gmatch("[^\n]+") do out[#out + 1] = cjson.decode(line) end
  return out
end

--- The events of one kind, in order.
function M.only(events, kind)
  local out = {}
  for _, e in ipairs(events) do if e.event == kind then out[#out + 1] = e end end
  return out
end

--- Poll cond() every 20 ms for up to 10 s; raise naming `what` when it never holds.
function M.eventually(cond, what)
  for _ = 1, 500 do
    if cond() then return end
    os.execute("sleep 0.02")
  end
  error("timed out waiting for " .. what)
end

--- Poll fn every 0.1 s until it returns a truthy value (returned), for up to `secs`; nil after.
function M.wait_until(secs, fn)
  local deadline = os.time() + secs
  repeat
    local v = fn()
    if v then return v end
    os.execute("sleep 0.1")
  until os.time() > deadline
end

--- A TCP port on 127.0.0.1 that nothing listens on now.
function M.free_port()
  local p = io.popen([[python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0));]]
    .. [[ print(s.getsockname()[1])']])
  local port = p:read("l")
  p:close()
  return port
end

--- Start `runbook ARGS...` in the background (stdin /dev/null). Returns
-- {pid, dir, wait = function() -> code, stdout, stderr}.
function M.spawn(args, env)
  local d = M.tmpdir()
  os.execute(("(%s </dev/null >%s/out 2>%s/err; echo $? >%s/code) & echo $! >%s/pid"):format(
    M.command(args, env), d, d, d, d))
  M.eventually(function() return M.slurp(d .. "/pid") ~= "" end, "pid")
  -- The subshell's pid; the runbook process is its only child.
  local sub = M.slurp(d .. "/pid"):match("%d+")
  local pid
  M.eventually(function()
    local p = io.popen("pgrep -P " .. sub)
    pid = p:read("l")
    p:close()
    return pid ~= nil or M.slurp(d .. "/code") ~= ""
  end, "runbook process")
  return { pid = pid, dir = d,
    wait = function()
      M.eventually(function() return M.slurp(d .. "/code") ~= "" end, "exit")
      local code, stdout = tonumber(M.slurp(d .. "/code")), M.slurp(d .. "/out")
      keep_events(args, code, stdout, d)
      return code, stdout, M.slurp(d .. "/err")
    end }
end

--- Start `runbook serve` on a free port of 127.0.0.1 with `args` after it
-- (rules, token file, users ...) and env; returns the spawned process
-- (M.spawn's) and the URL it listens on, once it does.
function M.serve(args, env)
  local argv = { "serve", "--listen", "127.0.0.1:0" }
  table.move(args, 1, #args, #argv + 1, argv)
  local s = M.spawn(argv, env)
  local url = M.wait_until(60, function() return slurp(s.dir .. "/out"):match("http://127%.0%.0%.1:%d+") end)
  assert(url, "serve did not listen: " .. slurp(s.dir .. "/err"))
  return s, url
end

--- The standard output of shell command `cmd`.
function M.sh(cmd)
  local p = io.popen(cmd)
  local out = p:read("a")
  p:close()
  return out
end

--- curl ARGS (shell words): the HTTP status (0 when there was no answer) and the body.
function M.curl(args)
  local out = M.sh("curl -s -m 30 -w '\\n%{http_code}' " .. args)
  local body, status = out:match("^(.*)\n(%d+)%s*$")
  return tonumber(status), body
end

return M
