--- YAML for runbooks, over lyaml. load() returns the first document,
-- load_all() every document (Kubernetes manifests are often several).
local lyaml = require("lyaml")
local host = require("runbook.host")

local M = { null = lyaml.null }

local raise = host.raiser "yaml"

function M.load_all(s)
  local ok, docs = pcall(lyaml.load, s, { all = true })
  if not ok then raise { op = "load", message = tostring(docs) } end
  return docs
end

function M.load(s)
  return M.load_all(s)[1]
end

function M.dump(...)
  local ok, s = pcall(lyaml.dump, { ... })
  if not ok then raise { op = "dump", message = tostring(s) } end
  return s
end

return M
