--- http.api: what a library for one HTTP API (prom, dapr) is made of, over
-- the http module, written once:
--
--   local api = require("http.api").new("prom", "Prometheus")
--   local M, Client, raise = api.module, api.Client, api.raise
--   function M.connect(opts)
--     opts = api:options(opts, "{url=, token=}")
--     return api:client(opts, { url = api:url(opts.url or os.getenv("PROMETHEUS_URL"), "url") }, "30s")
--   end
--   function Client:alerts() local r = api:request(self, "alerts", nil, { path = {...} }) ... end
--   api:export { "query", "alerts" }   -- prom.alerts() on a client made by M.connect() on first use
--
-- A client is a table of the API's class with url, timeout, connect_timeout
-- and ca_file. A request that cannot reach the API raises the library's
-- structured error with curl's reason as the code ("couldnt_connect"); what
-- the API answered is the library's to judge.
local native = require("runbook.http")
local duration = require("duration")
local host = require("runbook.host")

local Api = {}
Api.__index = Api

local M = {}

--- The parts of library `name` (its errors' module) for `service`, the other
-- end as messages name it ("Prometheus", "sidecar").
function M.new(name, service)
  local Client = {}
  Client.__index = Client
  return setmetatable({ name = name, service = service, module = {}, Client = Client, raise = host.raiser(name) }, Api)
end

--- connect's argument: nil (no options) or a table; `shape` shows the fields in the error.
function Api:options(opts, shape)
  if opts == nil then return {} end
  if type(opts) ~= "table" then error(("%s.connect expects a table %s"):format(self.name, shape), 3) end
  return opts
end

--- The endpoint, an http(s) URL without trailing slashes; `field` names it in the error.
function Api:url(url, field)
  if type(url) ~= "string" or not url:match("^https?://[^/]") then
    error(("%s.connect: %s must be an http(s) URL, got %s"):format(self.name, field, tostring(url)), 3)
  end
  return (url:gsub("/+$", ""))
end

--- A client: the fields `c` (url at least) and the timeouts of `opts`
-- (timeout, default `timeout`; connect_timeout, default http's).
function Api:client(opts, c, timeout)
  c.timeout = duration.check(opts.timeout or timeout, self.name .. " timeout")
  c.connect_timeout = opts.connect_timeout and duration.check(opts.connect_timeout, self.name .. " connect_timeout")
  c.ca_file = opts.ca_file
  return setmetatable(c, self.Client)
end

--- One request of client `c` (http.request's fields but the URL's, which is
-- c's, and the client's timeouts and CA): the response, whatever its status.
-- `what`, when given, begins the message of a failure.
function Api:request(c, op, what, req)
  req.url, req.timeout, req.connect_timeout, req.cafile = c.url, c.timeout, c.connect_timeout, c.ca_file
  local ok, r = pcall(native.request, req)
  if not ok then
    if type(r) ~= "table" or r.module ~= "http" then error(r, 0) end
    self.raise { op = op, code = r.code, retryable = r.retryable,
      message = ("%s%s at %s: %s"):format(what and what ~= "" and what .. ": " or "", self.service, c.url,
        tostring(r.message)) }
  end
  return r
end

--- The module-level functions `names`: each calls the client's method of that
-- name on one client, made by the module's connect() on first use. Returns
-- the function that gives that client.
function Api:export(names)
  local lib, default = self.module, nil
  local function client()
    default = default or lib.connect()
    return default
  end
  for _, name in ipairs(names) do
    lib[name] = function(...) local c = client(); return c[name](c, ...) end
  end
  return client
end

return M
