-- runbooks/dlq-replay.lua against the sandbox: reminders-dlq holds 25 failed
-- reminders (mail failures and template errors). The runbook replays them to
-- reminders; kcat reads both topics independently.
local cli = require("spec.support.cli")
local backends = require("spec.support.backends")
local sb = require("spec.sandbox.sandbox_helper")
local kh = require("spec.runbooks.k8s_helper")

local RUNBOOK = "runbooks/dlq-replay.lua"

-- Every message of a topic as kcat reads it: {key, error header}.
local function messages(topic)
  local out = {}
  for line in sb.kcat("-C -t " .. topic .. " -o beginning -e -q -f '%k\\t%h\\n'"):gmatch("[^\n]+") do
    local key, headers = line:match("^([^\t]*)\t(.*)$")
    out[#out + 1] = { key = key, error = headers and headers:match("error=([^,]*)") }
  end
  return out
end

local function keys(list, pred)
  local out = {}
  for _, m in ipairs(list) do if not pred or pred(m) then out[#out + 1] = m.key end end
  table.sort(out)
  return out
end

-- The dead letters that arrived on reminders since `before` (a count per key of
-- messages with an error header): {key...}, one entry per arrival, sorted.
local function replayed_since(before)
  local now, out = {}, {}
  for _, m in ipairs(messages("reminders")) do
    if m.error then now[m.key] = (now[m.key] or 0) + 1 end
  end
  for k, n in pairs(now) do
    for _ = 1, n - (before[k] or 0) do out[#out + 1] = k end
  end
  table.sort(out)
  return out
end

local function replayed_counts()
  local c = {}
  for _, m in ipairs(messages("reminders")) do if m.error then c[m.key] = (c[m.key] or 0) + 1 end end
  return c
end

-- A mail server for curl's smtp:// check (greeting, EHLO, HELP, QUIT), on a free
-- port, for 120 s: its pid and port.
local SMTP = [[
import socket, sys, threading, time
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(8)
print(s.getsockname()[1], flush=True)
def serve(c):
    f = c.makefile("rwb")
    f.write(b"220 spec ESMTP\r\n"); f.flush()
    for line in f:
        cmd = line[:4].upper()
        f.write(b"221 bye\r\n" if cmd == b"QUIT" else b"214 help\r\n" if cmd == b"HELP" else b"250 ok\r\n"); f.flush()
        if cmd == b"QUIT": break
    c.close()
s.settimeout(120)
try:
    while True: threading.Thread(target=serve, args=(s.accept()[0],), daemon=True).start()
except OSError: pass
]]

local function smtp_server()
  local path = os.tmpname()
  local f = assert(io.open(path, "w"))
  f:write(SMTP)
  f:close()
  local out = sb.sh("python3 " .. path .. " >" .. path .. ".port 2>/dev/null & echo $!")
  local pid = out:match("%d+")
  local port = sb.wait_until(20, function()
    local pf = io.open(path .. ".port")
    local v = pf and pf:read("l")
    if pf then pf:close() end
    return v and v:match("^%d+$")
  end)
  assert(port, "the spec's mail server did not start")
  return pid, port, function() sb.sh("kill " .. pid .. "; rm -f " .. path .. " " .. path .. ".port") end
end

local function group() return ("spec-dlq-%d-%d"):format(os.time(), math.random(1e6)) end

describe("dlq-replay", function()
  setup(kh.reset_world)
  after_each(function()
    kh.reset_world()
    cli.cleanup()
  end)

  it("replays the mail failures to reminders, in batches of max, never the same message twice", function()
    local dlq = messages("reminders-dlq")
    local smtp = keys(dlq, function(m) return m.error:match("^smtp") end)
    assert.is_true(#smtp > 4 and #smtp < #dlq)          -- the seed has both kinds
    local g = group()
    local before = replayed_counts()

    local r = cli.run { "run", RUNBOOK, "-p", "group=" .. g, "-p", "error_match=^smtp", "-p", "max=4", "--yes" }
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("4 messages replayed to reminders", r.stdout)
    r = cli.run { "run", RUNBOOK, "-p", "group=" .. g, "-p", "error_match=^smtp", "--yes" }
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches(("%d messages replayed to reminders"):format(#smtp - 4), r.stdout)

    -- checked with kcat: exactly the mail failures arrived on reminders, each once, with their headers
    assert.are.same(smtp, replayed_since(before))

    -- a third run finds nothing left to replay
    r = cli.run { "run", RUNBOOK, "-p", "group=" .. g, "-p", "error_match=^smtp", "--yes" }
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("; 0 match error_match", r.stdout)
  end)

  it("on a terminal: the operator declines the replay; nothing is produced and there is nothing to verify", function()
    local before = replayed_counts()
    local code, out = cli.pty("n", { "run", RUNBOOK, "-p", "group=" .. group(), "-p", "error_match=^smtp" })
    assert.are.equal(0, code, out)
    assert.truthy(out:find("Replay skipped (by the operator)", 1, true), out)
    assert.truthy(out:find("Verify skipped", 1, true), out)
    assert.are.same({}, replayed_since(before))
  end)

  it("refuses to replay into a consumer that is failing", function()
    sb.ctl("k8s crashloop notification")
    kh.wait_waiting("notification", "CrashLoopBackOff")
    local before = replayed_counts()
    local r = cli.run { "run", RUNBOOK, "-p", "group=" .. group(), "--yes" }
    assert.are.equal(1, r.code, r.stdout .. r.stderr)
    assert.matches("todo%-chatbot%-notification is not healthy", r.stdout)
    assert.are.same({}, replayed_since(before))
  end)

  it("checks the mail server from inside the consumer's pod, and refuses to replay when it does not answer", function()
    local _, port, stop = smtp_server()
    finally(stop)
    local r = cli.run { "run", RUNBOOK, "-p", "group=" .. group(), "-p", "smtp_url=smtp://127.0.0.1:" .. port, "--dry-run" }
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("the mail server answers from pod todo%-chatbot%-notification%-", r.stdout)

    stop()   -- now nothing listens there
    local before = replayed_counts()
    r = cli.run { "run", RUNBOOK, "-p", "group=" .. group(), "-p", "smtp_url=smtp://127.0.0.1:" .. port, "--yes" }
    assert.are.equal(1, r.code, r.stdout .. r.stderr)
    assert.matches("the mail server does not answer from pod todo%-chatbot%-notification%-[%w-]+ %(curl exit 7", r.stdout .. r.stderr)
    assert.are.same({}, replayed_since(before))
  end)

  it("rejects a bad error pattern before reading anything", function()
    local r = cli.run { "run", RUNBOOK, "-p", "error_match=smtp[", "--yes" }
    assert.are.equal(1, r.code, r.stdout .. r.stderr)
    assert.matches("param error_match \"smtp%[\": malformed pattern", r.stdout)
  end)

  it("changes nothing in a dry run, and says what it would replay", function()
    local g = group()
    local r = backends.assert_unchanged(function()
      return cli.run { "run", RUNBOOK, "-p", "group=" .. g, "--dry-run" }
    end, { groups = { g } })
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("would replay %d+ messages from reminders%-dlq to reminders", r.stdout)
  end)
end)
