-- Exactly-once effects across crashes: real runs of spec/durable/effects_runbook.lua
-- (six steps, one countable effect each) are killed at systematic points
-- (SIGKILL, SIGTERM, SIGINT, SIGHUP before and after each effect, in flight,
-- with a torn journal line, on a full disk), resumed, and every effect is
-- counted with an independent client (cat, psql, redis-cli, kubectl, kcat).
-- Prints the table. Without the sandbox only the file and command effects run.
local cli = require("spec.support.cli")
local cjson = require("cjson")

local RB = "spec/durable/effects_runbook.lua"
local SANDBOX = os.getenv("DATABASE_URL") and os.getenv("REDIS_URL") and os.getenv("KUBECONFIG")
  and os.getenv("KAFKA_BROKERS")
local KINDS = SANDBOX and { "file", "command", "pg", "redis", "k8s", "kafka" } or { "file", "command" }
local TOPIC = "durable-effects"

local function sh(cmd)
  local p = io.popen(cmd .. " 2>/dev/null")
  local out = p:read("a")
  p:close()
  return out
end

local function journal_of(state)
  return sh("cat " .. cli.quote(state) .. "/runs/*.jsonl")
end

local function run_id_of(state)
  return (sh("ls " .. cli.quote(state) .. "/runs"):match("([^\n]+)%.jsonl"))
end

local function has_event(state, match)
  return function()
    for l in journal_of(state):gmatch("[^\n]+") do
      local ok, e = pcall(cjson.decode, l)
      if ok and type(e) == "table" and match(e) then return true end
    end
    return false
  end
end

-- The kill points.
local cases = {}
local OTHER = { "TERM", "INT", "HUP" }
for k, kind in ipairs(KINDS) do
  -- before the effect: SIGKILL (for the file and the command also the others, in turn); after it: each signal
  for _, sig in ipairs(k <= 2 and { "KILL", OTHER[k], OTHER[k + 1] } or { "KILL" }) do
    cases[#cases + 1] = { row = ("SIG%s before the effect"):format(sig), kind = kind, point = "before", sig = sig }
  end
  for _, sig in ipairs { "KILL", "TERM", "INT", "HUP" } do
    cases[#cases + 1] = { row = ("SIG%s after the effect"):format(sig), kind = kind, point = "after", sig = sig }
  end
  cases[#cases + 1] = { row = "torn journal line (SIGKILL after)", kind = kind, point = "after", sig = "KILL",
    torn = true }
end
for _, sig in ipairs { "KILL", "TERM", "HUP" } do
  cases[#cases + 1] = { row = "in flight (command)", kind = "command", sig = sig, inflight = true }
end
cases[#cases + 1] = { row = "in flight, no check: --on-unknown", kind = "command", sig = "KILL", inflight = true,
  nocheck = true }
if SANDBOX then
  for _, sig in ipairs { "KILL", "TERM" } do
    cases[#cases + 1] = { row = "in flight (pg INSERT blocked on a lock)", kind = "pg", sig = sig, inflight = true,
      pg_lock = true }
  end
end
cases[#cases + 1] = { row = "full disk (tmpfs)", kind = "file", point = "after", full_disk = true }

local function kill_case(c, dir)
  local state = c.full_disk and c.mount or cli.tmpdir()
  local env = { RUNBOOK_STATE_DIR = state }
  local args = { "run", RB, "-p", "dir=" .. dir, "-p", "kinds=" .. table.concat(KINDS, ","), "-p", "topic=" .. TOPIC }
  if c.point then args[#args + 1] = "-p"; args[#args + 1] = ("pause=%s:%s"):format(c.kind, c.point) end
  if c.inflight and c.kind == "command" then args[#args + 1] = "-p"; args[#args + 1] = "inflight=30" end
  if c.nocheck then args[#args + 1] = "-p"; args[#args + 1] = "nocheck=yes" end
  local locker
  if c.pg_lock then
    locker = cli.tmpdir()
    os.execute(("(psql %s -qc 'BEGIN; LOCK TABLE durable_effects IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(3); COMMIT' "
      .. ">/dev/null 2>&1; touch %s/done) &"):format(cli.quote(os.getenv("DATABASE_URL")), locker))
    os.execute("sleep 0.3")
  end
  local p = cli.spawn(args, env)
  if c.point then
    cli.eventually(has_event(state, function(e) return e.event == "log" and e.message == "paused " .. c.kind .. ":" .. c.point end), "pause")
  else
    cli.eventually(has_event(state, function(e) return e.event == "intent" and e.step == c.kind end), "intent")
    os.execute("sleep 0.3")
  end
  c.run_id = run_id_of(state)
  local code
  if c.full_disk then
    os.execute("dd if=/dev/zero of=" .. state .. "/filler bs=4k >/dev/null 2>&1")
    os.execute("touch " .. cli.quote(dir .. "/go-" .. c.kind .. ":" .. c.point))
    code = p.wait()
    c.first_exit = code
    os.execute("rm -f " .. state .. "/filler")
  else
    os.execute("kill -" .. c.sig .. " " .. p.pid)
    code = p.wait()
    c.first_exit = code
  end
  -- the resume passes the pause point (it keeps the run's params)
  if c.point then os.execute("touch " .. cli.quote(dir .. "/go-" .. c.kind .. ":" .. c.point)) end
  if locker then cli.eventually(function() return cli.slurp(locker .. "/done") ~= "" or io.open(locker .. "/done") ~= nil end, "lock released") end
  if c.torn then
    local f = assert(io.open(state .. "/runs/" .. c.run_id .. ".jsonl", "ab"))
    f:write('{"event":"step_end","step":"' .. c.kind .. '","sta')
    f:close()
  end
  local r = cli.run({ "resume", c.run_id, "--yes" }, env)
  c.resumes = { r.code }
  c.checked = r.stderr:find("its check says", 1, true) ~= nil
  if r.code == 76 then
    c.unknown_asked = r.stderr:find("unknown", 1, true) ~= nil
    r = cli.run({ "resume", c.run_id, "--yes", "--on-unknown=skip" }, env)
    c.resumes[#c.resumes + 1] = r.code
  end
  c.final_exit, c.stderr = r.code, r.stderr
  c.journal_ok = cli.run({ "report", c.run_id }, env).code == 0
end

--- Counts of each key, by kind, read with independent clients.
local function count_all(dirs)
  local counts = {}
  local function add(kind, key)
    counts[kind] = counts[kind] or {}
    counts[kind][key] = (counts[kind][key] or 0) + 1
  end
  for _, dir in ipairs(dirs) do
    for _, kind in ipairs { "file", "command" } do
      for key in sh("cat " .. cli.quote(dir .. "/" .. kind .. ".log")):gmatch("[^\n]+") do add(kind, key) end
    end
  end
  if SANDBOX then
    for line in sh(("psql %s -tAc 'SELECT key FROM durable_effects'"):format(cli.quote(os.getenv("DATABASE_URL"))))
      :gmatch("[^\n]+") do add("pg", line) end
    local url = cli.quote(os.getenv("REDIS_URL"))
    for key in sh(("redis-cli -u %s --no-auth-warning --scan --pattern 'durable:count:*'"):format(url)):gmatch("[^\n]+") do
      local n = tonumber(sh(("redis-cli -u %s --no-auth-warning GET %s"):format(url, cli.quote(key))):match("%d+"))
      for _ = 1, n or 0 do add("redis", key:sub(#"durable:count:" + 1)) end
    end
    for name in sh("kubectl get configmap -n todo-chatbot -o name"):gmatch("configmap/durable%-([^\n]+)") do
      add("k8s", name)
    end
    for key in sh(("kcat -C -b %s -t %s -e -q -f '%%k\\n'"):format(cli.quote(os.getenv("KAFKA_BROKERS")), TOPIC))
      :gmatch("[^\n]+") do add("kafka", key) end
  end
  return counts
end

local function key_of(kind, run_id)
  if kind == "k8s" then return run_id:lower() end
  return run_id .. "/" .. kind
end

describe("durable effects under kills", function()
  after_each(cli.cleanup)

  it("counts every effect exactly once after kill and resume, at every kill point", function()
    if SANDBOX then
      os.execute(("psql %s -qc 'CREATE TABLE IF NOT EXISTS durable_effects (key text NOT NULL, at timestamptz NOT NULL DEFAULT now())' >/dev/null 2>&1")
        :format(cli.quote(os.getenv("DATABASE_URL"))))
    end
    local dirs, t0 = {}, os.time()
    for _, c in ipairs(cases) do
      if c.full_disk then
        c.mount = cli.tmpdir()
        if not os.execute("mount -t tmpfs -o size=256k tmpfs " .. c.mount .. " 2>/dev/null") then c.skipped = true end
      end
      if not c.skipped then
        local dir = cli.tmpdir()
        dirs[#dirs + 1] = dir
        local ok, err = pcall(kill_case, c, dir)
        if c.mount then os.execute("umount " .. c.mount .. " 2>/dev/null") end
        if not ok then c.error = tostring(err) end
      end
    end
    local counts = count_all(dirs)
    if SANDBOX then   -- leave the sandbox as it was for the specs after this one
      local url = cli.quote(os.getenv("DATABASE_URL"))
      os.execute(("psql %s -qc 'DROP TABLE durable_effects' >/dev/null 2>&1"):format(url))
      os.execute(("redis-cli -u %s --no-auth-warning --scan --pattern 'durable:*' | xargs -r redis-cli -u %s "
        .. "--no-auth-warning DEL >/dev/null"):format(cli.quote(os.getenv("REDIS_URL")), cli.quote(os.getenv("REDIS_URL"))))
      os.execute("kubectl get configmap -n todo-chatbot -o name | grep '^configmap/durable-' | xargs -r kubectl delete "
        .. "-n todo-chatbot >/dev/null 2>&1")
    end
    local rows, order, problems = {}, {}, {}
    for _, c in ipairs(cases) do
      local r = rows[c.row]
      if not r then
        r = { cases = 0, effects = 0, repeated = 0, lost = 0, checked = 0, on_unknown = 0, bad_exit = 0, unreadable = 0 }
        rows[c.row], order[#order + 1] = r, c.row
      end
      if not c.skipped then
        r.cases = r.cases + 1
        if c.error then problems[#problems + 1] = c.row .. " " .. c.kind .. ": " .. c.error end
        for _, kind in ipairs(KINDS) do
          local n = c.run_id and (counts[kind] or {})[key_of(kind, c.run_id)] or 0
          r.effects = r.effects + 1
          if n > 1 then r.repeated = r.repeated + n - 1 end
          if n < 1 then r.lost = r.lost + 1 end
          if n ~= 1 then problems[#problems + 1] = ("%s %s: %s counted %d (resume said: %s)"):format(c.row, c.kind, kind, n, c.stderr or "") end
        end
        if c.checked then r.checked = r.checked + 1 end
        if c.unknown_asked then r.on_unknown = r.on_unknown + 1 end
        if c.final_exit ~= 0 then
          r.bad_exit = r.bad_exit + 1
          problems[#problems + 1] = ("%s %s: resume exited %s: %s"):format(c.row, c.kind, tostring(c.final_exit), c.stderr or "")
        end
        if not c.journal_ok then r.unreadable = r.unreadable + 1 end
        if c.full_disk and c.first_exit ~= 74 then problems[#problems + 1] = "full disk: the run exited " .. tostring(c.first_exit) end
      end
    end
    local lines = { ("\n  %-40s %5s %7s %8s %4s %8s %10s %9s %10s"):format("kill point", "cases", "effects", "repeated",
      "lost", "checked", "on-unknown", "bad exit", "unreadable") }
    local total = { cases = 0, effects = 0, repeated = 0, lost = 0, checked = 0, on_unknown = 0, bad_exit = 0, unreadable = 0 }
    for _, name in ipairs(order) do
      local r = rows[name]
      for k, v in pairs(r) do total[k] = total[k] + v end
      lines[#lines + 1] = ("  %-40s %5d %7d %8d %4d %8d %10d %9d %10d"):format(name, r.cases, r.effects, r.repeated,
        r.lost, r.checked, r.on_unknown, r.bad_exit, r.unreadable)
    end
    lines[#lines + 1] = ("  %-40s %5d %7d %8d %4d %8d %10d %9d %10d"):format("total (" .. table.concat(KINDS, ",") .. ")",
      total.cases, total.effects, total.repeated, total.lost, total.checked, total.on_unknown, total.bad_exit, total.unreadable)
    lines[#lines + 1] = ("  in %ds"):format(os.time() - t0)
    print(table.concat(lines, "\n"))
    assert.are.same({}, problems)
  end)
end)
