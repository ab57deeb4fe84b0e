-- Inside the pods: log queries, exec and copy, each run from a runbook by
-- ./runbook against the sandbox's Kubernetes stand-in and checked with kubectl.
local cli = require "spec.support.cli"
local sb = require "spec.sandbox.sandbox_helper"
local cjson = require "cjson"

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
  setup(function() cache = cli.tmpdir() end)
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
      local _, before = kubectl_lines("WARNING")
      local r = run_step([[
        local r = k8s.log_query { target = "deploy/todo-chatbot-backend", namespace = "todo-chatbot", container = "backend",
          where = { level = "WARNING" }, count_by = "logger", top = 1 }
        print(("PODS %d COUNT %d"):format(#r.pods, r.count))
        for _, rec in ipairs(r.records) do print(("REC %s %s %s %s"):format(rec.stamp, rec.pod, rec.fields.correlation_id, rec.time)) end
        for _, b in ipairs(r.by) do print(("BY %s %d"):format(b.value, b.count)) end]])
      assert.are.equal(0, r.code, r.stderr .. r.stdout)
      local after = kubectl_lines("WARNING")
      local out = printed(r.stdout)
      local npods, count = out[1]:match("^PODS (%d+) COUNT (%d+)$")
      assert.are.equal(#pods("backend"), tonumber(npods))
      assert.is_true(tonumber(count) >= before, out[1])
      local last = 0
      for i = 2, #out - 1 do
        local stamp, pod, id, t = out[i]:match("^REC (%S+) (%S+) (%S+) (%S+)$")
        assert.is_truthy(after[stamp .. " " .. pod .. " " .. id], out[i])
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
        print(("TEXT %d %s"):format(text.count, tostring(text.records[1].fields)))]])
      assert.are.equal(0, r.code, r.stderr .. r.stdout)
      local out = printed(r.stdout)
      local m, of = out[1]:match("^MATCH (%d+) OF (%d+)$")
      assert.is_true(tonumber(m) > 0 and tonumber(m) < tonumber(of), out[1])
      assert.are.equal(("TEXT %d nil"):format(5 * #pods("backend")), out[2])   -- daprd writes logfmt, not JSON
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
end)
