--- YAML for runbooks, over lyaml. load() returns the first document,
-- load_all() every document (Kubernetes manifests are often several).
local lyaml = require "lyaml"
local host = require "runbook.host"

local M = { null = lyaml.null }

local function fail(op, err)
  host.raise { module = "yaml", op = op, message = tostring(err), retryable = false }
end

function M.load_all(s)
  local ok, docs = pcall(lyaml.load, s, { all = true })
  if not ok then fail("load", docs) end
  return docs
end

function M.load(s)
  return M.load_all(s)[1]
end

function M.dump(...)
  local ok, s = pcall(lyaml.dump, { ... })
  if not ok then fail("dump", s) end
  return s
end

return M
