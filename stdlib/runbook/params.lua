--- Resolving a runbook's params from -p key=value, --params-file and defaults.
-- Every problem names the param; the CLI turns it into exit status 2 before
-- any step runs.
local duration = require("duration")
local host = require("runbook.host")

local M = {}

local ParamError = {}
ParamError.__tostring = function(e) return e.message end
M.ParamError = ParamError

local function fail(fmt, ...)
  error(setmetatable({ message = fmt:format(...) }, ParamError), 0)
end

local BOOLEANS = { ["true"] = true, yes = true, ["1"] = true, on = true,
  ["false"] = false, no = false, ["0"] = false, off = false }

--- Convert `v` (a string from the command line, or a typed value from a file) to the param's type.
local function convert(p, v)
  local t = p.type
  if t == "string" then
    if type(v) == "string" or type(v) == "number" then return tostring(v) end
  elseif t == "number" then
    local n = tonumber(v)
    -- inf and nan have no JSON form: the journal and --output json could not hold them
    if n and (n ~= n or n == math.huge or n == -math.huge) then
      fail("param '%s': %s is not a finite number", p.name, tostring(v))
    end
    if n then return n end
  elseif t == "integer" then
    local n = math.tointeger(tonumber(v))
    if n then return n end
  elseif t == "boolean" then
    if type(v) == "boolean" then return v end
    local b = BOOLEANS[tostring(v):lower()]
    if b ~= nil then return b end
  elseif t == "duration" then
    local secs, err = duration.parse(v)
    if secs then return secs end
    fail("param '%s': %s", p.name, err)
  elseif t == "list" then
    -- "a,b c" as -p and a default give it; a list as a params file and the journal do
    local items = {}
    if type(v) == "string" or type(v) == "number" then
      for item in tostring(v):gmatch("[^,%s]+") do items[#items + 1] = item end
      return items
    elseif type(v) == "table" then
      for k, item in pairs(v) do
        if math.type(k) ~= "integer" or (type(item) ~= "string" and type(item) ~= "number") then
          fail("param '%s': expected a list of strings", p.name)
        end
      end
      for i = 1, #v do items[i] = tostring(v[i]) end
      return items
    end
  elseif t == "enum" then
    for _, allowed in ipairs(p.values) do
      if tostring(allowed) == tostring(v) then return allowed end
    end
    fail("param '%s': %q is not one of: %s", p.name, tostring(v), table.concat(p.values, ", "))
  end
  local shown = p.secret and "***" or tostring(v)
  fail("param '%s': expected %s %s, got %q", p.name, t == "integer" and "an" or "a", t, shown)
end

-- Params files read so far, by path: {doc, seekable}. Each is read once, so
-- that a plan and its dry run see the same params, and a pipe (serve's
-- /dev/stdin) can be given at all.
local files = {}

local function read_params_file(path)
  if files[path] then return files[path].doc end
  local f, err = io.open(path, "rb")
  if not f then fail("--params-file: %s", err) end
  local text = f:read("a")
  local seekable = f:seek("set") ~= nil
  f:close()
  -- JSON (a .json file, or text that is an object: serve's) without loading the YAML parser
  local ok, doc = false, nil
  if path:match("%.json$") or text:match("^%s*{") then ok, doc = pcall(require("cjson").decode, text) end
  if not ok and not path:match("%.json$") then ok, doc = pcall(function() return require("lyaml").load(text) end) end
  if not ok then fail("--params-file %s: cannot parse: %s", path, tostring(doc)) end
  if type(doc) ~= "table" then fail("--params-file %s: expected a mapping of param names to values", path) end
  files[path] = { doc = doc, seekable = seekable }
  return doc
end

--- Whether the params file at `path` was a file that can be read again (not a
-- pipe), so that resume can tell whether it changed.
function M.rereadable(path) return files[path] == nil or files[path].seekable end

--- Resolve params. `given` is a list of "key=value" strings; `file` an optional path;
-- `base` the values of an earlier run (a resume), which both override.
-- Returns a table name -> typed value, and one name -> the value as it was
-- written (the text after -p k=, the file's value, the runbook's default) for
-- the report. Secret values are registered with the host.
function M.resolve(rb, given, file, base)
  local raw = {}
  for k, v in pairs(base or {}) do raw[k] = v end
  if file then
    for k, v in pairs(read_params_file(file)) do raw[tostring(k)] = v end
  end
  for _, kv in ipairs(given or {}) do
    local k, v = kv:match("^([^=]+)=(.*)$")
    if not k then fail("-p %s: expected key=value", kv) end
    raw[k] = v
  end
  for k, v in pairs(raw) do
    if base and v == "***" and base[k] == v and rb.params_by_name[k] and rb.params_by_name[k].secret then
      fail("param '%s' is secret, so neither the journal nor a plan holds it: give it again with -p %s=...", k, k)
    end
    if not rb.params_by_name[k] then
      local known = {}
      for _, p in ipairs(rb.params) do known[#known + 1] = p.name end
      fail("unknown param '%s'%s (%s has: %s)", k, require("runbook.suggest").hint(k, known), rb.name,
        #known > 0 and table.concat(known, ", ") or "no params")
    end
  end
  local values, written = {}, {}
  for _, p in ipairs(rb.params) do
    local v = raw[p.name]
    if v == nil then v = p.default end
    if v == nil then
      if p.required then fail("missing required param '%s'%s", p.name, p.help and (" (" .. p.help .. ")") or "") end
    else
      if p.secret and type(v) ~= "table" then host.secret(tostring(v)) end
      values[p.name] = convert(p, v)
      if p.secret and p.type == "list" then
        for _, item in ipairs(values[p.name]) do host.secret(item) end
      end
      written[p.name] = type(v) == "table" and v or tostring(v)
    end
  end
  return values, written
end

--- A param's value as text: a list as its items joined by commas.
function M.text(v)
  return type(v) == "table" and table.concat(v, ",") or tostring(v)
end

--- The params with secret values shown as "***", for output and the journal.
function M.redacted(rb, values)
  local out = {}
  for k, v in pairs(values) do
    out[k] = rb.params_by_name[k].secret and "***" or v
  end
  return out
end

return M
