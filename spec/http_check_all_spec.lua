-- http.check_all: 200 health checks at once against real local servers
-- (spec/fixtures/http_server.py): fast, slow, failing, timing out, and ports
-- that refuse connections.
local http = require("http")
local exec = require("exec")

local fixtures = debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") .. "/fixtures"

local function start_server(dir)
  local r = exec.read{ shell = [[
    python3 "$1" "$2/port" >"$2/server.log" 2>&1 &
    i=0; while [ ! -s "$2/port" ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done
    echo $! $(cat "$2/port")]], fixtures .. "/http_server.py", dir }
  local pid, port = r.stdout:match("(%d+) (%d+)")
  assert(port, "fixture server did not start: " .. r.stdout .. r.stderr)
  return "http://127.0.0.1:" .. port, function() exec.read{ "kill", pid } end
end

-- Loopback ports nothing listens on: bound, noted, closed.
local function closed_ports(n)
  local out = exec.read{ "python3", "-c", [[
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
for s in socks: s.close()]], tostring(n) }.stdout
  local ports = {}
  for p in out:gmatch("%d+") do ports[#ports + 1] = p end
  return ports
end

local dir, base, stop

setup(function()
  dir = exec.read{ "mktemp", "-d" }.stdout:gsub("%s+$", "")
  base, stop = start_server(dir)
end)

teardown(function()
  if stop then stop() end
  if dir then exec.read{ "rm", "-rf", dir } end
end)

describe("http.check_all", function()
  it("checks 200 targets at once: per-target results, total time near the slowest", function()
    -- kind -> expected shape; 140 fast, 20 slow, 20 failing, 15 refused, 5 timing out
    local urls, kinds = {}, {}
    local function add(kind, url) urls[#urls + 1], kinds[#urls + 1] = url, kind end
    for i = 1, 140 do add(i % 7 == 0 and "json" or "fast", base .. (i % 7 == 0 and "/json?i=" or "/status/200?i=") .. i) end
    for i = 1, 20 do add("slow", ("%s/slow?ms=%d&i=%d"):format(base, 200 + i * 40, i)) end
    for i = 1, 20 do add("failing", ("%s/status/%d?i=%d"):format(base, ({ 500, 503, 404, 429 })[i % 4 + 1], i)) end
    for _, port in ipairs(closed_ports(15)) do add("refused", "http://127.0.0.1:" .. port .. "/health") end
    for i = 1, 5 do add("timeout", ("%s/slow?ms=12000&t=%d"):format(base, i)) end
    assert.are.equal(200, #urls)

    local t0 = require("runbook.host").now()
    -- a timeout well above the slowest answer (1 s): a loaded machine (CI) slows
    -- the fixture's 200 threads, and a fast target must not time out there
    local res = http.check_all{ urls = urls, concurrency = 200, timeout = "4s" }
    local wall = require("runbook.host").now() - t0

    assert.are.equal(200, #res.results)
    assert.is_false(res.ok)
    assert.are.equal(40, res.failed)
    local sum = 0
    for i, r in ipairs(res.results) do
      local kind, what = kinds[i], ("%s target %s"):format(kinds[i], urls[i])
      assert.are.equal(urls[i], r.url, what)
      sum = sum + r.latency
      if kind == "fast" or kind == "json" or kind == "slow" then
        assert.are.same({ true, 200 }, { r.ok, r.status }, what)
        assert.is_nil(r.error, what)
      end
      if kind == "json" then assert.are.same({ ok = true, items = { 1, 2, 3 } }, r.json, what) end
      if kind == "slow" then
        local ms = tonumber(urls[i]:match("ms=(%d+)"))
        assert.is_true(r.latency >= ms / 1000, what .. " answered faster than it sleeps")
      end
      if kind == "failing" then
        assert.are.equal(tonumber(urls[i]:match("/status/(%d+)")), r.status, what)
        assert.are.same({ false, "HTTP " .. r.status }, { r.ok, r.error }, what)
      end
      if kind == "refused" then
        assert.are.same({ false, "couldnt_connect", true }, { r.ok, r.code, r.retryable }, what)
        assert.is_nil(r.status, what)
      end
      if kind == "timeout" then
        assert.are.same({ false, "timeout" }, { r.ok, r.code }, what)
        assert.is_true(r.latency >= 3.9 and r.latency < 6, what .. " latency " .. r.latency)
      end
    end
    io.stderr:write(("\n  check_all: 200 targets in %.3fs (wall %.3fs); slowest target %.3fs; "
      .. "ratio %.2f; sum of latencies %.1fs\n"):format(res.duration, wall, res.slowest,
      res.duration / res.slowest, sum))
    assert.is_true(res.duration <= 2 * res.slowest,
      ("took %.3fs, more than twice the slowest target (%.3fs)"):format(res.duration, res.slowest))
    assert.is_true(sum > 5 * res.duration, "the checks did not overlap")
  end)

  it("names targets given as {name = url} and indexes them by name", function()
    local res = http.check_all{ urls = { backend = base .. "/json", frontend = base .. "/status/503" } }
    assert.are.same({ "backend", "frontend" }, { res.results[1].name, res.results[2].name })
    assert.is_true(res.by_name.backend.ok)
    assert.are.same({ false, 503 }, { res.by_name.frontend.ok, res.by_name.frontend.status })
    assert.are.equal(1, res.failed)
  end)

  it("accepts the statuses listed in expect, or what a function accepts", function()
    local res = http.check_all{ urls = { base .. "/status/204", base .. "/status/200" }, expect = { 204 } }
    assert.are.same({ true, false }, { res.results[1].ok, res.results[2].ok })
    res = http.check_all{ urls = { base .. "/json", base .. "/text" },
      expect = function(r) return r.json ~= nil and r.json.ok == true end }
    assert.are.same({ true, false }, { res.results[1].ok, res.results[2].ok })
  end)

  it("keeps to the concurrency limit", function()
    local urls = {}
    for i = 1, 6 do urls[i] = ("%s/slow?ms=300&c=%d"):format(base, i) end
    local res = http.check_all{ urls = urls, concurrency = 2 }
    assert.is_true(res.ok)
    assert.is_true(res.duration >= 0.9, ("6 x 300ms two at a time took %.3fs"):format(res.duration))
    res = http.check_all{ urls = urls, concurrency = 6 }
    assert.is_true(res.duration < 0.9, ("6 x 300ms at once took %.3fs"):format(res.duration))
  end)

  it("sends the given headers to every target", function()
    local res = http.check_all{ urls = { base .. "/echo", base .. "/echo?2" }, headers = { ["X-Probe"] = "p1" } }
    for _, r in ipairs(res.results) do assert.are.equal("p1", r.json.headers["x-probe"]) end
  end)

  it("returns an empty result for no targets", function()
    local res = http.check_all{ urls = {} }
    assert.are.same({ true, 0, 0 }, { res.ok, res.failed, #res.results })
  end)

  it("keeps a password in a URL out of names and errors", function()
    local res = http.check_all{ urls = { "http://ops:pw-s3cret@127.0.0.1:1/health" } }
    local r = res.results[1]
    assert.are.equal("couldnt_connect", r.code)
    assert.is_nil(r.name:find("pw-s3cret", 1, true))
    assert.is_nil(r.error:find("pw-s3cret", 1, true))
  end)

  it("rejects misuse before anything starts", function()
    assert.has_error(function() http.check_all() end)
    assert.has_error(function() http.check_all{ urls = "http://x" } end)
    assert.has_error(function() http.check_all{ urls = { 42 } } end)
    assert.has_error(function() http.check_all{ urls = { base }, concurrency = 0 } end)
    assert.has_error(function() http.check_all{ urls = { base }, timeout = "soon" } end)
    assert.has_error(function() http.check_all{ urls = { base }, expect = 200 } end)
  end)
end)
