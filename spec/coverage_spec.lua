-- The coverage matrix: every shipped runbook declares the seed procedures it
-- replaces (`replaces`, shown by `runbook describe`), and README.md's two
-- tables say the same: "Seed coverage" gives every id of docs/seed-procedures.md
-- once, and "Shipped runbooks" each runbook's ids.
local cli = require("spec.support.cli")

local ID = "%d%d%d%-%d+"

local function set_of(list)
  local s = {}
  for _, v in ipairs(list) do s[v] = true end
  return s
end

local sorted_keys = require("runbook.metrics").sorted_keys

--- The ids of docs/seed-procedures.md, in order.
local function seed_ids()
  local ids = {}
  for line in io.lines("docs/seed-procedures.md") do
    local id = line:match("^(" .. ID .. ") ")
    if id then ids[#ids + 1] = id end
  end
  return ids
end

--- The shipped runbooks: name -> {declared = the source assigns replaces, replaces = set from describe}.
local function shipped()
  local out = {}
  local p = io.popen("ls runbooks/*.lua")
  for path in p:lines() do
    local name = path:match("([^/]+)%.lua$")
    local r = cli.run { "describe", path }
    assert.are.equal(0, r.code, r.stderr)
    local ids = {}
    for id in (r.stdout:match("\nReplaces seed procedures: ([^\n]*)") or ""):gmatch(ID) do ids[#ids + 1] = id end
    out[name] = { declared = cli.slurp(path):find("\nreplaces = {", 1, true) ~= nil, replaces = set_of(ids) }
  end
  p:close()
  return out
end

--- The rows of the README table that follows `heading`, as lists of cells.
local function table_after(heading)
  local rows, inside, started = {}, false, false
  for line in io.lines("README.md") do
    if line == heading then
      inside = true
    elseif inside and line:match("^## ") then
      break
    elseif inside and line:match("^|") then
      started = true
      local cells = {}
      for cell in line:sub(2):gmatch("%s*(.-)%s*|") do cells[#cells + 1] = cell end
      if not cells[1]:match("^%-%-%-") then rows[#rows + 1] = cells end
    elseif started then
      break
    end
  end
  table.remove(rows, 1) -- the header
  return rows
end

--- The runbook names of a cell: `a`, `b` -> {a = true, b = true}.
local function names_in(cell)
  local s = {}
  for n in cell:gmatch("`([^`]+)`") do s[n] = true end
  return s
end

describe("the seed coverage matrix", function()
  local ids, books, seed_rows, book_rows

  setup(function()
    ids, books = seed_ids(), shipped()
    seed_rows, book_rows = table_after("## Seed coverage"), table_after("## Shipped runbooks")
  end)

  it("has 95 distinct seed procedures, and every shipped runbook declares replaces with only their ids", function()
    assert.are.equal(95, #ids)
    local known = set_of(ids)
    assert.are.equal(95, #sorted_keys(known))
    for name, b in pairs(books) do
      assert.is_true(b.declared, name .. " has no top-level `replaces = {...}`")
      for id in pairs(b.replaces) do assert.is_true(known[id], name .. " replaces an unknown seed id " .. id) end
    end
  end)

  it("gives every id once in the README, covered fully exactly by the runbooks that replace it", function()
    local row_of = {}
    for _, row in ipairs(seed_rows) do
      local id, status, runbooks, why = row[1], row[3], names_in(row[4]), row[5]
      assert.is_nil(row_of[id], id .. " appears twice in the Seed coverage table")
      row_of[id] = row
      assert.truthy(({ F = true, P = true, L = true, B = true })[status], id .. ": unknown coverage " .. tostring(status))
      for name in pairs(runbooks) do assert.truthy(books[name], id .. ": no shipped runbook " .. name) end
      local replacing = {}
      for name, b in pairs(books) do
        if b.replaces[id] then replacing[name] = true end
      end
      if status == "F" then
        assert.are.same(sorted_keys(replacing), sorted_keys(runbooks), id .. ": the runbooks that name it in replaces")
      else
        assert.are.same({}, sorted_keys(replacing), id .. " is " .. status .. " but a runbook's replaces names it")
        assert.is_true(why ~= "", id .. " is " .. status .. " without saying what is missing or why")
      end
      if status == "L" or status == "B" then assert.are.same({}, sorted_keys(runbooks), id) end
    end
    local in_order = {}
    for _, row in ipairs(seed_rows) do in_order[#in_order + 1] = row[1] end
    assert.are.same(ids, in_order, "the table's ids, in the order of docs/seed-procedures.md")
  end)

  it("counts each coverage right", function()
    local counts = { F = 0, P = 0, L = 0, B = 0 }
    for _, row in ipairs(seed_rows) do counts[row[3]] = counts[row[3]] + 1 end
    local readme = cli.slurp("README.md")
    local function are(n) return n == 1 and "1 is" or n .. " are" end
    local line = ("Of the %d procedures, %s covered fully (F), %d partly (P), %s possible but not shipped (L), and %s blocked (B).")
      :format(#ids, are(counts.F), counts.P, are(counts.L), are(counts.B))
    assert.truthy(readme:find(line, 1, true), "README.md should say: " .. line)
  end)

  it("lists every shipped runbook once, with its replaces in full and its partial ids as the seed table has them", function()
    local partly = {}
    for _, row in ipairs(seed_rows) do
      if row[3] == "P" then
        for name in pairs(names_in(row[4])) do
          partly[name] = partly[name] or {}
          partly[name][row[1]] = true
        end
      end
    end
    local listed = {}
    for _, row in ipairs(book_rows) do
      local name = row[1]:match("^`(.-)`$")
      assert.truthy(books[name], "the Shipped runbooks table lists " .. row[1] .. ", which is not in runbooks/")
      assert.is_nil(listed[name], name .. " is listed twice")
      listed[name] = true
      local full, part = {}, {}
      for id in row[2]:gmatch("`(" .. ID .. ")`") do full[id] = true end
      for id in (row[2]:match("partly (.*)$") or ""):gmatch(ID) do part[id] = true end
      assert.are.same(sorted_keys(books[name].replaces), sorted_keys(full), name .. ": the ids it replaces")
      assert.are.same(sorted_keys(partly[name] or {}), sorted_keys(part), name .. ": the ids it covers partly")
    end
    assert.are.same(sorted_keys(books), sorted_keys(listed), "every runbook in runbooks/ has a row")
  end)
end)
