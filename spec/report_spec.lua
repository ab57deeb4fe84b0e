-- `runbook report` for a postmortem: every time with its date and UTC offset,
-- and the timeline as a Mermaid Gantt chart (rendered by GitHub and GitLab).
local cli = require("spec.support.cli")

local RB = [[
name = "timed" description = "three steps, one failing"
step "Warm up" { run = function() time.sleep("200ms") end }
step "Skip me" { when = function() return false end, run = function() end }
step "Break: now" { run = function() log.info("about to break"); error("broken") end }
]]

local STAMP = "%d%d%d%d%-%d%d%-%d%d %d%d:%d%d:%d%d%.%d%d%d [+-]%d%d:%d%d"

describe("report", function()
  teardown(cli.cleanup)

  it("shows every time with its date and UTC offset, and the timeline as a Mermaid Gantt chart", function()
    local env = { RUNBOOK_STATE_DIR = cli.tmpdir(), TZ = "Europe/Berlin" }
    local r = cli.run({ "run", cli.runbook(RB) }, env)
    assert.are.equal(1, r.code, r.stdout .. r.stderr)
    local id = r.stdout:match("runbook resume (%S+)")
    local md = cli.run({ "report", id }, env).stdout
    assert.matches("| Started | " .. STAMP .. " |", md)
    assert.matches("| " .. STAMP .. " | 1%. Warm up | ok |", md)
    assert.matches("started " .. STAMP, md)
    assert.matches(STAMP .. " INFO  about to break", md)
    assert.matches("%+0[12]:00", md)   -- Berlin: +01:00 or +02:00, not UTC
    local chart = md:match("```mermaid\n(gantt\n.-)```")
    assert.truthy(chart, md)
    assert.matches("dateFormat YYYY%-MM%-DDTHH:mm:ss%.SSS\n  axisFormat %%H:%%M:%%S\n", chart)
    assert.matches("\n  1%. Warm up %(ok%) :done, s1, %d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d%d%d, (%d+)ms\n", chart)
    assert.matches("\n  2%. Skip me %(skipped%) :s2, ", chart)
    assert.matches("\n  3%. Break  now %(failed%) :crit, s3, ", chart)   -- ':' would end the task's name
    local ms = tonumber(chart:match("Warm up %(ok%) :done, s1, %S+ (%d+)ms"))
    assert.is_true(ms >= 200 and ms < 2000, tostring(ms))
  end)
end)

local cjson = require("cjson")

--- The events of a run's journal, read from its file.
local function journal_events(state, id)
  local out = {}
  for line in cli.slurp(state .. "/runs/" .. id .. ".jsonl"):gmatch("[^\n]+") do out[#out + 1] = cjson.decode(line) end
  return out
end

local function sh(cmd)
  local p = io.popen(cmd)
  local out = p:read("a")
  p:close()
  return (out:gsub("%s+$", ""))
end

local PARAMS = [[
name = "written" description = "params of every kind"
param "window" { type = "duration", default = "1h" }
param "since" { type = "duration", default = "90m" }
param "token" { type = "string", secret = true }
param "count" { type = "integer" }
step "Use" { run = function(ctx) log.info("window is %d s", ctx.params.window) end }
]]

local ASK = [[
name = "asked" description = "steps the operator is asked about"
param "dir" { type = "string", required = true }
step "Write a" { run = function(ctx) log.info("writing a"); fs.write(ctx.params.dir .. "/a", "a") end }
step "Write b" { run = function(ctx) fs.write(ctx.params.dir .. "/b", "b") end }
step "Write c" { run = function(ctx) fs.write(ctx.params.dir .. "/c", "c") end }
step "Write d" { run = function(ctx) fs.write(ctx.params.dir .. "/d", "d") end }
]]

describe("report for a postmortem", function()
  teardown(cli.cleanup)

  it("shows params as they were written, secrets masked, and who ran it where", function()
    local state = cli.tmpdir()
    local env = { RUNBOOK_STATE_DIR = state }
    local r = cli.run({ "run", cli.runbook(PARAMS), "-p", "window=24h", "-p", "token=s3cr3t-t0ken", "-p", "count=007" },
      env)
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    local id = sh("ls " .. state .. "/runs"):match("^(.-)%.jsonl$")
    local journal = cli.slurp(state .. "/runs/" .. id .. ".jsonl")
    assert.is_nil(journal:find("s3cr3t", 1, true))
    local start = journal_events(state, id)[1]
    assert.are.same({ window = "24h", since = "90m", token = "***", count = "007" }, start.params_text)
    local md = cli.run({ "report", id }, env).stdout
    assert.matches("| window | `24h` |", md, 1, true)
    assert.matches("| since | `90m` |", md, 1, true)   -- the default, as the runbook wrote it
    assert.matches("| count | `007` |", md, 1, true)
    assert.matches("| token | `***` |", md, 1, true)
    assert.is_nil(md:match("## Parameters\n(.-)\n## "):find("86400", 1, true))
    assert.is_nil(md:find("s3cr3t", 1, true))
    local function literal(text) return (text:gsub("%p", "%%%0")) end
    assert.matches(("| By | %s@%s %%(pid %%d+%%) |"):format(literal(sh("id -un")), literal(sh("uname -n"))), md)
    assert.matches("| Ended | " .. STAMP .. " |", md)
    local doc = cjson.decode(cli.run({ "report", id, "--format", "json" }, env).stdout)
    assert.are.equal("24h", doc.params.window)
    assert.are.equal(86400, doc.values.window)
  end)

  it("journals and shows every answer at a prompt with its time, and every preview", function()
    local state, dir = cli.tmpdir(), cli.tmpdir()
    local env = { RUNBOOK_STATE_DIR = state }
    local rb = cli.runbook(ASK)
    local code, out = cli.pty("p,y,n,a", { "run", rb, "-p", "dir=" .. dir, "--step" }, env)
    assert.are.equal(0, code, out)
    assert.are.equal("a\nc\nd", sh("ls " .. dir))   -- b was skipped, d ran without asking after "all"
    local id = sh("ls -t " .. state .. "/runs | head -1"):match("^(.-)%.jsonl$")
    local answers = {}
    for _, e in ipairs(journal_events(state, id)) do
      if e.event == "answer" then
        answers[#answers + 1] = e.step .. "=" .. e.answer
        assert.matches("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d%d%dZ$", e.asked)
        assert.is_true(e.time >= e.asked)
      end
    end
    assert.are.same({ "Write a=preview", "Write a=yes", "Write b=no", "Write c=all" }, answers)
    if os.execute("python3 -c 'import jsonschema' 2>/dev/null") then   -- as journaled, against docs/events
      local check = sh(("grep -E '\"event\":\"(answer|preview_start|preview_end)\"' %s/runs/%s.jsonl | python3 -c '%s' 2>&1")
        :format(state, id, "import json, sys, jsonschema\n"
          .. "for line in sys.stdin:\n"
          .. "    e = json.loads(line)\n"
          .. "    jsonschema.validate(e, json.load(open(\"docs/events/%s.schema.json\" % e[\"event\"])))\n"
          .. "    print(e[\"event\"])"))
      assert.are.equal("answer\npreview_start\npreview_end\nanswer\nanswer\nanswer", check)
    end
    local md = cli.run({ "report", id }, env).stdout
    local a = md:match("### 1%. Write a: ok\n(.-)\n### ")
    assert.matches("Operator:\n\n%- asked " .. STAMP .. ", answered %*%*preview%*%* at " .. STAMP
      .. "\n  %- preview ok, " .. STAMP .. " to " .. STAMP .. ":\n    %- " .. STAMP
      .. " %*%*would %(not simulated%)%*%* write 1 bytes to " .. dir:gsub("%p", "%%%0") .. "/a", a)
    assert.matches("    " .. STAMP .. " INFO  writing a\n", a)              -- the preview's log
    assert.matches("\n%- asked " .. STAMP .. ", answered %*%*yes%*%* at " .. STAMP, a)
    assert.matches("answered %*%*no%*%* at " .. STAMP, md:match("### 2%. Write b: skipped\n(.-)\n### "))
    assert.matches("answered %*%*all%*%* at " .. STAMP, md:match("### 3%. Write c: ok\n(.-)\n### "))
    assert.is_nil(md:match("### 4%. Write d: ok\n(.-)\nJournal: "):find("Operator:", 1, true))

    code, out = cli.pty("q", { "run", rb, "-p", "dir=" .. dir .. "/q", "--step" }, env)
    assert.are.equal(4, code, out)
    id = sh("ls -t " .. state .. "/runs | head -1"):match("^(.-)%.jsonl$")
    md = cli.run({ "report", id }, env).stdout
    assert.matches("### 1%. Write a: aborted\n.-answered %*%*quit%*%* at " .. STAMP, md)
  end)

  it("renders a chart Mermaid's gantt grammar parses, whatever the step names", function()
    local names = { "a: b # c ; d", "fence ``` here", "two\nlines", "title like", "50% done", "click me" }
    local src = { 'name = "odd: names" description = "x"' }
    for _, n in ipairs(names) do src[#src + 1] = ("step %q { run = function() end }"):format(n) end
    local env = { RUNBOOK_STATE_DIR = cli.tmpdir() }
    local r = cli.run({ "run", cli.runbook(table.concat(src, "\n")) }, env)
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    local id = r.stdout:match("run (%d+T%d+Z%-%x+)")
    local md = cli.run({ "report", id }, env).stdout
    local chart = md:match("```mermaid\n(.-)```")
    local lines = {}
    for line in chart:gmatch("[^\n]+") do lines[#lines + 1] = line end
    assert.are.equal("gantt", lines[1])
    assert.matches("^  title [^#\n;]+$", lines[2])
    assert.are.equal("  dateFormat YYYY-MM-DDTHH:mm:ss.SSS", lines[3])
    assert.are.equal("  axisFormat %H:%M:%S", lines[4])
    assert.are.equal("  section Steps", lines[5])
    assert.are.equal(5 + #names, #lines)
    for i = 6, #lines do
      -- The grammar's task line: taskTxt [^#:\n;]+ then taskData ":"[^#\n;]+; the
      -- name starts with its index, so no keyword (title, click, section) begins it.
      local name, data = lines[i]:match("^  (%d+%. [^#:;]+) (:[^#;]+)$")
      assert.truthy(name, lines[i])
      assert.matches("^:done, s" .. (i - 5) .. ", %d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d%d%d, %d+ms$", data)
    end
  end)

  it("shows the dry run's would-be diffs and the Kubernetes context it used", function()
    local kubeconfig = os.getenv("KUBECONFIG")
    if not kubeconfig then return pending("needs the sandbox (KUBECONFIG)") end
    local kubectl = "/usr/lib/google-cloud-sdk/bin/kubectl.1.32 --cache-dir=" .. cli.tmpdir() .. " "
    local target = "-n todo-chatbot deployment/todo-chatbot-notification"
    local before = sh(kubectl .. "get " .. target .. " -o jsonpath='{.spec.replicas}'")
    assert.matches("^%d+$", before)
    local want = tostring(tonumber(before) + 11)
    local env = { RUNBOOK_STATE_DIR = cli.tmpdir() }
    local r = cli.run({ "run", cli.runbook(([[
name = "scale-out" description = "scale the notifier out"
step "Scale" { run = function() k8s.scale("deployment/todo-chatbot-notification", %s, { namespace = "todo-chatbot" }) end }
]]):format(want)), "--dry-run" }, env)
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.are.equal(before, sh(kubectl .. "get " .. target .. " -o jsonpath='{.spec.replicas}'"))
    local id = r.stdout:match("run (%d+T%d+Z%-%x+)")
    local md = cli.run({ "report", id }, env).stdout
    local diff = ("`replicas %s -> %s`"):format(before, want)
    assert.matches("%*%*would%*%* scale deployment todo%-chatbot%-notification to " .. want
      .. " %(k8s scale `todo%-chatbot/deployment/todo%-chatbot%-notification`%) → " .. diff:gsub("[%-%>]", "%%%0"), md)
    assert.matches("## Dry%-run plan\n\n1%. would scale deployment todo%-chatbot%-notification to " .. want .. " → "
      .. diff:gsub("[%-%>]", "%%%0"), md)
    local context = sh(kubectl .. "config current-context")
    local server = sh(kubectl .. "config view --minify -o jsonpath='{.clusters[0].cluster.server}'")
    assert.matches(("| Kubernetes | context %s (%s, user "):format(context, server), md, 1, true)
    assert.matches("| Namespaces | todo-chatbot (of its Kubernetes effects) |", md, 1, true)
  end)
end)
