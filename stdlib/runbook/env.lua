--- The environment a runbook file runs in. It has Lua's safe builtins, the
-- runbook libraries (loaded on first use, so a runbook that never touches
-- Kafka never loads librdkafka), and no way to write around the effect gate:
-- os.execute, io.popen, os.remove, os.rename, os.tmpname and io.open for
-- writing raise an error naming the gate-aware function to use. Reading or
-- assigning an undeclared global is an error (nmap's strict.lua, done with a
-- metatable).
--
-- Nothing a runbook assigns or replaces reaches host code: it gets its own
-- copies of the standard tables, and sees the libraries (and any metatable it
-- did not set itself, such as the strings') through read-only views. Host code
-- keeps using the real tables.
local M = {}

--- Libraries a runbook can name without require: global name -> module.
-- (yaml lives under runbook. so it does not shadow lyaml's own "yaml".)
M.libraries = {
  json = "json", yaml = "runbook.yaml", log = "log", exec = "exec", http = "http", fs = "fs",
  time = "time", duration = "duration", secret = "secret", gate = "gate", tls = "tls", rotation = "rotation",
  k8s = "k8s", kafka = "kafka", pg = "pg", redis = "redis", dapr = "dapr", notify = "notify", checks = "checks", base64 = "base64", helm = "helm",
  backupset = "backupset", prom = "prom", alertmanager = "alertmanager", steps = "steps",
}

local SAFE = {
  "assert", "error", "ipairs", "next", "pairs", "pcall", "rawequal", "rawget", "rawlen",
  "rawset", "select", "tonumber", "tostring", "type", "_VERSION", "collectgarbage",
}

--- Standard tables a runbook gets its own shallow copy of (a few dozen
-- functions each: cheap at load, and replacing string.format in a step then
-- changes only the runbook's own calls).
local COPIED = { "string", "table", "math", "utf8" }

local function copy(t)
  local c = {}
  for k, v in pairs(t) do c[k] = v end
  return c
end

--- Read-only views of host tables, one per table (weak: a view lives as long
-- as its table is used). Reading goes through to the table, nested tables
-- come back as views too, pairs and # work, a view equals its table (so
-- `v == yaml.null` holds for a null yaml.load returned), and assigning raises
-- naming the table. rawset on a view only touches the empty view itself,
-- which host code never reads.
local views, targets = setmetatable({}, { __mode = "k" }), setmetatable({}, { __mode = "k" })

local function same(a, b) return rawequal(targets[a] or a, targets[b] or b) end

local function readonly(t, name)
  if type(t) ~= "table" then return t end
  if views[t] then return views[t] end
  local function nested(k, v) return readonly(v, name .. "." .. tostring(k)) end
  local view = setmetatable({}, {
    __index = function(_, k) return nested(k, t[k]) end,
    __newindex = function(_, k)
      error(("%s.%s: %s is read-only in a runbook (keep your own value in a local)"):format(
        name, tostring(k), name), 2)
    end,
    __pairs = function()
      return function(_, k)
        local nk, nv = next(t, k)
        return nk, nested(nk, nv)
      end, t, nil
    end,
    __len = function() return #t end,
    __eq = same,
    __metatable = false,
  })
  views[t], targets[view] = view, t
  return view
end
M.readonly = readonly   -- for host tables handed to runbook code outside its environment (ctx.log)

--- setmetatable and getmetatable for runbooks: a runbook sees the metatables
-- it set itself; any other (the strings', a file handle's, a module object's
-- class) comes back as a read-only view, so `getmetatable("").__index.format
-- = f` cannot change the host's string methods.
local own = setmetatable({}, { __mode = "k" })

local function set_metatable(t, mt)
  if type(mt) == "table" then own[mt] = true end
  return setmetatable(t, mt)
end

local function get_metatable(v)
  local mt = getmetatable(v)
  if type(mt) ~= "table" or own[mt] then return mt end
  return readonly(mt, "metatable")
end

local function refuse(name, instead)
  return function()
    error(("%s is not available in a runbook: use %s, which goes through the effect gate"):format(name, instead), 2)
  end
end

local function safe_open(path, mode)
  mode = mode or "r"
  if not mode:match("^r[b]?$") then
    error(("io.open(%q, %q): runbooks write files with fs.write (or fs.remove), which goes through the effect gate"):format(
      tostring(path), mode), 2)
  end
  return io.open(path, mode)
end

local function make_os()
  return {
    time = os.time, date = os.date, clock = os.clock, getenv = os.getenv, difftime = os.difftime,
    execute = refuse("os.execute", "exec.run"), remove = refuse("os.remove", "fs.remove"),
    rename = refuse("os.rename", "fs.rename"), exit = refuse("os.exit", "error() to fail a step"),
    tmpname = refuse("os.tmpname", "fs.write with a path of your choosing"),
  }
end

local function make_io()
  local redacting = require("runbook.output").redacting
  local stdout, stderr = redacting(io.stdout), redacting(io.stderr)
  return {
    open = safe_open, lines = io.lines, read = io.read, type = io.type,
    write = function(...) return stdout:write(...) end,
    popen = refuse("io.popen", "exec.run (exec.read for commands that only read)"),
    stdout = stdout, stderr = stderr, stdin = io.stdin,
  }
end

--- A require for runbooks: the runbook libraries by name, or a Lua file next
-- to the runbook (a team's shared helpers), loaded into the same environment
-- so it is held to the same rules. Nothing else: not the host's private
-- library, not debug or package, not modules that write files.
--
-- Each file is recorded in M.sources as {path (absolute), sha256} of the very
-- text that runs, and passed to M.on_source when set (the run journals files
-- required once it has started), so a resume can refuse when one changed.
M.sources = {}

local function read_source(path)
  local f, err = io.open(path, "rb")
  if not f then error(err, 3) end
  local text = f:read("a")
  f:close()
  local host = require("runbook.host")
  local rec = { path = host.absolute(path), sha256 = host.sha256(text) }
  M.sources[#M.sources + 1] = rec
  if M.on_source then M.on_source(rec) end
  return text
end

local function make_require(env, dir)
  local loaded = {}
  return function(name)
    if type(name) ~= "string" then error("require: expected a module name", 2) end
    if M.libraries[name] then return readonly(require(M.libraries[name]), name) end
    if loaded[name] == nil then
      local path = dir and package.searchpath(name, dir .. "/?.lua")
      if not path then
        error(("require %q: not a runbook library and no %s.lua next to the runbook"):format(
          name, name:gsub("%.", "/")), 2)
      end
      local chunk, err = load(read_source(path), "@" .. path, "t", env)
      if not chunk then error(err, 2) end
      loaded[name] = chunk(name) or true
    end
    return loaded[name]
  end
end

--- pcall, xpcall and coroutine.resume that re-raise once the step is out of
-- time or interrupted, so `while true do pcall(...) end` cannot outlive its step.
local host = require("runbook.host")
local check = host.check_deadline

local function rethrowing(catch)
  return function(...)
    local res = table.pack(catch(...))
    if not res[1] then check() end
    return table.unpack(res, 1, res.n)
  end
end

--- A coroutine with the deadline hook: one created at load, before any
-- deadline, would otherwise inherit none and loop on inside a step.
local function create(f)
  local c = coroutine.create(f)
  host.hook(c)
  return c
end

local function make_coroutine()
  local co = copy(coroutine)
  co.create = create
  co.resume = rethrowing(coroutine.resume)
  co.wrap = function(f)
    local c = create(f)
    return function(...)
      local res = table.pack(co.resume(c, ...))
      if not res[1] then error(res[2], 0) end
      return table.unpack(res, 2, res.n)
    end
  end
  return co
end

--- A new environment. `declare` is a table of globals the DSL provides
-- (param, step, ...), `fields` the names a runbook may assign at top level,
-- and `dir` the runbook's directory (for require of local helpers).
function M.new(declare, fields, dir)
  local env = {}
  for _, k in ipairs(SAFE) do env[k] = _G[k] end
  for _, k in ipairs(COPIED) do env[k] = copy(_G[k]) end
  env.setmetatable, env.getmetatable = set_metatable, get_metatable
  env.os, env.io, env.require = make_os(), make_io(), make_require(env, dir)
  env.pcall, env.xpcall, env.coroutine = rethrowing(pcall), rethrowing(xpcall), make_coroutine()
  env.print = function(...)
    local parts = {}
    for i = 1, select("#", ...) do parts[i] = tostring((select(i, ...))) end
    require("log").info(table.concat(parts, "\t"))
  end
  env.load = function(chunk, name, _, e) return load(chunk, name, "t", e or env) end
  env._G = env
  for k, v in pairs(declare) do env[k] = v end
  local declared = {}
  for k in pairs(fields) do declared[k] = true end
  return setmetatable(env, {
    __index = function(_, k)
      local lib = M.libraries[k]
      if lib then
        local mod = readonly(require(lib), k)
        rawset(env, k, mod)
        return mod
      end
      if declared[k] then return nil end
      error(("undeclared global '%s' (a typo? locals need 'local')"):format(tostring(k)), 2)
    end,
    __newindex = function(t, k, v)
      if not declared[k] then
        error(("assignment to undeclared global '%s' (use 'local %s', or one of the runbook fields)"):format(
          tostring(k), tostring(k)), 2)
      end
      rawset(t, k, v)
    end,
  })
end

return M
