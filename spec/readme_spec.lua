-- Every code block of README.md runs against the sandbox, or says why not.
-- The line before each fence is an HTML comment, `<!-- example: KIND ARGS; why -->`:
--   runbook ARGS  a whole runbook: lint finds it clean and `runbook run FILE ARGS` exits 0
--   steps ARGS    steps or top-level fields: run as a runbook with a name and a
--                 description added (and a step, when it has none)
--   code ARGS     statements: run as the body of one step
--   lint; why     statements that cannot run against the sandbox: lint checks them as one step's body
--   shell ARGS    shell commands, each exiting 0; ARGS are added to each `runbook run`
--   not run; why  output, a synopsis, or commands for a machine of their own
-- ARGS may begin with NAME=value settings of the environment. In the Lua
-- blocks lint may find unused locals (a snippet names what a call returns);
-- anything else it finds fails the spec.
local cli = require("spec.support.cli")

local HEAD = 'name = "readme-example" description = "an example of README.md"\n'

--- The fenced blocks of README.md: {line, kind, args, env, why, text}, or
-- {line, missing = true} for a block without its comment.
local function blocks()
  local out, marker, block = {}, nil, nil
  local n = 0
  for line in io.lines("README.md") do
    n = n + 1
    if block then
      if line:match("^```%s*$") then
        out[#out + 1], block = block, nil
      else
        block.text[#block.text + 1] = line
      end
    elseif line:match("^```") then
      block = marker or { missing = true }
      block.line, block.text, marker = n, {}, nil
    else
      local body = line:match("^<!%-%- example: (.-)%s*%-%->$")
      local kind, rest
      if body then
        kind, rest = body:match("^(not run)%s*(.*)$")
        if not kind then kind, rest = body:match("^(%a+)%s*(.*)$") end
      end
      marker = kind and { kind = kind } or nil
      if marker then
        local args, why = rest:match("^([^;]*);?%s*(.*)$")
        marker.why, marker.args, marker.env = why, {}, {}
        for word in args:gmatch("%S+") do
          local k, v = word:match("^([%u_]+)=(.*)$")
          if k and #marker.args == 0 then marker.env[k] = v else marker.args[#marker.args + 1] = word end
        end
      end
    end
  end
  return out
end

local function source(b)
  local text = table.concat(b.text, "\n")
  if b.kind == "runbook" then return text end
  if b.kind == "steps" then
    local has_step = text:match("^step ") or text:match("\nstep ")
    return HEAD .. text .. (has_step and "" or '\nstep "example" { run = function() end }')
  end
  return HEAD .. 'step "example" { run = function(ctx)\n' .. text .. "\nend }\n"
end

local function lint(b, path, src)
  local r = cli.run({ "lint", path }, b.env)
  local problems = {}
  for line in r.stdout:gmatch("[^\n]+") do
    local whole = b.kind == "runbook"
    if not line:find(": ok (", 1, true) and (whole or not line:find("unused variable", 1, true)) then
      problems[#problems + 1] = line
    end
  end
  assert.are.same({}, problems, src)
  assert.is_true(r.code == 0 or #problems == 0 and r.code == 1, r.stderr)
end

local function run_lua(b, state)
  local src = source(b)
  local path = cli.runbook(src)
  lint(b, path, src)
  if b.kind == "lint" then return end
  local env = { RUNBOOK_STATE_DIR = state }
  for k, v in pairs(b.env) do env[k] = v end
  local r = cli.run({ "run", path, table.unpack(b.args) }, env)
  assert.are.equal(0, r.code, src .. "\n" .. r.stdout .. r.stderr)
end

local function run_shell(b, state)
  for _, line in ipairs(b.text) do
    local cmd = line:gsub("%s+#.*$", "")
    if cmd:match("%S") then
      cmd = cmd:gsub("^runbook ", cli.BIN .. " ")
      if cmd:match("^%S+ run ") then cmd = cmd .. " " .. table.concat(b.args, " ") end
      local p = io.popen(("RUNBOOK_STATE_DIR=%s %s </dev/null 2>&1; echo \"exit=$?\""):format(cli.quote(state), cmd))
      local out = p:read("a")
      p:close()
      assert.matches("exit=0%s*$", out, cmd .. "\n" .. out)
    end
  end
end

describe("README.md", function()
  teardown(cli.cleanup)
  local all = blocks()

  it("says of every code block how it is checked, or why it is not run", function()
    assert.is_true(#all >= 10, #all .. " blocks")
    for _, b in ipairs(all) do
      assert.is_falsy(b.missing, ("README.md:%d: a block with no <!-- example: ... --> before it"):format(b.line))
      assert.is_truthy(({ runbook = 1, steps = 1, code = 1, lint = 1, shell = 1, ["not run"] = 1 })[b.kind],
        ("README.md:%d: unknown kind of example '%s'"):format(b.line, tostring(b.kind)))
      if b.kind == "not run" or b.kind == "lint" then
        assert.is_truthy(b.why ~= "", ("README.md:%d: say why it is not run"):format(b.line))
      end
    end
  end)

  for _, b in ipairs(all) do
    if not b.missing and b.kind ~= "not run" then
      it(("runs the %s example at README.md:%d"):format(b.kind, b.line), function()
        local state = cli.tmpdir()
        if b.kind == "shell" then run_shell(b, state) else run_lua(b, state) end
      end)
    end
  end
end)
