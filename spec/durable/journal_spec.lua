-- A journal that survives anything: torn, truncated, malformed and fuzzed
-- journals never give a Lua error in any reader, a bad one is named by file
-- and line, `history` goes on listing the others, and a torn journal resumes.
local cli = require("spec.support.cli")
local cjson = require("cjson")

local RUNBOOK = [[
name = "fuzzed"
description = "a journal with every kind of event"
param "dir" { required = true }
param "fail" { default = "no" }
step "write" { run = function(ctx)
  log.info("writing")
  fs.write(ctx.params.dir .. "/f", "x\n", { append = true })
  return { n = 1, s = "v" }
end, undo = function(ctx) fs.write(ctx.params.dir .. "/f", "undo\n", { append = true }) end }
step "command" { run = function(ctx) exec.run { "sh", "-c", "echo c >> " .. ctx.params.dir .. "/f" } end }
step "maybe fail" { run = function(ctx) if ctx.params.fail == "yes" then error("failing as asked") end end }
on_failure = "undo"
]]

local write = cli.write

--- A real journal: a run whose last step fails and undoes the first.
local function real_journal(fail)
  local state, dir = cli.tmpdir(), cli.tmpdir()
  local rb = cli.runbook(RUNBOOK, "fuzzed.lua")
  local r = cli.run({ "run", rb, "-p", "dir=" .. dir, "-p", "fail=" .. (fail or "yes") }, { RUNBOOK_STATE_DIR = state })
  assert.are.equal(fail == "no" and 0 or 1, r.code, r.stderr)
  local p = io.popen("cat " .. state .. "/runs/*.jsonl")
  local text = p:read("a")
  p:close()
  return text, rb, dir
end

-- What a run asked at a prompt and the Kubernetes context it used, as the
-- journal holds them, for the readers to meet mutated too.
local ASKED = [[
{"event":"kubernetes_context","time":"2026-12-06T10:00:00.000Z","context":"c","namespace":"n","cluster":"k","server":"https://k","user":"u"}
{"event":"answer","time":"2026-12-06T10:00:01.000Z","step":"write","answer":"preview","asked":"2026-12-06T10:00:00.500Z"}
{"event":"preview_start","time":"2026-12-06T10:00:01.000Z","step":"write"}
{"event":"effect","time":"2026-12-06T10:00:01.100Z","step":"write","module":"k8s","op":"scale","target":"n/deployment/d","summary":"scale","decision":"simulated","ok":true,"result":{"summary":"replicas 1 -> 2"}}
{"event":"preview_end","time":"2026-12-06T10:00:01.200Z","step":"write","status":"failed","error":{"message":"m"}}
{"event":"answer","time":"2026-12-06T10:00:02.000Z","step":"write","answer":"yes","asked":"2026-12-06T10:00:01.200Z"}
]]

local function lines_of(text)
  local out = {}
  for l in text:gmatch("[^\n]+") do out[#out + 1] = l end
  return out
end

--- Every mutation of every field of every line: deleted, or of each wrong type.
local WRONG = { 7, "text", { 1, 2 }, { nested = { deep = true } }, cjson.null, true }
local function mutations(text)
  local out = {}
  local ls = lines_of(text)
  for i, line in ipairs(ls) do
    local e = cjson.decode(line)
    local keys = {}
    for k in pairs(e) do keys[#keys + 1] = k end
    table.sort(keys)
    for _, k in ipairs(keys) do
      local variants = { "deleted" }
      for _, w in ipairs(WRONG) do variants[#variants + 1] = w end
      for _, w in ipairs(variants) do
        local copy = cjson.decode(line)
        if w == "deleted" then copy[k] = nil else copy[k] = w end
        local mutated = {}
        for j, l in ipairs(ls) do mutated[j] = j == i and cjson.encode(copy) or l end
        out[#out + 1] = table.concat(mutated, "\n") .. "\n"
      end
    end
  end
  return out
end

local function readers_hold(id)
  -- In-process readers, one call per reader; any Lua error fails the case.
  local report = require("runbook.report")
  local journal = require("runbook.journal")
  local events, err = journal.read(id)
  if events then journal.summarize(events) else assert.is_string(err) end
  for _, fmt in ipairs { "markdown", "json", "html" } do
    local text, rerr = report.report(id, fmt)
    assert.is_true(text ~= nil or type(rerr) == "string")
    if not text then assert.matches(id, rerr, 1, true) end
  end
  return events ~= nil, err
end

describe("fuzzed journals", function()
  after_each(cli.cleanup)

  it("300+ torn, truncated, malformed and odd journals: no Lua error in any reader; history lists them all", function()
    local text = real_journal():gsub("\n", "\n" .. ASKED, 1)
    local state = cli.tmpdir()
    local runs = state .. "/runs"
    os.execute("mkdir -p " .. runs)
    local cases = {}
    local function add(id, content)
      cases[#cases + 1] = id
      if content == "DIR" then os.execute("mkdir -p " .. runs .. "/" .. id .. ".jsonl")
      else write(runs .. "/" .. id .. ".jsonl", content) end
    end
    -- every byte of a real journal as the point it was torn at
    local step = math.max(1, #text // 400)
    for k = 1, #text - 1, step do add(("torn-%05d"):format(k), text:sub(1, k)) end
    for i, m in ipairs(mutations(text)) do add(("mutated-%04d"):format(i), m) end
    add("dir", "DIR")
    add("empty", "")
    add("binary", "\0\1\2\255\254{\n\0")
    add("array", "[1,2,3]\n")
    add("deep", ("["):rep(5000) .. "\n")
    add("no-start", text:gsub("^[^\n]*\n", ""))
    add("torn-middle", text:gsub("\n", "\n{\"event\":\"st", 1))
    add("nul-line", text .. "\0\n")
    add("huge-number", text:gsub('"pid":%d+', '"pid":1e999', 1))
    assert.is_true(#cases >= 300, "only " .. #cases .. " cases")

    local env = { RUNBOOK_STATE_DIR = state }
    -- readers run in this process with the state dir set for them
    local journal = require("runbook.journal")
    local state_dir = journal.state_dir
    finally(function() journal.state_dir = state_dir end)
    journal.state_dir = function() return state end
    local readable, unreadable = 0, 0
    for _, id in ipairs(cases) do
      local ok, read_ok, err = pcall(readers_hold, id)
      assert(ok, id .. ": " .. tostring(read_ok))
      if read_ok then readable = readable + 1 else
        unreadable = unreadable + 1
        assert.is_nil(err:find("traceback", 1, true), err)
        assert.matches("%.jsonl[:]", err)   -- names the file (and the line, where there is one)
      end
    end
    -- every torn journal reads: a torn last line is dropped
    for _, id in ipairs(cases) do
      if id:match("^torn%-%d") and text:sub(1, tonumber(id:match("%d+"))):find("\n") then
        assert.is_truthy((require("runbook.journal").read(id)), id)
      end
    end

    local h = cli.run({ "history", "--limit", "100000", "--output", "json" }, env)
    assert.are.equal(0, h.code, h.stderr)
    assert.is_nil(h.stderr:find("traceback", 1, true))
    local listed, marked = {}, 0
    for _, ev in ipairs(cli.events(h.stdout)) do
      listed[ev.run_id] = true
      if ev.status == "unreadable" then marked = marked + 1 end
    end
    for _, id in ipairs(cases) do assert.is_true(listed[id], id .. " not listed") end
    assert.is_true(marked > 0)
    print(("\n  fuzzed journals: %d cases, %d readable, %d refused with file:line, 0 Lua errors; history listed %d")
      :format(#cases, readable, unreadable, #cases))
  end)

  it("a bad journal is named by file and line in report and resume, and history still lists the good run", function()
    local text, _, dir = real_journal()
    local state = cli.tmpdir()
    os.execute("mkdir -p " .. state .. "/runs")
    local good = lines_of(text)[1]:match('"run_id":"([^"]+)"')
    write(state .. "/runs/" .. good .. ".jsonl", text)
    local bad = lines_of(text)
    bad[3] = bad[3]:gsub('"step":"[^"]*"', '"step":{"x":1}')
    write(state .. "/runs/20991231T000000Z-bad00000.jsonl", table.concat(bad, "\n") .. "\n")
    local env = { RUNBOOK_STATE_DIR = state }
    for _, args in ipairs { { "report", "20991231T000000Z-bad00000" }, { "resume", "20991231T000000Z-bad00000" } } do
      local r = cli.run(args, env)
      assert.are.equal(2, r.code, r.stderr)
      assert.matches("20991231T000000Z%-bad00000%.jsonl:3: not a valid journal line %(.*field step: expected a string, got table%)",
        r.stderr)
      assert.is_nil(r.stderr:find("traceback", 1, true))
    end
    local h = cli.run({ "history" }, env)
    assert.are.equal(0, h.code)
    assert.matches("20991231T000000Z%-bad00000 .* unreadable", h.stdout)
    assert.matches(good:gsub("%-", "%%-") .. " +fuzzed", h.stdout)
    assert.matches("bad00000%.jsonl:3", h.stderr)
    local _ = dir
  end)

  it("a torn last line is cut off before a resume appends, and the resumed journal reads whole", function()
    local text, rb, dir = real_journal("no")
    local ls = lines_of(text)
    local id = ls[1]:match('"run_id":"([^"]+)"')
    -- cut inside the line after the first step's end: the run was killed while writing it
    local upto = 0
    for i, l in ipairs(ls) do if l:match('"event":"step_end"') then upto = i; break end end
    local keep = table.concat(ls, "\n", 1, upto) .. "\n" .. ls[upto + 1]:sub(1, 17)
    for _, cut in ipairs { keep, keep:sub(1, -10), table.concat(ls, "\n", 1, upto) .. "\n{" } do
      local state = cli.tmpdir()
      os.execute("mkdir -p " .. state .. "/runs")
      write(state .. "/runs/" .. id .. ".jsonl", cut)
      local env = { RUNBOOK_STATE_DIR = state }
      local r = cli.run({ "resume", id }, env)
      assert.are.equal(0, r.code, r.stderr)
      local rep = cli.run({ "report", id, "--format", "json" }, env)
      assert.are.equal(0, rep.code, rep.stderr)
      local doc = cjson.decode(rep.stdout)
      assert.are.equal("ok", doc.status, rep.stdout)
      local journal_text = cli.slurp(state .. "/runs/" .. id .. ".jsonl")
      assert.matches('"event":"journal_repaired"', journal_text)
      for l in journal_text:gmatch("[^\n]+") do assert.is_true(pcall(cjson.decode, l), l) end
    end
    local _ = { rb, dir }
  end)
end)
