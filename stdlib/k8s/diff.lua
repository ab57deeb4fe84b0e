--- A short description of what a write changes, in the words an operator
-- reads in a dry run: "replicas 2 -> 6", "image[backend] a -> b",
-- "annotation kubectl.kubernetes.io/restartedAt added".
--
--   changes(before, after) -> { {path=, label=, old=, new=}, ... }
--   text(changes) -> "replicas 2 -> 6, image[backend] a -> b" ("no change" when empty)
--
-- Only what a user wrote counts: status and the metadata the server
-- maintains (resourceVersion, generation, managedFields, uid, timestamps)
-- are ignored. Lists whose items have a name (containers, env, ports) are
-- compared by name; a Secret's values are never shown.
local cjson = require("cjson")

local M = {}

local IGNORED = {
  status = true, ["metadata.resourceVersion"] = true, ["metadata.generation"] = true,
  ["metadata.managedFields"] = true, ["metadata.uid"] = true, ["metadata.creationTimestamp"] = true,
  ["metadata.selfLink"] = true, kind = true, apiVersion = true,
  ["metadata.annotations.kubectl.kubernetes.io/last-applied-configuration"] = true,
  ["metadata.annotations.deployment.kubernetes.io/revision"] = true,
}

local function is_array(t)
  return type(t) == "table" and (t[1] ~= nil or getmetatable(t) ~= nil and getmetatable(t).__name == "k8s.array")
end

local function keyed(list)
  for _, v in ipairs(list) do
    if type(v) ~= "table" or (v.name == nil) then return nil end
  end
  return "name"
end

-- Leaf values of t, flattened to { path = value }; segments are kept in
-- `segs` so labels can be built from them.
local function flatten(t, prefix, segs, out)
  if type(t) ~= "table" or (next(t) == nil) then
    out[prefix] = { value = t, segs = segs }
    return out
  end
  if is_array(t) then
    local key = keyed(t)
    for i, v in ipairs(t) do
      local seg = key and ("[" .. tostring(v[key]) .. "]") or ("[" .. i .. "]")
      local s = table.move(segs, 1, #segs, 1, {})
      s[#s + 1] = seg
      flatten(v, prefix .. seg, s, out)
    end
    return out
  end
  for k, v in pairs(t) do
    if k ~= "name" or not prefix:match("%]$") then
      local p = prefix == "" and tostring(k) or (prefix .. "." .. tostring(k))
      if not IGNORED[p] and not IGNORED[p:match("^[^.]+") or ""] then
        local s = table.move(segs, 1, #segs, 1, {})
        s[#s + 1] = tostring(k)
        flatten(v, p, s, out)
      end
    end
  end
  return out
end

local function short(v)
  if v == nil then return "(none)" end
  if v == cjson.null then return "null" end
  local s = type(v) == "table" and cjson.encode(v) or tostring(v)
  if #s > 60 then s = s:sub(1, 57) .. "..." end
  return s
end

-- "spec.template.spec.containers[backend].image" -> "image[backend]"
local function label(segs, kind)
  local path = table.concat(segs, "."):gsub("%.%[", "[")
  local rules = {
    { "^metadata%.annotations%.(.+)$", "annotation %1" },
    { "^metadata%.labels%.(.+)$", "label %1" },
    { "^spec%.template%.metadata%.annotations%.(.+)$", "pod annotation %1" },
    { "^spec%.template%.metadata%.labels%.(.+)$", "pod label %1" },
    { "^spec%.template%.spec%.containers(%[[^%]]+%])%.image$", "image%1" },
    { "^spec%.template%.spec%.containers(%[[^%]]+%])%.env(%[[^%]]+%])%.(.+)$", "env%2%1 %3" },
    { "^spec%.template%.spec%.containers(%[[^%]]+%])%.(.+)$", "container%1 %2" },
    { "^spec%.template%.spec%.(.+)$", "pod %1" },
    { "^spec%.(.+)$", "%1" },
  }
  if kind == "Secret" then path = path:gsub("^data%.", "data "):gsub("^stringData%.", "data ") end
  for _, r in ipairs(rules) do
    local out, n = path:gsub(r[1], r[2])
    if n > 0 then return (out:gsub(" value$", "")) end
  end
  return path
end

function M.changes(before, after)
  local kind = (after and after.kind) or (before and before.kind)
  local a = flatten(before or {}, "", {}, {})
  local b = flatten(after or {}, "", {}, {})
  local out = {}
  local function add(path, old, new, segs)
    if kind == "Secret" and path:match("^data") then old, new = old and "***", new and "***" end
    out[#out + 1] = { path = path, label = label(segs, kind), old = old, new = new }
  end
  for p, v in pairs(b) do
    local o = a[p]
    if not o then add(p, nil, v.value, v.segs)
    elseif cjson.encode { o.value } ~= cjson.encode { v.value } then add(p, o.value, v.value, v.segs) end
  end
  for p, o in pairs(a) do
    if not b[p] then add(p, o.value, nil, o.segs) end
  end
  table.sort(out, function(x, y) return x.path < y.path end)
  return out
end

function M.text(changes, max)
  max = max or 8
  if #changes == 0 then return "no change" end
  local parts = {}
  for i, c in ipairs(changes) do
    if i > max then
      parts[#parts + 1] = ("and %d more"):format(#changes - max)
      break
    end
    if c.old == nil then
      parts[#parts + 1] = c.label .. " added" .. (c.label:match("^annotation") and "" or (" = " .. short(c.new)))
    elseif c.new == nil then
      parts[#parts + 1] = c.label .. " removed"
    else
      parts[#parts + 1] = ("%s %s -> %s"):format(c.label, short(c.old), short(c.new))
    end
  end
  return table.concat(parts, ", ")
end

return M
