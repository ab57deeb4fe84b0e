--- Durations as operators write them: "250ms", "30s", "5m", "1h30m", "2d", or a
-- number of seconds. parse() returns seconds (a float); format() the reverse.
local M = {}

local UNITS = { ms = 0.001, s = 1, m = 60, h = 3600, d = 86400 }

--- Seconds in `v`, or nil and a message naming what is wrong.
function M.parse(v)
  if type(v) == "number" then
    if v < 0 then return nil, "a duration cannot be negative" end
    return v
  end
  if type(v) ~= "string" then
    return nil, ("expected a duration like \"30s\" or \"5m\", got %s"):format(type(v))
  end
  local s = v:gsub("%s", "")
  if s:match("^%d+%.?%d*$") then return tonumber(s) end
  local total, rest = 0, s
  while rest ~= "" do
    local num, unit, tail = rest:match("^(%d+%.?%d*)(%a+)(.*)$")
    if not num or not UNITS[unit] then
      return nil, ("expected a duration like \"30s\", \"5m\" or \"1h30m\", got %q"):format(v)
    end
    total, rest = total + tonumber(num) * UNITS[unit], tail
  end
  if s == "" then return nil, "expected a duration, got an empty string" end
  return total
end

--- Like parse, but raises naming `what` (e.g. "step 'Scale' timeout").
function M.check(v, what)
  local secs, err = M.parse(v)
  if not secs then error(("%s: %s"):format(what, err), 0) end
  return secs
end

--- A short human form: 0.042 -> "42ms", 75 -> "1m15s", 3600 -> "1h".
function M.format(secs)
  if secs < 1 then return ("%dms"):format(math.floor(secs * 1000 + 0.5)) end
  if secs < 60 then
    local r = math.floor(secs * 10 + 0.5) / 10
    return (r == math.floor(r) and "%ds" or "%.1fs"):format(r)
  end
  local out, left = {}, math.floor(secs + 0.5)
  for _, u in ipairs { { "d", 86400 }, { "h", 3600 }, { "m", 60 }, { "s", 1 } } do
    local n = left // u[2]
    if n > 0 then out[#out + 1] = n .. u[1]; left = left - n * u[2] end
  end
  return table.concat(out)
end

return M
