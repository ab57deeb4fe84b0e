--- Files for runbooks: reads run freely; writes, renames and deletes go
-- through the effect gate (in a dry run they are reported, not done). The
-- functions the writes use (io.open for writing, os.rename, os.remove,
-- host.mkdir) also refuse in C during a dry run (host/guard.c), so a write
-- never happens in one even if the Lua around it was replaced.
local library_effect = require("runbook.effect").library
local host = require("runbook.host")
local lfs = require("lfs")

local M = {}

-- io.open, os.remove and os.rename name the path in their messages already.
local raise = host.raiser "fs"

function M.read(path)
  local f, err = io.open(path, "rb")
  if not f then raise { op = "read", message = err } end
  local data = f:read("a")
  f:close()
  return data
end

function M.exists(path)
  local f = io.open(path, "rb")
  if f then f:close() end
  return f ~= nil
end

function M.lines(path)
  local f, err = io.open(path, "rb")
  if not f then raise { op = "lines", message = err } end
  return f:lines()
end

--- Write `data` to `path` (replacing it) through a temporary file and a rename,
-- so a crash never leaves a half-written file. opts.append appends instead.
function M.write(path, data, opts)
  opts = opts or {}
  data = tostring(data)
  local verb = opts.append and "append" or "write"
  return library_effect {
    module = "fs", op = verb, target = path,
    summary = ("%s %d bytes to %s"):format(verb, #data, path),
    perform = function()
      if opts.append then
        local f, err = io.open(path, "ab")
        if not f then raise { op = verb, message = err } end
        f:write(data)
        f:close()
      else
        local tmp = path .. ".tmp-" .. host.identity().pid
        local f, err = io.open(tmp, "wb")
        if not f then raise { op = verb, message = err } end
        local ok, werr = f:write(data)
        f:close()
        if not ok then os.remove(tmp); raise { op = verb, message = path .. ": " .. werr } end
        local renamed, rerr = os.rename(tmp, path)
        if not renamed then os.remove(tmp); raise { op = verb, message = rerr } end
      end
      return { bytes = #data }
    end,
  }
end

function M.remove(path)
  return library_effect {
    module = "fs", op = "remove", target = path, summary = "remove " .. path,
    perform = function()
      local ok, err = os.remove(path)
      if not ok then raise { op = "remove", message = err } end
      return { removed = path }
    end,
  }
end

function M.rename(from, to)
  return library_effect {
    module = "fs", op = "rename", target = from, summary = ("rename %s to %s"):format(from, to),
    perform = function()
      local ok, err = os.rename(from, to)
      if not ok then raise { op = "rename", message = err } end
      return { from = from, to = to }
    end,
  }
end

function M.mkdir(path)
  return library_effect {
    module = "fs", op = "mkdir", target = path, summary = "create directory " .. path,
    perform = function()
      local at = path:sub(1, 1) == "/" and "" or "."
      for part in path:gmatch("[^/]+") do
        at = at .. "/" .. part
        if lfs.attributes(at, "mode") ~= "directory" then
          local ok, err = host.mkdir(at)
          if not ok then raise { op = "mkdir", message = at .. ": " .. err } end
        end
      end
      return { created = path }
    end,
  }
end

return M
