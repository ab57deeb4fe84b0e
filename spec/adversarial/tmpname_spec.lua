-- Class 7: os.tmpname creates a file (mkstemp), so a runbook cannot have it.
local adv = require("spec.adversarial.support")
local cli = require("spec.support.cli")
local assert = require("luassert")

--- The step prints the name it got; no such file may exist afterwards.
local function no_file(r)
  local name = r.stdout:match("TMPNAME=(/[^\"\\]+)")
  if name then os.remove(name) end
  assert.is_nil(name, "os.tmpname made " .. tostring(name))
  assert.truthy(r.stdout:find("os.tmpname is not available in a runbook", 1, true), r.stdout)
end

local VARIANTS = {
  { "os.tmpname()", step = "print('TMPNAME=' .. os.tmpname())" },
  { "os.tmpname from a chunk given to load", step = "print('TMPNAME=' .. load('return os.tmpname()')())" },
  { "os.tmpname through a local alias of os", step = "local o = os print('TMPNAME=' .. o.tmpname())" },
}

describe("adversarial: os.tmpname", function()
  teardown(cli.cleanup)
  for _, v in ipairs(VARIANTS) do
    v.check = no_file
    it(v[1], function() adv.check(v) end)
  end
end)
