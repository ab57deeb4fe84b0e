--- `runbook test [busted options] [PATH...]`: busted, run inside the host so
-- specs can load the native modules, ending with "N passed, N failed".
local M = {}

function M.run(args)
  local argv = { [0] = "runbook test", "--output", "runbook.test_output" }
  for _, a in ipairs(args) do argv[#argv + 1] = a end
  if #args == 0 or args[#args]:sub(1, 1) == "-" then argv[#argv + 1] = "spec" end
  _G.arg = argv
  -- Specs write files and run commands; the host starts in dry-run mode.
  require("runbook.host").set_mode("run")
  -- busted exits with the number of failures, which wraps at 256: keep 0 or 1.
  local exit = os.exit
  os.exit = function(code, close)
    local failed = code ~= 0 and code ~= true and code ~= nil
    exit(failed and 1 or 0, close)
  end
  require("busted.runner")({ standalone = false })
  return 0
end

return M
