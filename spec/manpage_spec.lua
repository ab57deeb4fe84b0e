-- The man page runbook(1): built from pkg/runbook.1.scd by scdoc, and naming
-- every command and option `runbook help` names.
local cli = require("spec.support.cli")

local function sh(cmd)
  local p = io.popen("(" .. cmd .. ") 2>&1")
  local out = p:read("a")
  return p:close(), out
end

describe("man page", function()
  it("builds with scdoc, renders with man, and documents every command and option of runbook help", function()
    if not sh("command -v scdoc") then return pending("scdoc is not installed") end
    local ok, out = sh("make --no-print-directory build/runbook.1")
    assert.is_true(ok, out)
    ok, out = sh("man --warnings -l build/runbook.1 >/dev/null")
    assert.is_true(ok or out:match("not found") ~= nil, out)   -- a machine without man-db checks the roff only
    local page = cli.slurp("build/runbook.1"):gsub("\\f[BIRP]", ""):gsub("\\%-", "-")
    local help = cli.run { "help" }.stdout
    local helps = { help }
    for word in help:match("Commands:(.-)\n\n"):gmatch("\n   (%l+) ") do
      assert.truthy(page:find("*" .. word .. "*", 1, true) or page:find(word, 1, true), "command " .. word .. " missing")
      if word ~= "test" then helps[#helps + 1] = cli.run({ "help", word }).stdout end
    end
    for _, h in ipairs(helps) do
      for flag in h:gmatch("%-%-[%l%-]+") do
        assert.truthy(page:find(flag, 1, true), flag .. " missing from the man page")
      end
    end
    for _, section in ipairs { "SYNOPSIS", "EXIT STATUS", "ENVIRONMENT", "RUNBOOK_PATH", "FILES" } do
      assert.truthy(page:find(section, 1, true), section)
    end
  end)
end)
