--- Runs the `runbook` command as the team's cron and CI do (no terminal,
--- JSON lines) for the team's specs: run{args...} -> exit code, events, output.
local cjson = require("cjson")

local RUNBOOK = os.getenv("RUNBOOK_BIN") or "./runbook"

local function quote(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end

return function(args)
  local parts = { RUNBOOK }
  for _, a in ipairs(args) do parts[#parts + 1] = quote(a) end
  local p = io.popen(table.concat(parts, " ") .. " </dev/null 2>&1; echo \"exit $?\"")
  local out = p:read("a")
  p:close()
  local events = {}
  for line in out:gmatch("[^\n]+") do
    local ok, e = pcall(cjson.decode, line)
    if ok and type(e) == "table" then events[#events + 1] = e end
  end
  return tonumber(out:match("exit (%d+)%s*$")), events, out
end
