--- busted output handler: busted's own terminal output, then the plain
-- closing line "N passed, N failed[, N skipped]" that CI reads.
local host = require "runbook.host"

return function(options)
  local busted = require "busted"
  local name = host.isatty(1) and "utfTerminal" or "plainTerminal"
  local handler = require("busted.outputHandlers." .. name)(options)
  local subscribe = handler.subscribe
  handler.subscribe = function(self, opts)
    subscribe(self, opts)
    busted.subscribe({ "suite", "end" }, function()
      local line = ("%d passed, %d failed"):format(handler.successesCount,
        handler.failuresCount + handler.errorsCount)
      if handler.pendingsCount > 0 then line = line .. (", %d skipped"):format(handler.pendingsCount) end
      io.stdout:write("\n" .. line .. "\n")
      io.stdout:flush()
      return nil, true
    end)
  end
  return handler
end
