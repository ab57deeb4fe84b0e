--- JSON for runbooks, over lua-cjson. json.null is the distinct null value;
-- encode/decode errors are raised as structured errors naming the operation.
local cjson = require "cjson"
local host = require "runbook.host"

local codec = cjson.new()
codec.encode_sparse_array(true)
codec.encode_invalid_numbers(false)

local M = { null = cjson.null }

local function fail(op, err)
  host.raise { module = "json", op = op, message = tostring(err), retryable = false }
end

function M.encode(v)
  local ok, s = pcall(codec.encode, v)
  if not ok then fail("encode", s) end
  return s
end

function M.decode(s)
  if type(s) ~= "string" then fail("decode", "expected a string, got " .. type(s)) end
  local ok, v = pcall(codec.decode, s)
  if not ok then fail("decode", v) end
  return v
end

--- An empty table that encodes as [] rather than {}.
function M.array(t)
  return setmetatable(t or {}, cjson.array_mt)
end

return M
