--- exec: run processes from runbooks.
--
--   exec.run{"pg_dump", "-Fc", "todo", env={PGPASSWORD=pw}, stdin="...",
--            cwd="/tmp", timeout="30s", read=true, check=true}
--     -> {status=0, stdout=..., stderr=..., signal=nil, duration=secs}
--   exec.run{shell="ps aux | wc -l", read=true}   runs /bin/sh -c
--   exec.run{shell='pg_dump "$1" | gzip', db}     list items are the script's $1...
--   exec.read{...}                               run with read=true
--
-- Options:
--   env        variables added to the environment; clear_env=true replaces it
--   stdin      string fed to the process (else it reads /dev/null)
--   timeout    seconds or "500ms"/"30s"/"5m"/"1h"; never longer than the step
--   read       true for commands that only read: they bypass the effect gate
--              and so also run in dry-run; everything else is a write, which
--              dry-run skips, returning {skipped=true, status=0, stdout="", stderr=""}
--   check      (default true) a non-zero exit raises a structured error whose
--              code is the exit status and whose message ends with the last
--              line of stderr; check=false returns the result instead
--
-- Timeouts and Ctrl-C kill the process's whole group and raise errors with
-- code "timeout" (retryable) and "interrupted".
local native = require("runbook.exec")
local duration = require("duration")
local host = require("runbook.host")

local raise = host.raiser "exec"

local exec = {}

local function argv_of(opts)
  if opts.shell then
    if type(opts.shell) ~= "string" then error("shell must be a string", 3) end
    -- list items become $1, $2...: values reach the script unquoted and safe
    return table.move(opts, 1, #opts, 5, { "/bin/sh", "-c", opts.shell, "sh" })
  end
  local argv = table.move(opts, 1, #opts, 1, {})
  if #argv == 0 then error("exec.run needs a command: {\"cmd\", \"arg\"...} or {shell=...}", 3) end
  return argv
end

local function last_line(s)
  return (s:gsub("%s+$", ""):match("([^\n]*)$"))
end

local function check_exit(argv, r)
  if r.status == 0 then return end
  local name = argv[1] == "/bin/sh" and argv[2] == "-c" and "sh -c" or argv[1]
  local why = r.signal and ("killed by signal " .. r.signal) or ("exited with status " .. r.status)
  local tail = last_line(r.stderr)
  raise { op = "run", code = tostring(r.status),
    message = name .. " " .. why .. (tail ~= "" and (": " .. tail) or "") }
end

function exec.run(opts)
  if type(opts) ~= "table" then error("exec.run expects a table", 2) end
  local argv = argv_of(opts)
  local r = native.run {
    argv = argv, env = opts.env, clear_env = opts.clear_env, stdin = opts.stdin,
    cwd = opts.cwd, read = opts.read,
    timeout = opts.timeout and duration.check(opts.timeout, "exec.run timeout"),
  }
  if not r.skipped and opts.check ~= false then check_exit(argv, r) end
  return r
end

function exec.read(opts)
  if type(opts) ~= "table" then error("exec.read expects a table", 2) end
  local o = {}
  for k, v in pairs(opts) do o[k] = v end
  o.read = true
  return exec.run(o)
end

return exec
