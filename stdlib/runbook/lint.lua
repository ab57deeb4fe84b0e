--- `runbook lint`: what an operator's typo would otherwise break at 3 a.m.,
-- found before anything runs. Two passes over a loaded runbook's text:
-- - luacheck (Debian's lua-check) against a definition of the runbook
--   environment built from the very tables a runbook gets (env.lua and the
--   stdlib's libraries), so a function added to the stdlib is known to lint
--   with no list to keep: `k8s.scael` and `lgo.info` are caught;
-- - a walk of luacheck's syntax tree for what only the runbook's own
--   declarations tell: names read from ctx.params, ctx.outputs and
--   ctx.skipped that it does not declare, another step's outputs read
--   without needs or uses, and params nothing reads.
-- Steps' functions name their context `ctx` (the convention of every runbook
-- and of the README); a name given by a top-level `local X = "literal"` counts
-- as that literal. Each problem is "file:line:col: message".
local env = require("runbook.env")
local suggest = require("runbook.suggest")

local M = {}

-- Debian's lua-check installs luacheck for Lua 5.1; it is plain Lua that runs on 5.4 too.
local LUACHECK_PATH = "/usr/share/lua/5.1/?.lua;/usr/share/lua/5.1/?/init.lua"

local function luacheck(name)
  if not package.path:find(LUACHECK_PATH, 1, true) then package.path = package.path .. ";" .. LUACHECK_PATH end
  return require(name)
end

-- ---- the runbook environment, for luacheck ---------------------------------------

--- luacheck's definition of a value: a table's fields, nested a few levels; any
-- field at all where a metatable computes them (dapr.state).
local function definition(v, depth, seen)
  if type(v) ~= "table" then return {} end
  local mt = getmetatable(v)
  if depth == 0 or seen[v] or (type(mt) == "table" and mt.__index) then return { other_fields = true } end
  seen[v] = true
  local fields = {}
  for k, x in pairs(v) do
    if type(k) == "string" then fields[k] = definition(x, depth - 1, seen) end
  end
  seen[v] = nil
  return { fields = fields }
end

--- The globals of a runbook: what a fresh runbook environment holds (Lua's
-- safe builtins, the DSL), the libraries it loads on first use, and the
-- fields a runbook assigns (name, description, ...), which alone are writable.
function M.std()
  local blank, fields = require("runbook.loader").blank()
  local read, write = {}, {}
  for name, v in pairs(blank) do read[name] = definition(v, 3, {}) end
  read._G = { other_fields = true }
  for name, module in pairs(env.libraries) do read[name] = definition(require(module), 3, {}) end
  for name in pairs(fields) do write[name] = { other_fields = true, read_only = false } end
  return { read_globals = read, globals = write }
end

--- The names a luacheck definition has at its top level, for "did you mean".
local function names(t)
  local out = {}
  for k in pairs(t or {}) do out[#out + 1] = k end
  return out
end

local function luacheck_problems(rb, std, add)
  local lc = luacheck "luacheck"
  local report = lc.check_strings({ rb.source }, { std = std, max_line_length = false, unused_args = false })[1]
  for _, issue in ipairs(report) do
    local hint = ""
    if issue.code == "113" then
      hint = suggest.hint(issue.name, names(std.read_globals))
    elseif issue.code == "143" and #issue.indexing == 1 and std.read_globals[issue.name] then
      hint = suggest.hint(issue.indexing[1], names(std.read_globals[issue.name].fields))
    end
    add(issue.line, issue.column, lc.get_message(issue) .. hint)
  end
end

-- ---- ctx.params, ctx.outputs, ctx.skipped ---------------------------------------

--- Every node of luacheck's tree, depth first, with its parent.
local function walk(node, parent, visit)
  if node.tag then visit(node, parent) end
  for _, child in ipairs(node) do
    if type(child) == "table" then walk(child, node.tag and node or parent, visit) end
  end
end

local function is_ctx_field(node, field)
  return node and node.tag == "Index" and node[1].tag == "Id" and node[1][1] == "ctx"
    and node[2].tag == "String" and node[2][1] == field
end

--- Top-level `local NAME = "literal"`: NAME -> literal.
local function constants(ast)
  local out = {}
  for _, stat in ipairs(ast) do
    if stat.tag == "Local" and stat[2] then
      for i, id in ipairs(stat[1]) do
        local v = stat[2][i]
        if v and v.tag == "String" then out[id[1]] = v[1] end
      end
    end
  end
  return out
end

--- The step whose own functions (when, run, fallback, undo) hold `line`.
local function step_at(rb, line)
  for _, step in ipairs(rb.steps) do
    for _, f in ipairs { "when", "run", "fallback", "undo" } do
      local info = step[f] and debug.getinfo(step[f], "S")
      if info and info.source == "@" .. rb.file and line >= info.linedefined and line <= info.lastlinedefined then
        return step
      end
    end
  end
end

local function step_names(rb)
  local out = {}
  for _, s in ipairs(rb.steps) do out[#out + 1] = s.name end
  return out
end

local function declared_dep(step, name)
  for _, list in ipairs { step.needs, step.uses } do
    for _, d in ipairs(list) do if d == name then return true end end
  end
  return name == step.name
end

local function parse(source)
  return luacheck("luacheck.parser").parse(luacheck("luacheck.decoder").decode(source))
end

--- A read of ctx.params in the tree: on_read(key node, its literal name or nil).
local function param_read(node, parent, literal, on_read)
  if not is_ctx_field(node, "params") then return end
  if parent and parent.tag == "Index" and parent[1] == node then return on_read(parent[2], literal(parent[2])) end
  on_read(node, nil)   -- ctx.params handed on whole
end

--- The params a library reads from a ctx handed to it (steps.lua's shared
-- steps): the names it reads, and whether it also reads one named by an
-- argument (ctx.params[t.queries]). Read from its source, once.
local library_reads = {}

local function reads_of(module)
  if library_reads[module] then return library_reads[module] end
  local r = { names = {}, by_argument = false }
  local path = package.searchpath(module, package.path)
  local f = path and io.open(path, "rb")
  if f then
    local ast = parse(f:read("a"))
    f:close()
    walk(ast, nil, function(node, parent)
      param_read(node, parent, function(n) return n.tag == "String" and n[1] end, function(_, name)
        if name then r.names[name] = true else r.by_argument = true end
      end)
    end)
  end
  library_reads[module] = r
  return r
end

local function ctx_problems(rb, add)
  local ast, _, _, _, _, offsets = parse(rb.source)
  local const = constants(ast)
  local function at(node, fmt, ...) add(node.line, node.offset - offsets[node.line] + 1, fmt:format(...)) end
  local function literal(node)
    if node.tag == "String" then return node[1] end
    if node.tag == "Id" then return const[node[1]] end
  end
  local read, dynamic = {}, false
  local function step_ref(node, what, name)
    if not rb.steps_by_name[name] then
      return at(node, what == "ctx.skipped" and "%s(%q): %s has no step named '%s'%s" or "%s[%q]: %s has no step named '%s'%s",
        what, name, rb.name, name, suggest.hint(name, step_names(rb)))
    end
    local step = step_at(rb, node.line)
    if step and not declared_dep(step, name) then
      at(node, "step '%s' reads '%s' (%s) without declaring it: add needs = {%q} (skipped with it), or uses = {%q}"
        .. " (asks ctx.skipped first)", step.name, name, what, name, name)
    end
  end
  --- A call of a library function: the params that library reads count as read.
  local function library_call(node)
    local f = node[1]
    local module = f.tag == "Index" and f[1].tag == "Id" and env.libraries[f[1][1]]
    if not module then return end
    local r = reads_of(module)
    for name in pairs(r.names) do read[name] = true end
    if r.by_argument then
      walk(node, nil, function(n) if n.tag == "String" and rb.params_by_name[n[1]] then read[n[1]] = true end end)
    end
  end
  walk(ast, nil, function(node, parent)
    param_read(node, parent, literal, function(key, name)
      if not name then
        dynamic = true
      elseif not rb.params_by_name[name] then
        at(key, "ctx.params.%s: %s declares no param '%s'%s", name, rb.name, name,
          suggest.hint(name, names(rb.params_by_name)))
      else
        read[name] = true
      end
    end)
    if is_ctx_field(node, "outputs") and parent and parent.tag == "Index" and parent[1] == node then
      local name = literal(parent[2])
      if name then step_ref(parent[2], "ctx.outputs", name) end
    elseif node.tag == "Call" and is_ctx_field(node[1], "skipped") and node[2] then
      local name = literal(node[2])
      if name then step_ref(node[2], "ctx.skipped", name) end
    elseif node.tag == "Call" then
      library_call(node)
    end
  end)
  if dynamic then return end   -- ctx.params[expr] or ctx.params handed on: which params are read is not known
  local function unread(decl)
    if decl and decl.tag == "String" and rb.params_by_name[decl[1]] and not read[decl[1]] then
      at(decl, "param '%s' is declared but never read (no ctx.params.%s): remove it, or use it", decl[1], decl[1])
    end
  end
  -- param "x" {...}, and params (specs) { "x", ... }
  walk(ast, nil, function(node)
    local dsl = node.tag == "Call" and node[1].tag == "Call" and node[1][1].tag == "Id" and node[1][1][1]
    if dsl == "param" then unread(node[1][2]) end
    if dsl == "params" and node[2] and node[2].tag == "Table" then
      for _, decl in ipairs(node[2]) do unread(decl) end
    end
  end)
end

local env_std   -- M.std(), made once

--- The problems of a loaded runbook, "file:line:col: message", in order.
function M.check(rb)
  local found = {}
  local function add(line, col, message) found[#found + 1] = { line = line, col = col, message = message } end
  env_std = env_std or M.std()
  luacheck_problems(rb, env_std, add)
  ctx_problems(rb, add)
  table.sort(found, function(a, b) return a.line < b.line or a.line == b.line and a.col < b.col end)
  local out = {}
  for i, p in ipairs(found) do out[i] = ("%s:%d:%d: %s"):format(rb.file, p.line, p.col, p.message) end
  return out
end

return M
