-- Shell completion (pkg/runbook.bash, pkg/runbook.zsh) as a user meets it:
-- bash's completion function called as bash-completion calls it, and zsh's
-- through a real interactive zsh on a pty, pressing TAB. Runbook names and
-- params come from the checkout's `runbook list` and `runbook describe`.
local cli = require("spec.support.cli")

local PATH = "PATH=" .. cli.quote(os.getenv("PWD") .. ":" .. os.getenv("PATH"))

local function output(cmd)
  local p = io.popen(cmd .. " 2>/dev/null")
  local out = p:read("a")
  p:close()
  return out
end

local function set(text)
  local s = {}
  for l in text:gmatch("[^\n]+") do s[l] = true end
  return s
end

-- Each shell completes every line and returns one set of candidates per line.
local shells = {
  { name = "bash", needs = "/usr/share/bash-completion/bash_completion",
    complete = function(lines)
      local got = {}
      for i, line in ipairs(lines) do
        got[i] = set(output(("%s bash spec/fixtures/complete.bash %s"):format(PATH, cli.quote(line))))
      end
      return got
    end },
  { name = "zsh", needs = "/usr/bin/zsh",
    complete = function(lines)
      local dir = cli.tmpdir()
      os.execute(("cp pkg/runbook.zsh %s/_runbook"):format(dir))
      local args = {}
      for i, line in ipairs(lines) do args[i] = cli.quote(line) end
      local out = output(("%s zsh -f spec/fixtures/complete.zsh %s %s"):format(PATH, dir, table.concat(args, " ")))
      local got = {}
      for i = 1, #lines do got[i] = set(out:match("\n?%-%- " .. i .. "\n(.-)%-%- ") or "") end
      return got
    end },
}

-- command line typed -> what must be offered (a trailing "=" : zsh adds it as a suffix)
local cases = {
  { "runbook r", { "run", "resume", "report" } },
  { "runbook run --dr", { "--dry-run" } },
  { "runbook run outage-rec", { "outage-recovery" } },
  { "runbook run outage-recovery -p na", { "namespace" } },
  { "runbook run outage-recovery -p namespace=x --ou", { "--output" } },
  { "runbook report --format ", { "markdown", "json", "html" } },
  { "runbook report --ht", { "--html" } },
  { "runbook describe daily-h", { "daily-health-check" } },
  { "runbook --no", { "--no-color" } },
  { "runbook -v ru", { "run" } },
  { "runbook -o json run outage-recovery -p rollout_t", { "rollout_timeout" } },
  { "runbook run outage-recovery -o ", { "json", "text" } },
  { "runbook resume --wa", { "--wait-lock" } },
  { "runbook apply --st", { "--step" } },
  { "runbook plan --params-f", { "--params-file" } },
  { "runbook serve --max-r", { "--max-runs" } },
}

for _, sh in ipairs(shells) do
  describe(sh.name .. " completion", function()
    local got
    setup(function()
      if not io.open(sh.needs) then return end
      local typed = {}
      for i, c in ipairs(cases) do typed[i] = c[1] end
      got = sh.complete(typed)
    end)
    teardown(cli.cleanup)

    for i, c in ipairs(cases) do
      it(("completes '%s'"):format(c[1]), function()
        if not got then return pending(sh.needs .. " is not installed") end
        local offered = {}
        for k in pairs(got[i]) do offered[#offered + 1] = k end
        for _, want in ipairs(c[2]) do
          assert.is_true(got[i][want] or got[i][want .. "="] or false,
            ("%s not offered; got: %s"):format(want, table.concat(offered, " ")))
        end
      end)
    end
  end)
end
