--- Loading a runbook file: its text is run in its own environment (env.lua),
-- where `param "x" {...}` and `step "Name" {...}` record declarations in
-- order, then the whole is checked. Every problem is raised as a load error
-- carrying file:line, which the CLI turns into exit status 3.
local duration = require("duration")
local env = require("runbook.env")
local deadline = require("runbook.deadline")

local M = {}

--- Top-level fields a runbook may assign, with their expected types.
local FIELDS = { name = "string", description = "string", version = "string", lock = "string",
  on_failure = "string", notify = "table", approval = "table", replaces = "table" }

local PARAM_KEYS = { type = true, values = true, required = true, default = true, help = true, secret = true }
local PARAM_TYPES = { string = true, number = true, integer = true, boolean = true, duration = true, enum = true, list = true }
local STEP_KEYS = { description = true, run = true, confirm = true, timeout = true, retry = true,
  undo = true, when = true, idempotent = true, check = true, needs = true, uses = true, fallback = true }
local RETRY_KEYS = { attempts = true, backoff = true, base = true, max = true, jitter = true }

local LoadError = {}
LoadError.__index = LoadError
LoadError.__tostring = function(e) return e.message end
M.LoadError = LoadError

local function load_error(message) return setmetatable({ message = message }, LoadError) end

local function keys_of(t)
  local ks = {}
  for k in pairs(t) do ks[#ks + 1] = k end
  table.sort(ks)
  return table.concat(ks, ", ")
end

local function check_keys(t, allowed, what)
  for k in pairs(t) do
    if not allowed[k] then
      error(("%s: unknown field '%s' (known: %s)"):format(what, tostring(k), keys_of(allowed)), 0)
    end
  end
end

-- The param's own copy of `spec` is checked and completed: one table may serve
-- several params or runbooks (steps.params).
local function check_param(name, given)
  local what = ("param '%s'"):format(name)
  if type(given) ~= "table" then error(what .. ": expected a table of options", 0) end
  local spec = {}
  for k, v in pairs(given) do spec[k] = v end
  check_keys(spec, PARAM_KEYS, what)
  if type(spec.type) == "table" then spec.type, spec.values = "enum", spec.type end
  spec.type = spec.type or "string"
  if not PARAM_TYPES[spec.type] then
    error(("%s: unknown type '%s' (known: %s)"):format(what, tostring(spec.type), keys_of(PARAM_TYPES)), 0)
  end
  if spec.type == "enum" and (type(spec.values) ~= "table" or #spec.values == 0) then
    error(what .. ": an enum needs values = {...}", 0)
  end
  spec.name = name
  return spec
end

local function check_retry(r, what)
  if type(r) == "number" then r = { attempts = r } end
  if type(r) ~= "table" then error(what .. ": retry must be a table like {attempts = 3}", 0) end
  check_keys(r, RETRY_KEYS, what .. " retry")
  if math.type(r.attempts) ~= "integer" or r.attempts < 1 then
    error(what .. ": retry.attempts must be a whole number >= 1", 0)
  end
  local backoff = r.backoff or "exponential"
  if backoff ~= "exponential" and backoff ~= "fixed" then
    error(what .. ": retry.backoff must be \"exponential\" or \"fixed\"", 0)
  end
  return {
    attempts = r.attempts, backoff = backoff,
    base = duration.check(r.base or "1s", what .. " retry.base"),
    max = duration.check(r.max or "1m", what .. " retry.max"),
    jitter = r.jitter == nil and true or r.jitter,
  }
end

--- `needs` or `uses`: a list of names of earlier steps.
local function check_deps(rb, spec, field, what)
  local list = spec[field]
  if list == nil then return {} end
  if type(list) == "string" then list = { list } end
  if type(list) ~= "table" then error(("%s: %s must be a list of step names"):format(what, field), 0) end
  for _, dep in ipairs(list) do
    if not rb.steps_by_name[dep] then
      error(("%s: %s %q: no earlier step has that name"):format(what, field, tostring(dep)), 0)
    end
  end
  return list
end

local function check_step(rb, name, spec, index)
  local what = ("step '%s'"):format(name)
  if type(spec) ~= "table" then error(what .. ": expected a table with run = function(ctx) ... end", 0) end
  local run = spec.run or spec[1]
  spec[1] = nil
  check_keys(spec, STEP_KEYS, what)
  if type(run) ~= "function" then error(what .. ": run = function(ctx) ... end is missing", 0) end
  for _, f in ipairs { "undo", "when", "check", "fallback" } do
    if spec[f] ~= nil and type(spec[f]) ~= "function" then error(("%s: %s must be a function"):format(what, f), 0) end
  end
  return {
    name = name, index = index, run = run, description = spec.description or "",
    confirm = spec.confirm == true, idempotent = spec.idempotent == true,
    -- false: no deadline at all, asked for in so many words (the default is deadline.LIMIT.run)
    timeout = spec.timeout == false and false or spec.timeout and duration.check(spec.timeout, what .. " timeout"),
    retry = spec.retry and check_retry(spec.retry, what),
    undo = spec.undo, when = spec.when, check = spec.check, fallback = spec.fallback,
    needs = check_deps(rb, spec, "needs", what), uses = check_deps(rb, spec, "uses", what),
  }
end

--- The DSL functions for one runbook being loaded; they fill `rb`.
local function dsl(rb)
  -- fn(...), its problems raised at the line of the runbook that called the caller.
  local function located(fn, ...)
    local ok, err = pcall(fn, ...)
    if not ok then
      local at = debug.getinfo(3, "Sl")
      local src = at.source:sub(1, 1) == "@" and at.source:sub(2) or at.short_src
      error(("%s:%d: %s"):format(src, at.currentline, tostring(err)), 0)
    end
  end
  -- `kind "name" { spec }`
  local function named(kind, fn)
    return function(name)
      if type(name) ~= "string" or name == "" then
        error(("%s needs a name: %s \"name\" { ... }"):format(kind, kind), 2)
      end
      return function(spec) located(fn, name, spec) end
    end
  end
  local function declare_param(name, spec)
    if rb.params_by_name[name] then error(("param '%s' is declared twice"):format(name), 0) end
    local p = check_param(name, spec)
    rb.params[#rb.params + 1], rb.params_by_name[name] = p, p
  end
  -- `params (specs) { "a", "b" }`: params a and b, in order, with the specs
  -- specs.a and specs.b (a shared set, as steps.params).
  local function shared_params(specs, names)
    if type(specs) ~= "table" or type(names) ~= "table" then
      error('params: expected params (specs) { "name", ... }', 0)
    end
    for _, name in ipairs(names) do
      if specs[name] == nil then error(("params: no shared spec '%s' (known: %s)"):format(name, keys_of(specs)), 0) end
      declare_param(name, specs[name])
    end
  end
  return {
    param = named("param", declare_param),
    params = function(specs) return function(names) located(shared_params, specs, names) end end,
    step = named("step", function(name, spec)
      if rb.steps_by_name[name] then error(("step '%s' is declared twice: step names must be unique"):format(name), 0) end
      local s = check_step(rb, name, spec, #rb.steps + 1)
      rb.steps[#rb.steps + 1], rb.steps_by_name[name] = s, s
    end),
  }
end

--- The text of the file `path`, or nil and why.
local function read_file(path)
  local f, err = io.open(path, "rb")
  if not f then return nil, err end
  local text = f:read("a")
  f:close()
  return text
end
M.read_file = read_file

--- The line of `text` that assigns `field` at the top level, else 1.
local function field_line(text, field)
  local n = 1
  for line in text:gmatch("([^\n]*)\n?") do
    if line:match("^" .. field .. "%s*=") then return n end
    n = n + 1
  end
  return 1
end

--- `replaces`: the seed procedures the runbook does in full, as their ids in
-- docs/seed-procedures.md ("000-11"), each once.
local function check_replaces(rb)
  local list = rb.replaces
  if list == nil then return end
  local at = ("%s:%d: replaces"):format(rb.file, field_line(rb.source, "replaces"))
  local seen = {}
  for k, id in pairs(list) do
    if math.type(k) ~= "integer" or k < 1 or k > #list then
      error(load_error(("%s: expected a list of seed procedure ids like {\"000-11\", \"003-7\"}, got the key %s"):format(at, tostring(k))), 0)
    end
    if type(id) ~= "string" or not id:match("^%d%d%d%-%d+$") then
      error(load_error(("%s: entry %d (%s) is not a seed procedure id NNN-N, such as \"000-11\""):format(at, k,
        type(id) == "string" and ("%q"):format(id) or type(id))), 0)
    end
    if seen[id] then error(load_error(("%s: %s is named twice"):format(at, id)), 0) end
    seen[id] = true
  end
end

--- Load and check the runbook at `path`. Returns the runbook, or raises a LoadError.
function M.load(path)
  local text, err = read_file(path)
  if not text then error(load_error(("%s: cannot read runbook: %s"):format(path, err)), 0) end
  local rb = { file = path, dir = path:match("^(.*)/[^/]*$") or ".", source = text,
    params = {}, params_by_name = {}, steps = {}, steps_by_name = {} }
  local e = env.new(dsl(rb), FIELDS, rb.dir)
  local chunk, cerr = load(text, "@" .. path, "t", e)
  if not chunk then error(load_error(cerr), 0) end
  local slow = ("%s: its top-level code did not finish within %gs"):format(path, deadline.LIMIT.load)
  local watch = { message = slow .. "; the watchdog ended the load" }
  local ok, rerr = deadline.call(deadline.LIMIT.load, watch, xpcall, chunk, function(m) return m end)
  if not ok then error(load_error(type(rerr) == "table" and rerr.code == "timeout" and slow or tostring(rerr)), 0) end
  for field, ty in pairs(FIELDS) do
    local v = rawget(e, field)
    if v ~= nil and type(v) ~= ty then
      error(load_error(("%s:1: %s must be a %s, got %s"):format(path, field, ty, type(v))), 0)
    end
    rb[field] = v
  end
  for _, field in ipairs { "name", "description" } do
    if not rb[field] or rb[field] == "" then
      error(load_error(("%s:1: runbook has no %s (add: %s = \"...\")"):format(path, field, field)), 0)
    end
  end
  if #rb.steps == 0 then error(load_error(("%s:1: runbook has no steps"):format(path)), 0) end
  if rb.on_failure and rb.on_failure ~= "undo" and rb.on_failure ~= "stop" then
    error(load_error(("%s:1: on_failure must be \"undo\" or \"stop\""):format(path)), 0)
  end
  local a = rb.approval
  if a then
    local ok = math.type(a.required) == "integer" and a.required >= 0 and (a.by == nil or type(a.by) == "table")
    for k in pairs(a) do ok = ok and (k == "required" or k == "by") end
    for _, name in ipairs(a.by or {}) do ok = ok and type(name) == "string" end
    if not ok then
      error(load_error(("%s:1: approval must be {required = N, by = {\"name\", ...}} (by is optional)"):format(path)), 0)
    end
  end
  if rb.notify then
    local ok, nerr = pcall(require("notify").check_hooks, rb.notify)
    if not ok then error(load_error(("%s:1: %s"):format(path, tostring(nerr))), 0) end
  end
  check_replaces(rb)
  rb.env = e
  return rb
end

--- A runbook environment with nothing loaded into it, and the fields a
-- runbook may assign: what `lint` describes to luacheck.
function M.blank()
  local rb = { params = {}, params_by_name = {}, steps = {}, steps_by_name = {} }
  return env.new(dsl(rb), FIELDS), FIELDS
end

return M
