--- "Did you mean ...?" for a mistyped name: the known names closest to it by
-- edit distance (insertions, deletions, substitutions and swaps of adjacent
-- letters), so `outage-recvery`, `nmae` and `rnu` find what was meant.
local M = {}

local function distance(a, b)
  local d = {}
  for i = 0, #a do d[i] = { [0] = i } end
  for j = 0, #b do d[0][j] = j end
  for i = 1, #a do
    for j = 1, #b do
      local cost = a:byte(i) == b:byte(j) and 0 or 1
      d[i][j] = math.min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost)
      if i > 1 and j > 1 and a:byte(i) == b:byte(j - 1) and a:byte(i - 1) == b:byte(j) then
        d[i][j] = math.min(d[i][j], d[i - 2][j - 2] + 1)
      end
    end
  end
  return d[#a][#b]
end

--- The names in `known` within reach of `word` (a third of its length, at
-- least 1, at most 3 edits), closest first.
function M.closest(word, known)
  local reach = math.max(1, math.min(3, #word // 3))
  local found = {}
  for _, name in ipairs(known) do
    local d = distance(word, name)
    if d <= reach then found[#found + 1] = { name = name, d = d } end
  end
  table.sort(found, function(x, y) return x.d < y.d or x.d == y.d and x.name < y.name end)
  local names = {}
  for i, f in ipairs(found) do names[i] = f.name end
  return names
end

--- "; did you mean 'x'?" (or 'x' or 'y'), or "" when nothing is close.
function M.hint(word, known)
  local names = M.closest(word, known)
  if #names == 0 then return "" end
  for i, n in ipairs(names) do names[i] = "'" .. n .. "'" end
  return "; did you mean " .. table.concat(names, " or ", 1, math.min(#names, 3)) .. "?"
end

return M
