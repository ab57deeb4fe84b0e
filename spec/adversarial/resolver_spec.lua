-- Class 6, deadlines, for names: a DNS server that never answers. Each
-- library resolving a host name stops at the call's own deadline with a clear
-- error, as a connect that never completes does, not at the resolver's own
-- timeouts (seconds per try, per server) nor at the step's watchdog. The run
-- sees a resolver of its own: /etc/resolv.conf bound, in a mount namespace of
-- its own (unshare -m, as root), to a file naming a local UDP port that
-- swallows every query (127.0.0.153, clear of any local resolver).
local cli = require("spec.support.cli")
local host = require("runbook.host")

local NAME = "dns-blackhole.runbook-spec.example"
local LIMIT, SLACK = 2, 4   -- the calls' own timeouts; what a loaded machine adds

local CALLS = {
  { "redis.connect", ('redis.connect("redis://%s:6379", { connect_timeout = "2s" })'):format(NAME) },
  { "tls.certificate", ('tls.certificate("%s", 443, { timeout = "2s" })'):format(NAME) },
  { "kafka over the wire", ('kafka.connect{ brokers = "%s:9092", connect_timeout = "2s", timeout = "2s" }:watermarks("t")'):format(NAME) },
  { "http.get", ('http.get("http://%s/", { timeout = "2s" })'):format(NAME) },
  { "pg.connect", ('pg.connect("postgresql://u@%s/db", { connect_timeout = "2s" })'):format(NAME) },
}

describe("adversarial: a resolver that never answers", function()
  local dir, under
  setup(function()
    dir = cli.tmpdir()
    -- A UDP "DNS server" on 127.0.0.153:53 that reads and never answers.
    local py = cli.write(dir .. "/blackhole.py", [[
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.153", 53))
open(sys.argv[1], "w").write("up")
while True:
    s.recvfrom(4096)
]])
    os.execute(("python3 %s %s/up >/dev/null 2>&1 & echo $! >%s/pid"):format(py, dir, dir))
    for _ = 1, 100 do
      if cli.slurp(dir .. "/up") == "up" then break end
      os.execute("sleep 0.1")
    end
    assert.are.equal("up", cli.slurp(dir .. "/up"), "the silent DNS server did not start")
    local conf = cli.write(dir .. "/resolv.conf", "nameserver 127.0.0.153\noptions timeout:5 attempts:3\n")
    under = { "timeout", "-s", "KILL", "60", "unshare", "-m", "sh", "-c",
      'mount --bind "$0" /etc/resolv.conf && exec "$@"', conf }
  end)
  teardown(function()
    os.execute(("kill %s 2>/dev/null"):format(cli.slurp(dir .. "/pid"):match("%d+") or ""))
    cli.cleanup()
  end)

  for _, c in ipairs(CALLS) do
    it(c[1] .. " ends at its own deadline, naming the host", function()
      local path = cli.runbook(('name = "resolve" description = "a name nobody answers for"\n'
        .. 'step "call" { run = function() local _ = %s end }\n'):format(c[2]))
      local t0 = host.now()
      local r = cli.run({ "run", path, "--yes" }, nil, under)
      local took = host.now() - t0
      assert.are.equal(1, r.code, r.stdout .. r.stderr)
      assert.truthy(took < LIMIT + SLACK, ("took %.1fs:\n%s%s"):format(took, r.stdout, r.stderr))
      assert.truthy((r.stdout .. r.stderr):find(NAME, 1, true), r.stdout .. r.stderr)
      assert.is_nil((r.stdout .. r.stderr):find("traceback", 1, true))
    end)
  end
end)
