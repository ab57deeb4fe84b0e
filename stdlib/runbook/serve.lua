--- `runbook serve`: Alertmanager's webhook (payload version 4) turned into
-- plans or runs by a rules file (docs/design.md, "runbook serve"). The HTTP
-- server is libmicrohttpd (modules/httpd.c); each plan or run is a child
-- `runbook plan|run` process of its own, so serve itself never loads a
-- runbook and a runbook never sees serve's token.
local host = require "runbook.host"
local cjson = require "cjson"
local EXIT = require "runbook.exit"

local M = {}

local MODES = { plan = true, run = true, ["dry-run"] = true }
local RULE_KEYS = { name = true, match = true, runbook = true, mode = true, params = true, require_approval = true,
  throttle = true, lock = true }

local function say(fmt, ...)
  io.stderr:write(host.redact("runbook: serve: " .. fmt:format(...) .. "\n"))
end

--- The line of `text` where `key:` first appears after line `from`, for messages.
local function line_of(text, key, from)
  local n = 0
  for line in (text .. "\n"):gmatch("([^\n]*)\n") do
    n = n + 1
    if n >= (from or 1) and line:match("^[%s%-]*" .. key:gsub("%p", "%%%0") .. "%s*:") then return n end
  end
  return from or 1
end

--- A matcher of one label: "value", "!=value" or "=~pattern" (a Lua pattern, anchored).
local function matcher(spec)
  local op, arg = spec:match("^(!=)(.*)$")
  if not op then op, arg = spec:match("^(=~)(.*)$") end
  if op == "!=" then return function(v) return v ~= arg end end
  if op == "=~" then return function(v) return v ~= nil and v:match("^" .. arg .. "$") ~= nil end end
  return function(v) return v == spec end
end

--- The line each item of the top-level `rules:` list starts on.
local function rule_lines(text)
  local lines, n, indent, inside = {}, 0, nil, false
  for line in (text .. "\n"):gmatch("([^\n]*)\n") do
    n = n + 1
    if line:match("^rules%s*:") then inside = true
    elseif inside then
      local lead = line:match("^(%s*)%-%s")
      indent = indent or lead
      if lead and lead == indent then lines[#lines + 1] = n end
    end
  end
  return lines
end

--- One rule checked and compiled; raises "LINE: message". `at` is its first line.
local function compile(rule, i, text, at, resolve)
  local function bad(line, fmt, ...) error(("%d: rule %d: " .. fmt):format(line, i, ...), 0) end
  if type(rule) ~= "table" then bad(at, "expected a mapping") end
  for k in pairs(rule) do
    if not RULE_KEYS[k] then bad(line_of(text, tostring(k), at), "unknown field '%s'", tostring(k)) end
  end
  if type(rule.name) ~= "string" then bad(at, "needs a name") end
  local where = ("rule '%s'"):format(rule.name)
  if type(rule.runbook) ~= "string" then bad(at, "%s needs a runbook", where) end
  local path, why = resolve(rule.runbook)
  local f = path and io.open(path, "rb")
  if f then f:close() else why = why or ("cannot read runbook " .. path) end
  if not f then bad(line_of(text, "runbook", at), "%s: %s", where, why) end
  local mode = rule.mode or "plan"
  if not MODES[mode] then bad(line_of(text, "mode", at), "%s: mode must be plan, run or dry-run", where) end
  local match = rule.match or {}
  if type(match) ~= "table" or type(match.alertname) ~= "string" then
    bad(line_of(text, "match", at), "%s: match needs an alertname", where)
  end
  local labels = {}
  for k, v in pairs(match.labels or {}) do labels[k] = matcher(tostring(v)) end
  if rule.lock ~= nil and type(rule.lock) ~= "string" then
    bad(line_of(text, "lock", at), "%s: lock is a key (k8s:NAMESPACE/NAME for a Lease)", where)
  end
  local throttle, terr = require("duration").parse(rule.throttle or "1h")
  if not throttle then bad(line_of(text, "throttle", at), "%s: throttle: %s", where, terr) end
  local params = {}
  for k, v in pairs(rule.params or {}) do params[#params + 1] = { name = tostring(k), template = tostring(v) } end
  table.sort(params, function(a, b) return a.name < b.name end)
  return { name = rule.name, runbook = rule.runbook, mode = mode, alertname = match.alertname, labels = labels,
    params = params, throttle = throttle, require_approval = tonumber(rule.require_approval), lock = rule.lock }
end

--- The rules of `path`. Returns the list, or nil and "PATH:LINE: message".
function M.load_rules(path, resolve)
  local f, err = io.open(path, "rb")
  if not f then return nil, err end
  local text = f:read("a")
  f:close()
  local ok, doc = pcall(require("lyaml").load, text)
  if not ok then return nil, ("%s: %s"):format(path, tostring(doc)) end
  if type(doc) ~= "table" or type(doc.rules) ~= "table" or #doc.rules == 0 then
    return nil, ("%s:1: expected 'rules:' with a list of rules"):format(path)
  end
  local rules, lines = {}, rule_lines(text)
  for i, r in ipairs(doc.rules) do
    local cok, rule = pcall(compile, r, i, text, lines[i] or 1, resolve)
    if not cok then return nil, ("%s:%s"):format(path, rule) end
    rules[i] = rule
  end
  return rules
end

--- `{{ labels.x }}` and `{{ annotations.y }}` from the alert; nil and why when one is missing.
local function render(template, alert)
  local missing
  local out = template:gsub("{{%s*(%a+)%.([%w_]+)%s*}}", function(kind, key)
    local t = type(alert[kind]) == "table" and alert[kind] or {}
    if t[key] == nil then missing = missing or (kind .. "." .. key) end
    return tostring(t[key] or "")
  end)
  if missing then return nil, "the alert has no " .. missing end
  return out
end

--- The rule and label set an alert is acted on once for: "rule{k=v,...}".
local function alert_key(rule, alert)
  return rule.name .. require("runbook.plan").canonical(alert.labels)
end

local function matches(rule, alert)
  local labels = type(alert.labels) == "table" and alert.labels or {}
  if labels.alertname ~= rule.alertname then return false end
  for k, m in pairs(rule.labels) do
    if not m(labels[k]) then return false end
  end
  return true
end

-- ---- the server --------------------------------------------------------------------

local Server = {}
Server.__index = Server

--- The argv of the child that plans or runs `rule` for `alert`, or nil and why.
function Server:command(rule, alert)
  local args = { self.bin, rule.mode == "plan" and "plan" or "run", rule.runbook }
  for _, p in ipairs(rule.params) do
    local v, why = render(p.template, alert)
    if not v then return nil, why end
    args[#args + 1] = "-p"
    args[#args + 1] = p.name .. "=" .. v
  end
  if rule.mode == "plan" and rule.require_approval then
    args[#args + 1] = "--require-approval"
    args[#args + 1] = tostring(rule.require_approval)
  end
  if rule.mode == "plan" then
    args[#args + 1] = "--alert"
    args[#args + 1] = alert_key(rule, alert)
  end
  args[#args + 1] = rule.mode == "run" and "--yes" or rule.mode == "dry-run" and "--dry-run" or nil
  if rule.lock then args[#args + 1] = "--lock=" .. rule.lock end
  return args
end

--- Children still running, those that ended reaped.
function Server:running()
  for _, pid in ipairs(require("runbook.httpd").reap()) do
    if self.children[pid] then self.children[pid], self.nchildren = nil, self.nchildren - 1 end
  end
  return self.nchildren
end

--- Start the child for `rule` and `alert` in the background, its output to a log. Returns what was done.
function Server:start(rule, alert)
  local argv, why = self:command(rule, alert)
  if not argv then return { rule = rule.name, error = why } end
  if self:running() >= self.max_runs then
    self.metrics.refused = self.metrics.refused + 1
    return { rule = rule.name, error = ("%d runs already running (--max-runs)"):format(self.max_runs) }
  end
  -- One log per child, unique across replicas sharing the state directory: time, serve's pid, a count.
  self.spawned = self.spawned + 1
  local log = ("%s/%s-%d-%d-%s.log"):format(self.log_dir, os.date("!%Y%m%dT%H%M%SZ"), self.pid, self.spawned,
    (rule.name:gsub("[^%w%-_]", "_")))
  local ok, pid = pcall(require("runbook.httpd").spawn, argv, log, { "RUNBOOK_USER=" .. self.user })
  if not ok then return { rule = rule.name, error = type(pid) == "table" and pid.message or tostring(pid) } end
  self.children[pid], self.nchildren = true, self.nchildren + 1
  local key = rule.runbook .. "\0" .. rule.mode
  self.metrics.started[key] = (self.metrics.started[key] or 0) + 1
  return { rule = rule.name, runbook = rule.runbook, mode = rule.mode, log = log }
end

--- POST /v1/alertmanager: each firing alert, each rule it matches, once per throttle period per label set;
-- a resolved one cancels the plans made for it and may fire again.
function Server:alertmanager(body)
  local ok, doc = pcall(cjson.decode, body)
  if not ok then return 400, { error = "malformed JSON: " .. tostring(doc) } end
  if type(doc) ~= "table" or doc.version ~= "4" or type(doc.alerts) ~= "table" then
    return 400, { error = "expected an Alertmanager webhook payload (version \"4\" with alerts)" }
  end
  local done, now = {}, host.now()
  for _, alert in ipairs(doc.alerts) do
    self.metrics.received = self.metrics.received + 1
    if type(alert) == "table" and alert.status == "resolved" then
      for _, rule in ipairs(self.rules) do
        if matches(rule, alert) then
          local key = alert_key(rule, alert)
          self.seen[key] = nil
          if rule.mode == "plan" then
            require("runbook.plan").resolve_alert(key)
            done[#done + 1] = { rule = rule.name, cancelled = true }
          end
        end
      end
    elseif type(alert) == "table" and alert.status == "firing" then
      for _, rule in ipairs(self.rules) do
        if matches(rule, alert) then
          local key = alert_key(rule, alert)
          if self.seen[key] and now - self.seen[key] < rule.throttle then
            self.metrics.deduplicated = self.metrics.deduplicated + 1
          else
            self.seen[key] = now
            done[#done + 1] = self:start(rule, alert)
          end
        end
      end
    end
  end
  return 200, { accepted = #doc.alerts, started = done }
end

function Server:metrics_text()
  local m = self.metrics
  local out = {
    "# HELP runbook_alerts_received_total Alerts received from Alertmanager.",
    "# TYPE runbook_alerts_received_total counter", "runbook_alerts_received_total " .. m.received,
    "# HELP runbook_alerts_deduplicated_total Alerts not acted on again within their rule's throttle period.",
    "# TYPE runbook_alerts_deduplicated_total counter", "runbook_alerts_deduplicated_total " .. m.deduplicated,
    "# HELP runbook_serve_refused_total Alerts not acted on because --max-runs runs were running.",
    "# TYPE runbook_serve_refused_total counter", "runbook_serve_refused_total " .. m.refused,
    "# HELP runbook_serve_started_total Plans and runs started, by runbook and mode.",
    "# TYPE runbook_serve_started_total counter",
  }
  local keys = {}
  for k in pairs(m.started) do keys[#keys + 1] = k end
  table.sort(keys)
  for _, k in ipairs(keys) do
    local rb, mode = k:match("^(.-)%z(.*)$")
    out[#out + 1] = ('runbook_serve_started_total{runbook="%s",mode="%s"} %d'):format(rb, mode, m.started[k])
  end
  return table.concat(out, "\n") .. "\n"
end

--- Every request: /healthz and /metrics open, the rest behind the bearer token.
function Server:handle(req)
  if req.method == "GET" and req.path == "/healthz" then return 200, "ok\n" end
  if req.method == "GET" and req.path == "/metrics" then
    return 200, self:metrics_text(), "text/plain; version=0.0.4"
  end
  local status, doc
  local given = (req.authorization or ""):match("^Bearer%s+(.+)$") or ""
  if not require("runbook.httpd").equal(given, self.token) then
    status, doc = 401, { error = "missing or wrong bearer token" }
  elseif req.path == "/v1/alertmanager" and req.method == "POST" then
    status, doc = self:alertmanager(req.body)
  else
    status, doc = 404, { error = ("no endpoint %s %s"):format(req.method, req.path) }
  end
  return status, host.redact(cjson.encode(doc)) .. "\n", "application/json"
end

--- `runbook serve`: o = {rules, listen, token_file, max_body, max_runs}; resolve(name) -> path or nil, why.
function M.serve(o, resolve)
  local rules, why = M.load_rules(o.rules, resolve)
  if not rules then say("%s", why); return EXIT.usage end
  local token = os.getenv("RUNBOOK_SERVE_TOKEN")
  if o.token_file then
    local f, ferr = io.open(o.token_file, "rb")
    if not f then say("--token-file: %s", ferr); return EXIT.usage end
    token = f:read("l")
    f:close()
  end
  if not token or #token < 16 then
    say("a bearer token of at least 16 characters is needed: --token-file FILE or RUNBOOK_SERVE_TOKEN")
    return EXIT.usage
  end
  host.secret(token)
  local addr, port = (o.listen or "127.0.0.1:9095"):match("^([%d%.]+):(%d+)$")
  if not addr then say("--listen: expected IPV4:PORT, got %s", o.listen); return EXIT.usage end
  local journal = require "runbook.journal"
  local self = setmetatable({ rules = rules, token = token, children = {}, nchildren = 0, seen = {}, spawned = 0,
    pid = host.identity().pid,
    max_runs = o.max_runs or 4,
    bin = require("lfs").symlinkattributes("/proc/self/exe").target,
    user = os.getenv("RUNBOOK_USER") or "runbook-serve",
    log_dir = journal.mkdirs(journal.state_dir() .. "/serve"),
    metrics = { received = 0, deduplicated = 0, refused = 0, started = {} } }, Server)
  local ok, server = pcall(require("runbook.httpd").listen, { host = addr, port = tonumber(port),
    max_body = o.max_body or 1048576, timeout = 10, handler = function(req) return self:handle(req) end })
  if not ok then say("%s", type(server) == "table" and server.message or tostring(server)); return EXIT.usage end
  io.stdout:write(("runbook serve: listening on http://%s:%d (%d rules)\n"):format(addr, server:port(), #rules))
  io.stdout:flush()
  host.install_signal_handlers()
  while not host.interrupted() do
    server:poll(0.5)
    self:running()   -- reap the children that ended
  end
  server:close()
  return EXIT.ok
end

return M
