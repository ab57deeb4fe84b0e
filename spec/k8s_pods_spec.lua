-- Inside the pods: log queries, exec and copy, each run from a runbook by
-- ./runbook against the sandbox's Kubernetes stand-in and checked with kubectl.
local cli = require("spec.support.cli")
local sb = require("spec.sandbox.sandbox_helper")
local k8s_helper = require("spec.runbooks.k8s_helper")
local cjson = require("cjson")

local NS = "todo-chatbot"
local KUBECTL = "/usr/lib/google-cloud-sdk/bin/kubectl.1.32"
local cache

-- kubectl's output; raises when it fails, unless `may_fail` (then also its success).
local function kubectl(args, may_fail)
  local out, ok = sb.sh(("%s --cache-dir=%s -n %s %s"):format(KUBECTL, cache, NS, args))
  if may_fail then return out, ok end
  assert(ok, args .. ": " .. out)
  return out
end

local function pods(app)
  local out = (kubectl("get pods -l app.kubernetes.io/component=" .. app .. " -o json"))
  local names = {}
  for _, p in ipairs(cjson.decode(out).items) do names[#names + 1] = p.metadata.name end
  table.sort(names)
  return names
end

-- Runs a runbook whose one step is `body`; its prints come back as stdout lines.
local function run_step(body, ...)
  local path = cli.runbook(('name = "pods-spec"\ndescription = "spec"\nstep "s" { run = function(ctx)\n%s\nend }\n'):format(body))
  local args = { "run", path, "--yes", ... }
  return cli.run(args)
end

-- The lines a step printed ("    | text" in the human output).
local function printed(out)
  local lines = {}
  for l in out:gmatch("[^\n]+") do
    local t = l:match("^%s+| (.*)$")
    if t then lines[#lines + 1] = t end
  end
  return lines
end

describe("k8s pods", function()
  setup(function()
    cache = cli.tmpdir()
    -- A rollout an earlier spec left going replaces pods under the queries.
    assert(k8s_helper.wait_rolled_out("backend", 120), "the backend did not settle")
  end)
  teardown(cli.cleanup)

  describe("log_query", function()
    -- kubectl's lines of every backend pod, as "stamp pod json" -> record
    local function kubectl_lines(level)
      local set, n = {}, 0
      for _, pod in ipairs(pods("backend")) do
        for l in (kubectl("logs " .. pod .. " -c backend --timestamps")):gmatch("[^\n]+") do
          local stamp, line = l:match("^(%S+) (.*)$")
          local ok, rec = pcall(cjson.decode, line)
          if ok and type(rec) == "table" and rec.level == level then
            set[stamp .. " " .. pod .. " " .. rec.correlation_id] = rec
            n = n + 1
          end
        end
      end
      return set, n
    end

    it("selects JSON records by field across a workload's pods, merged in time order, and counts them", function()
      local seen, before = kubectl_lines("WARNING")
      local r = run_step([[
        local r = k8s.log_query { target = "deploy/todo-chatbot-backend", namespace = "todo-chatbot", container = "backend",
          where = { level = "WARNING" }, count_by = "logger", top = 1 }
        print(("PODS %d COUNT %d"):format(#r.pods, r.count))
        for _, rec in ipairs(r.records) do print(("REC %s %s %s %s"):format(rec.stamp, rec.pod, rec.fields.correlation_id, rec.time)) end
        for _, b in ipairs(r.by) do print(("BY %s %d"):format(b.value, b.count)) end]])
      assert.are.equal(0, r.code, r.stderr .. r.stdout)
      -- A pod's log is a window that slides on: a record may be gone by the second look.
      for k, rec in pairs(kubectl_lines("WARNING")) do seen[k] = rec end
      local out = printed(r.stdout)
      local npods, count = out[1]:match("^PODS (%d+) COUNT (%d+)$")
      assert.are.equal(#pods("backend"), tonumber(npods))
      assert.is_true(tonumber(count) >= before, out[1])
      local last = 0
      for i = 2, #out - 1 do
        local stamp, pod, id, t = out[i]:match("^REC (%S+) (%S+) (%S+) (%S+)$")
        assert.is_truthy(seen[stamp .. " " .. pod .. " " .. id], out[i])
        assert.is_true(tonumber(t) >= last, "records out of time order at " .. out[i])
        last = tonumber(t)
      end
      assert.are.equal(("BY app.db %s"):format(count), out[#out])   -- the slow-query warnings' logger
    end)

    it("matches a pattern in text lines too, and previous containers' logs", function()
      local r = run_step([[
        local all = k8s.log_query { target = "deploy/todo-chatbot-backend", namespace = "todo-chatbot", container = "backend", match = "slow query", tail = 200 }
        print(("MATCH %d OF %d"):format(all.count, all.scanned))
        for _, rec in ipairs(all.records) do assert(rec.line:find("slow query", 1, true) and rec.fields.level == "WARNING") end
        local text = k8s.log_query { selector = "app.kubernetes.io/component=backend", namespace = "todo-chatbot", container = "daprd", tail = 5 }
        local decoded = 0
        for _, rec in ipairs(text.records) do if rec.fields then decoded = decoded + 1 end end
        print(("TEXT %d DECODED %d"):format(text.count, decoded))]])
      assert.are.equal(0, r.code, r.stderr .. r.stdout)
      local out = printed(r.stdout)
      local m, of = out[1]:match("^MATCH (%d+) OF (%d+)$")
      assert.is_true(tonumber(m) > 0 and tonumber(m) < tonumber(of), out[1])
      -- daprd writes logfmt, not JSON; a pod started a moment ago may have fewer than 5 lines
      local n = tonumber(out[2]:match("^TEXT (%d+) DECODED 0$"))
      assert.is_true(n ~= nil and n > 0 and n <= 5 * #pods("backend"), out[2])
    end)

    it("follows several pods' logs as they write them, until its timeout", function()
      local t0 = os.time()
      local r = run_step([[
        for rec in k8s.logs { selector = "app.kubernetes.io/component=backend", namespace = "todo-chatbot",
                              container = "backend", tail = 0, follow = true, timeout = "12s" } do
          print(("REC %s %s %s"):format(rec.pod, rec.stamp, rec.line))
        end]])
      assert.are.equal(0, r.code, r.stdout .. r.stderr)
      assert.is_true(os.time() - t0 >= 11, "the iterator ended before its timeout")
      local seen = {}
      for _, l in ipairs(printed(r.stdout)) do
        local pod, stamp, line = l:match("^REC (%S+) (%S+) (.*)$")
        seen[pod] = (seen[pod] or 0) + 1
        assert.is_truthy(kubectl(("logs %s -c backend --timestamps --since=2m"):format(pod)):find(stamp .. " " .. line, 1, true), l)
      end
      for _, pod in ipairs(pods("backend")) do assert.is_true((seen[pod] or 0) >= 1, "nothing followed from " .. pod) end
    end)

    it("names a bad pattern or a bad where clearly, without a traceback", function()
      for _, case in ipairs {
        { 'match = "[a-z"', "match \"%[a%-z\" is not a valid Lua pattern: malformed pattern" },
        { 'where = "level=ERROR"', "where must be a table of field = value" },
      } do
        local r = run_step(('k8s.log_query { target = "deploy/todo-chatbot-backend", namespace = "todo-chatbot", %s }'):format(case[1]))
        assert.are.equal(1, r.code)
        assert.matches(case[2], r.stdout .. r.stderr)
        assert.not_matches("traceback", r.stdout .. r.stderr)
      end
    end)
  end)

  describe("exec", function()
    local pod
    setup(function() pod = pods("backend")[1] end)

    local function exec_step(lua, ...)
      return run_step(('local P = "pod/%s"\nlocal NS = { namespace = "todo-chatbot" }\n%s'):format(pod, lua), ...)
    end

    -- The command's processes on this machine (the stand-in runs them for real);
    -- "sleep 3[1].25" finds "sleep 31.25" but not this shell's own command line.
    local function running(marker)
      local out = sb.sh("pgrep -f " .. sb.quote(marker:gsub("^(sleep %d)(%d)", "%1[%2]")) .. " || true")
      return (out:gsub("%s+$", ""))
    end

    it("returns the exit status and the streams apart; a non-zero exit raises unless check = false", function()
      local r = exec_step([[
        local r = k8s.exec(P, { "sh", "-c", "echo out; echo err >&2; exit 3" }, { namespace = "todo-chatbot", check = false })
        print(("STATUS %d OUT %s ERR %s IN %s/%s"):format(r.status, r.stdout:gsub("\n", "|"), r.stderr:gsub("\n", "|"), r.pod, r.container))
        local ok, e = pcall(k8s.exec, P, { "sh", "-c", "echo boom >&2; exit 4" }, NS)
        print(("RAISED %s %s"):format(e.code, e.message))]])
      assert.are.equal(0, r.code, r.stdout .. r.stderr)
      local out = printed(r.stdout)
      assert.are.equal(("STATUS 3 OUT out| ERR err| IN %s/backend"):format(pod), out[1])
      assert.matches("^RAISED 4 sh in pod todo%-chatbot/.* container backend exited with status 4: boom$", out[2])
    end)

    it("carries 10 MB of output without loss, and stdin to the command's end of input", function()
      local r = exec_step([[
        local r = k8s.exec(P, { "seq", "1", "1500000" }, NS)
        local want = {}
        for i = 1, 1500000 do want[i] = i end
        want = table.concat(want, "\n") .. "\n"
        print(("BYTES %d SAME %s"):format(#r.stdout, tostring(r.stdout == want)))
        local text = string.rep("line of input\n", 10000)
        r = k8s.exec(P, { "sh", "-c", "wc -l; wc -c </dev/null" }, { namespace = "todo-chatbot", stdin = text })
        print("STDIN " .. r.stdout:gsub("\n", " "))]])
      assert.are.equal(0, r.code, r.stdout .. r.stderr)
      local out = printed(r.stdout)
      assert.matches("^BYTES %d+ SAME true$", out[1])
      assert.is_true(tonumber(out[1]:match("BYTES (%d+)")) > 10 * 1000 * 1000)
      assert.are.equal("STDIN 10000 0 ", out[2])
    end)

    it("falls back to v4.channel.k8s.io when the API server predates v5", function()
      local out, set = sb.ctl("k8s exec-protocol v4")
      assert(set, out)
      local ok, err = pcall(function()
        local r = exec_step([[
          local r = k8s.exec(P, { "sh", "-c", "head -c 5; echo; echo err >&2; exit 7" },
            { namespace = "todo-chatbot", stdin = "hello world", check = false })
          print(("STATUS %d OUT %s ERR %s"):format(r.status, r.stdout:gsub("\n", "|"), r.stderr:gsub("\n", "|")))]])
        assert.are.equal(0, r.code, r.stdout .. r.stderr)
        assert.are.equal("STATUS 7 OUT hello| ERR err|", printed(r.stdout)[1])   -- v4 cannot close stdin: head stops by itself
      end)
      sb.ctl("k8s exec-protocol v5")
      assert(ok, err)
    end)

    it("ends the remote command at its timeout", function()
      local r = exec_step([[
        local ok, e = pcall(k8s.exec, P, { "sleep", "31.25" }, { namespace = "todo-chatbot", timeout = "1s" })
        print(("RAISED %s"):format(e.code))]])
      assert.are.equal(0, r.code, r.stdout .. r.stderr)
      assert.are.equal("RAISED timeout", printed(r.stdout)[1])
      assert.is_true(sb.wait_until(20, function() return running("sleep 31.25") == "" end), "the command outlived its session")
    end)

    it("ends the remote command on Ctrl-C", function()
      local path = cli.runbook(('name = "x"\ndescription = "x"\nstep "s" { run = function() k8s.exec("pod/%s", '
        .. '{ "sleep", "32.5" }, { namespace = "todo-chatbot" }) end }\n'):format(pod))
      local d = cli.tmpdir()
      sb.sh(("%s run %s --yes >%s/out 2>&1 & echo $! >%s/pid"):format(cli.BIN, path, d, d))
      assert.is_true(sb.wait_until(20, function() return running("sleep 32.5") ~= "" end), "the command never started")
      sb.sh("kill -INT $(cat " .. d .. "/pid)")
      assert.is_true(sb.wait_until(20, function() return running("sleep 32.5") == "" end), "the command outlived Ctrl-C")
      assert.matches("interrupted", cli.slurp(d .. "/out"))
    end)

    it("checks.dependencies from a pod: the app's own env, not this machine's", function()
      local function down()
        local r = run_step([[
          local r = checks.dependencies { namespace = "todo-chatbot", from_pod = "deploy/todo-chatbot-notification" }
          print("DOWN " .. table.concat(r.down, ","))]])
        assert.are.equal(0, r.code, r.stdout .. r.stderr)
        return printed(r.stdout)[#printed(r.stdout)], r.stdout
      end
      assert.are.equal("DOWN ", (down()))
      -- the fault: the app's pods get a Redis URL that does not answer, while this machine's works
      kubectl("set env deploy/todo-chatbot-notification -c notification REDIS_URL=redis://127.0.0.1:1/0")
      local ok, err = pcall(function()
        kubectl("rollout status deploy/todo-chatbot-notification --timeout=60s")
        local d, out = down()
        assert.are.equal("DOWN redis from deploy/todo-chatbot-notification", d, out)
        assert.matches("redis: PONG", out)
        assert.matches("postgres from deploy/todo%-chatbot%-notification: answers", out)
      end)
      kubectl("set env deploy/todo-chatbot-notification -c notification REDIS_URL-")
      kubectl("rollout status deploy/todo-chatbot-notification --timeout=60s")
      assert(ok, err)
    end)

    it("names a container the pod does not have", function()
      local r = exec_step([[k8s.exec(P, { "true" }, { namespace = "todo-chatbot", container = "nope" })]])
      assert.are.equal(1, r.code)
      assert.matches(('container "nope" not found in pod "%s"; its containers: backend, daprd'):format(pod):gsub("%-", "%%-"),
        r.stdout .. r.stderr)
    end)

    it("refuses tty with a clear error, not a traceback", function()
      local r = exec_step([[k8s.exec(P, { "true" }, { namespace = "todo-chatbot", tty = true })]])
      assert.are.equal(1, r.code)
      assert.matches("k8s.exec: tty is not supported: a runbook reads the streams separately", r.stdout .. r.stderr)
      assert.not_matches("traceback", r.stdout .. r.stderr)
    end)

    it("reports a write exec in a dry run and runs nothing; a read runs", function()
      local mark = "/tmp/pods-spec-dry-run"
      kubectl(("exec %s -c backend -- rm -f %s"):format(pod, mark))
      local r = exec_step(([[
        local w = k8s.exec(P, { "touch", "%s" }, NS)
        local rd = k8s.exec(P, { "ls", "/var/log" }, { namespace = "todo-chatbot", read = true })
        print(("SKIPPED %%s READ %%s"):format(tostring(w.skipped), rd.stdout:match("backend%%.log") or "?"))]]):format(mark), "--dry-run")
      assert.are.equal(0, r.code, r.stdout .. r.stderr)
      assert.matches(('would run "touch %s" in pod todo%%-chatbot/%s container backend'):format(mark:gsub("%-", "%%-"),
        pod:gsub("%-", "%%-")), r.stdout)
      assert.are.equal("SKIPPED true READ backend.log", printed(r.stdout)[1])
      local _, exists = kubectl(("exec %s -c backend -- test -e %s"):format(pod, mark), true)
      assert.is_false(exists)
    end)
  end)

  describe("cp", function()
    it("copies a directory out of a pod and a file into one (checked with kubectl exec), and not in a dry run", function()
      local pod = pods("backend")[1]
      local dir = cli.tmpdir()
      sb.sh("head -c 300000 /dev/urandom >" .. dir .. "/blob")
      kubectl(("exec %s -c backend -- rm -f /tmp/pods-spec-cp"):format(pod))
      local body = ([[
        local o = { namespace = "todo-chatbot" }
        k8s.cp("%s/blob", "pod/%s:/tmp/pods-spec-cp", o)
        local r = k8s.cp("pod/%s:/var/log", "%s/logs", o)
        print("OUT " .. r.bytes)]]):format(dir, pod, pod, dir)
      local dry = run_step(body, "--dry-run")
      assert.are.equal(0, dry.code, dry.stdout .. dry.stderr)
      assert.matches('would run "sh %-c', dry.stdout)
      local _, there = kubectl(("exec %s -c backend -- test -e /tmp/pods-spec-cp"):format(pod), true)
      assert.is_false(there)
      local r = run_step(body)
      assert.are.equal(0, r.code, r.stdout .. r.stderr)
      local sum = sb.sh("sha256sum <" .. dir .. "/blob"):match("^%x+")
      assert.are.equal(sum, kubectl(("exec %s -c backend -- sha256sum /tmp/pods-spec-cp"):format(pod)):match("^%x+"))
      local listing = kubectl(("exec %s -c backend -- ls /var/log"):format(pod))
      assert.are.equal(listing, (sb.sh("ls " .. dir .. "/logs")))
    end)
  end)
end)
