--- JSON for runbooks, over lua-cjson. json.null is the distinct null value;
-- encode/decode errors are raised as structured errors naming the operation.
local cjson = require("cjson")
local host = require("runbook.host")

local codec = cjson.new()
codec.encode_sparse_array(true)
codec.encode_invalid_numbers(false)

local M = { null = cjson.null }

local raise = host.raiser "json"

function M.encode(v)
  local ok, s = pcall(codec.encode, v)
  if not ok then raise { op = "encode", message = tostring(s) } end
  return s
end

function M.decode(s)
  if type(s) ~= "string" then raise { op = "decode", message = "expected a string, got " .. type(s) } end
  local ok, v = pcall(codec.decode, s)
  if not ok then raise { op = "decode", message = tostring(v) } end
  return v
end

--- An empty table that encodes as [] rather than {}.
function M.array(t)
  return setmetatable(t or {}, cjson.array_mt)
end

return M
