--- The adversarial specs' shared part. A variant is a row: a runbook that
-- tries to get around the dry run, run with --dry-run, and a check with an
-- independent client (ls, ps, psql, redis-cli, kubectl...) that nothing changed.
--
--   local adv = require("spec.adversarial.support")
--   local VARIANTS = {
--     { "gate.effect replaced", step = [[
--         gate.effect = function(e) return e.perform() end
--         fs.write(DIR .. "/x", "y") ]] },
--   }
--   for _, v in ipairs(VARIANTS) do it(v[1], function() adv.check(v) end) end
--
-- A row is {name, step = CODE} (the body of one step, where DIR is a fresh
-- empty directory, also the param `dir`) or {name, source = RUNBOOK} (a whole
-- runbook, which gets DIR as ctx.params.dir, and at load time as
-- os.getenv("ADVERSARIAL_DIR")). Optional fields:
--   snapshot = function(dir) -> value   what must not change (default: ls -lA of DIR)
--   params = {k = v}                    more -p params
--   under = {"timeout", "60"}           a command to run it under (bounds a run that hangs)
--   check = function(r, dir)            more assertions on r = {code, stdout, stderr, seconds}
local cli = require("spec.support.cli")
local assert = require("luassert")
local host = require("runbook.host")

local M = {}

--- A runbook with one step whose body is `code`, with DIR in scope.
function M.runbook(code)
  return ("name = \"adversarial\"\ndescription = \"tries to get around the dry run\"\n"
    .. "param \"dir\" { required = true }\n"
    .. "step \"attack\" { run = function(ctx)\nlocal DIR = ctx.params.dir\n%s\nend }\n"):format(code)
end

--- What `ls -lA --time-style=full-iso` shows of dir: names, sizes and times.
function M.listing(dir)
  local p = io.popen("ls -lA --time-style=full-iso " .. cli.quote(dir) .. " 2>&1")
  local out = p:read("a")
  p:close()
  return out
end

--- Processes whose command line matches `pattern`, by ps (not pgrep: it
-- matches itself when the pattern is in its own command line).
function M.processes(pattern)
  local p = io.popen("ps -eo pid=,args=")
  local found = {}
  for line in p:lines() do
    if line:find(pattern, 1, true) and not line:find("ps -eo", 1, true) then found[#found + 1] = line end
  end
  p:close()
  return found
end

local function dry_run_args(source, dir, params)
  local args = { "run", cli.runbook(source), "--dry-run", "--output", "json", "-p", "dir=" .. dir }
  for k, v in pairs(params or {}) do
    args[#args + 1] = "-p"
    args[#args + 1] = k .. "=" .. v
  end
  return args
end

--- Run `source` with --dry-run --output json, -p dir=DIR plus `params`, and
-- ADVERSARIAL_DIR=DIR in the environment. Returns {code, stdout, stderr, seconds}.
function M.dry_run(source, dir, params, under)
  local t0 = host.now()
  local r = cli.run(dry_run_args(source, dir, params), { ADVERSARIAL_DIR = dir }, under)
  r.seconds = host.now() - t0
  return r
end

local function checked(row, dir, before, r)
  local snapshot = row.snapshot or M.listing
  assert.are.same(before, snapshot(dir), ("the dry run changed something (exit %s)\n%s%s"):format(
    tostring(r.code), r.stdout, r.stderr))
  if row.check then row.check(r, dir) end
  return r
end

--- Run one variant row (see the top of this file) and assert nothing changed.
function M.check(row)
  local dir = cli.tmpdir()
  local before = (row.snapshot or M.listing)(dir)
  return checked(row, dir, before, M.dry_run(row.source or M.runbook(row.step), dir, row.params, row.under))
end

--- M.check in two halves, for a row that waits out a long deadline: its dry
-- run starts now, in the background, and the function returned waits for it
-- (polling, up to `wait` seconds) and checks it, so the wait overlaps the
-- next rows'. r.seconds is the run's own duration, timed by the shell.
function M.start(row, wait)
  local dir, d = cli.tmpdir(), cli.tmpdir()
  local before = (row.snapshot or M.listing)(dir)
  local args = dry_run_args(row.source or M.runbook(row.step), dir, row.params)
  os.execute(("(date +%%s.%%N >%s/start; %s </dev/null >%s/out 2>%s/err; echo $? >%s/code; date +%%s.%%N >%s/end) &")
    :format(d, cli.command(args, { ADVERSARIAL_DIR = dir }, row.under), d, d, d, d))
  return function()
    for _ = 1, wait * 10 do
      if cli.slurp(d .. "/end") ~= "" then break end
      os.execute("sleep 0.1")
    end
    local stop = assert(tonumber(cli.slurp(d .. "/end")), "the dry run did not end within " .. wait .. " s")
    local r = cli.result(args, d)
    r.seconds = stop - tonumber(cli.slurp(d .. "/start"))
    return checked(row, dir, before, r)
  end
end

return M
