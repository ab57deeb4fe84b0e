--- busted output handler: busted's own terminal output, then the slowest
-- spec files (to keep the suite's time in view) and the plain closing line
-- "N passed, N failed[, N skipped]" that CI reads.
local host = require("runbook.host")

return function(options)
  local busted = require("busted")
  local name = host.isatty(1) and "utfTerminal" or "plainTerminal"
  local handler = require("busted.outputHandlers." .. name)(options)
  local subscribe = handler.subscribe
  handler.subscribe = function(self, opts)
    subscribe(self, opts)
    local took, started = {}, {}
    busted.subscribe({ "file", "start" }, function(file) started[file.name] = host.now() end)
    busted.subscribe({ "file", "end" }, function(file)
      took[#took + 1] = { name = file.name, s = host.now() - started[file.name] }
    end)
    busted.subscribe({ "suite", "end" }, function()
      table.sort(took, function(a, b) return a.s > b.s end)
      if #took > 1 then io.stdout:write("\nslowest spec files:\n") end
      for i = 1, #took > 1 and math.min(#took, 10) or 0 do
        io.stdout:write(("%7.1fs %s\n"):format(took[i].s, took[i].name))
      end
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
