--- `runbook serve`: Alertmanager's webhook (payload version 4) turned into
-- plans or runs by a rules file (docs/design.md, "runbook serve"). The HTTP
-- server is libmicrohttpd (modules/httpd.c); each plan or run is a child
-- `runbook plan|run` process of its own, so serve itself never loads a
-- runbook and a runbook never sees serve's token.
local host = require("runbook.host")
local cjson = require("cjson")
local EXIT = require("runbook.exit")
local run_metrics = require("runbook.metrics")
local label, sorted_keys = run_metrics.label, run_metrics.sorted_keys
local journal = require("runbook.journal")

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

--- The rules of `path`, and the set of runbooks POST /v1/runs may start:
-- those of the rules in run mode and of the top-level `runs:` list. Returns
-- them, or nil and "PATH:LINE: message".
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
  local rules, lines, allowed = {}, rule_lines(text), {}
  for i, r in ipairs(doc.rules) do
    local cok, rule = pcall(compile, r, i, text, lines[i] or 1, resolve)
    if not cok then return nil, ("%s:%s"):format(path, rule) end
    rules[i] = rule
    if rule.mode == "run" then allowed[rule.runbook] = true end
  end
  if doc.runs ~= nil and type(doc.runs) ~= "table" then
    return nil, ("%s:%d: runs: expected a list of runbooks"):format(path, line_of(text, "runs"))
  end
  for _, name in ipairs(doc.runs or {}) do
    local found, why = resolve(tostring(name))
    if not found then return nil, ("%s:%d: runs: %s"):format(path, line_of(text, "runs"), why) end
    allowed[tostring(name)] = true
  end
  return rules, allowed
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

--- A new run id, as runbook.run makes them; the child runs under it, so serve can answer with it.
local function new_run_id()
  local f = assert(io.open("/dev/urandom", "rb"))
  local bytes = f:read(4)
  f:close()
  return os.date("!%Y%m%dT%H%M%SZ") .. "-" .. (bytes:gsub(".", function(c) return ("%02x"):format(c:byte()) end))
end

--- The argv of the child that plans or runs `rule` for `alert`, and the
-- params it renders from the alert's labels; or nil and why.
function Server:command(rule, alert)
  local args, params = { self.bin, rule.mode == "plan" and "plan" or "run", rule.runbook }, {}
  for _, p in ipairs(rule.params) do
    local v, why = render(p.template, alert)
    if not v then return nil, why end
    params[p.name] = v
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
  return args, params
end

--- Account for a child that ended with exit status `code`: a run's status,
-- duration and last success go to the metrics.
function Server:ended(child, code)
  self.exits[child.run_id] = code
  self.nexits = self.nexits + 1
  if self.nexits > 10000 then self.exits, self.nexits = {}, 0 end   -- only recent runs are followed
  if child.mode ~= "run" then return end
  run_metrics.account(self.metrics, child.runbook, code, host.now() - child.started)
end

--- Children still running, those that ended reaped and accounted for.
function Server:running()
  for pid, code in pairs(require("runbook.httpd").reap()) do
    local child = self.children[pid]
    if child then
      self.children[pid], self.nchildren = nil, self.nchildren - 1
      self.by_run[child.run_id] = nil
      self:ended(child, code)
    end
  end
  return self.nchildren
end

--- Start `argv` (a runbook command without its run id) as a child of
-- `runbook` in `mode`, on behalf of `user`, its output to a log of `name`;
-- `params` (an API caller's or an alert's, which may hold secrets) reach it as JSON on its
-- standard input (--params-file /dev/stdin), never in argv, where any local
-- user sees them, nor in a file. `resumes`, a run id, is the run the child
-- resumes, under its own id; any other child gets a new one. Returns what was
-- started, or nil and why.
function Server:spawn(argv, name, runbook, mode, user, params, resumes)
  if self:running() >= self.max_runs then
    self.metrics.refused = self.metrics.refused + 1
    return nil, ("%d runs already running (--max-runs)"):format(self.max_runs)
  end
  -- One log per child, unique across replicas sharing the state directory: time, serve's pid, a count.
  self.spawned = self.spawned + 1
  local log = ("%s/%s-%d-%d-%s.log"):format(self.log_dir, os.date("!%Y%m%dT%H%M%SZ"), self.pid, self.spawned,
    (name:gsub("[^%w%-_]", "_")))
  local run_id = resumes or new_run_id()
  if not resumes then
    argv[#argv + 1], argv[#argv + 2] = "--run-id", run_id   -- two words: a plain run skips argparse (cli.lua)
  end
  local input = params and next(params) and cjson.encode(params)
  if input then argv[#argv + 1], argv[#argv + 2] = "--params-file", "/dev/stdin" end
  local env = { "RUNBOOK_USER=" .. user }
  local ok, pid = pcall(host.zygote_spawn, argv, log, env, input or nil)
  if ok and not pid then ok, pid = pcall(require("runbook.httpd").spawn, argv, log, env, input or nil) end
  if not ok then return nil, type(pid) == "table" and pid.message or tostring(pid) end
  self.children[pid], self.nchildren = { run_id = run_id, runbook = runbook, mode = mode, started = host.now() },
    self.nchildren + 1
  self.by_run[run_id] = pid
  local key = runbook .. "\0" .. mode
  self.metrics.started[key] = (self.metrics.started[key] or 0) + 1
  return { runbook = runbook, mode = mode, run_id = run_id, log = log }
end

--- Note who or what started run `run_id` ({alert, labels, rule} or {by[, plan]}),
-- for the console: in memory, and a line of state/serve/origins.jsonl that
-- the next serve reads back (load_origins).
function Server:note_origin(run_id, origin)
  self.origins[run_id] = origin
  -- Appended as approvals are (serve stays in dry-run mode, where io.open may not write).
  local f = host.journal_open(self.log_dir .. "/origins.jsonl")
  if f then
    pcall(f.write, f, cjson.encode { run_id = run_id, origin = origin } .. "\n")
    f:close()
  end
end

local function load_origins(dir)
  local origins, f = {}, io.open(dir .. "/origins.jsonl", "rb")
  for line in f and f:lines() or function() end do
    local ok, rec = pcall(cjson.decode, line)
    if ok and type(rec) == "table" and type(rec.run_id) == "string" then origins[rec.run_id] = rec.origin end
  end
  if f then f:close() end
  return origins
end

--- Start the child for `rule` and `alert` in the background. Returns what was done.
function Server:start(rule, alert)
  local argv, params = self:command(rule, alert)
  local started, why
  if argv then started, why = self:spawn(argv, rule.name, rule.runbook, rule.mode, self.user, params)
  else why = params end
  if not started then return { rule = rule.name, error = why } end
  self:note_origin(started.run_id, { rule = rule.name, alert = rule.alertname,
    labels = type(alert.labels) == "table" and alert.labels or nil })
  started.rule = rule.name
  if rule.mode == "plan" then started.plan = started.run_id end
  return started
end

local function decode(body)
  local ok, doc = pcall(cjson.decode, body)
  if not ok then return nil, "malformed JSON: " .. tostring(doc) end
  if type(doc) ~= "table" then return nil, "expected a JSON object" end
  return doc
end

--- POST /v1/alertmanager: each firing alert, each rule it matches, once per
-- throttle period per label set. While it fires, Alertmanager's repeats are
-- deduplicated; a resolved one cancels the plans made for it, and firing
-- again within the period is throttled.
function Server:alertmanager(body)
  local doc, why = decode(body)
  if not doc then return 400, { error = why } end
  if doc.version ~= "4" or type(doc.alerts) ~= "table" then
    return 400, { error = "expected an Alertmanager webhook payload (version \"4\" with alerts)" }
  end
  local m, done, now = self.metrics, {}, host.now()
  for _, alert in ipairs(doc.alerts) do
    m.received = m.received + 1
    local status = type(alert) == "table" and alert.status
    for _, rule in ipairs((status == "firing" or status == "resolved") and self.rules or {}) do
      if matches(rule, alert) then
        local key = alert_key(rule, alert)
        local seen = self.seen[key]
        if status == "resolved" then
          if seen then seen.firing = false end
          if rule.mode == "plan" then
            require("runbook.plan").resolve_alert(key)
            done[#done + 1] = { rule = rule.name, cancelled = true }
          end
        elseif seen and now - seen.at < rule.throttle then
          if seen.firing then m.deduplicated = m.deduplicated + 1 else m.throttled = m.throttled + 1 end
          seen.firing = true
        else
          self.seen[key] = { at = now, firing = true }
          done[#done + 1] = self:start(rule, alert)
        end
      end
    end
  end
  return 200, { accepted = #doc.alerts, started = done }
end

--- POST /v1/runs {runbook, params = {k = v}, dry_run, by}: start an
-- allow-listed runbook (a rule's in run mode, or the rules file's `runs:`).
function Server:start_run(body)
  local doc, why = decode(body)
  if not doc then return 400, { error = why } end
  if type(doc.runbook) ~= "string" then return 400, { error = "expected {\"runbook\": NAME, \"params\": {...}}" } end
  if not self.allowed[doc.runbook] then
    return 403, { error = ("runbook '%s' may not be started here: it is not in the rules file's runs: list, nor a "
      .. "rule's in run mode"):format(doc.runbook) }
  end
  local by = doc.by or self.user
  if type(by) ~= "string" or not by:match("^[%w._@%-]+$") then
    return 400, { error = "by: expected a user name (letters, digits, . _ @ -)" }
  end
  local argv = { self.bin, "run", doc.runbook, doc.dry_run == true and "--dry-run" or "--yes" }
  if doc.params ~= nil and type(doc.params) ~= "table" then return 400, { error = "params: expected an object" } end
  local params = {}
  for k, v in pairs(doc.params or {}) do
    k = tostring(k)
    if not k:match("^[%w_]+$") or not (type(v) == "string" or type(v) == "number" or type(v) == "boolean") then
      return 400, { error = ("params.%s: expected a param name with a string, number or boolean value"):format(k) }
    end
    params[k] = tostring(math.tointeger(v) or v)   -- as -p would give it
  end
  if #cjson.encode(params) > 60000 then return 413, { error = "params: over 60000 bytes of JSON" } end
  local mode = doc.dry_run == true and "dry-run" or "run"
  local started, err = self:spawn(argv, doc.runbook, doc.runbook, mode, by, params)
  if not started then return 429, { error = err } end
  self:note_origin(started.run_id, { by = by })
  started.events = "/v1/runs/" .. started.run_id .. "/events"
  return 202, started
end

--- A run's row (report.run_row). An ended run's is kept while its journal
-- keeps its size (a resume appends), so listing the newest runs again reads
-- no journal but a new one's: a stat each.
function Server:run_row(id)
  local size = require("lfs").attributes(journal.path(id), "size")
  local kept = self.rows[id]
  if kept and kept.size == size then return kept.row end
  local row = require("runbook.report").run_row(id)
  if row and size and row.status ~= "running" and row.status ~= "killed" then
    if self.nrows >= 10000 then self.rows, self.nrows = {}, 0 end
    self.rows[id], self.nrows = { size = size, row = row }, self.nrows + 1
  end
  return row
end

--- GET /v1/runs?limit=N&runbook=NAME&status=S: the newest runs, as `runbook
-- history --output json` lists them; `keep(run_id)`, when given, filters
-- before the journal is read (the console's alert filter). Looks at the
-- newest 10,000 runs at most.
function Server:list_runs(query, keep)
  local limit = math.tointeger(tonumber(query.limit or "50"))
  if not limit or limit < 1 or limit > 1000 then return 400, { error = "limit: expected 1..1000" } end
  local rows = {}
  for i, id in ipairs(journal.list()) do
    if #rows >= limit or i > 10000 then break end
    local row = (not keep or keep(id)) and (not query.runbook or journal.ran(id, query.runbook))
      and self:run_row(id)
    if row and (not query.status or row.status == query.status) then
      rows[#rows + 1] = row
    end
  end
  return 200, { runs = setmetatable(rows, cjson.array_mt) }
end

--- GET /v1/runs/ID: the run's journal events.
function Server:get_run(id)
  local events, why = journal.read(id)
  if events then
    return 200, { run = require("runbook.report").run_row(id, events), events = events }
  end
  if self.by_run[id] then return 200, { run = { run_id = id, status = "starting" }, events = cjson.empty_array } end
  return 404, { error = why }
end

--- GET /v1/runs/ID/events: Server-Sent Events, one `data:` per journal
-- event as it is written, until the run ends; then `event: end` with its
-- exit status. A comment every 5 s keeps the connection open meanwhile.
function Server:follow(id)
  local path, f, pos, partial, last, done = journal.path(id), nil, 0, "", host.now(), false
  return function()
    if done then return nil end
    local out = {}
    f = f or io.open(path, "rb")
    if f then
      f:seek("set", pos)
      local chunk = f:read("a") or ""
      pos = pos + #chunk
      local text = partial .. chunk
      partial = text:match("[^\n]*$")
      for line in text:gmatch("([^\n]*)\n") do
        out[#out + 1] = "data: " .. line .. "\n\n"
        local ok, e = pcall(cjson.decode, line)
        done = done or (ok and type(e) == "table" and e.event == "run_end")
      end
    end
    -- A run that ends without its run_end (killed, or refused before its journal) ends the stream too.
    local code = self.exits[id]
    if not done and not self.by_run[id] and not (f and journal.running(id)) then
      self:running()
      done = not self.by_run[id]
    end
    if done then
      f = f and f:close() and nil
      out[#out + 1] = "event: end\ndata: " .. cjson.encode { run_id = id, exit_code = code or self.exits[id] } .. "\n\n"
    elseif #out == 0 and host.now() - last > 5 then
      out[1] = ": waiting\n\n"
    end
    if #out > 0 then last = host.now() end
    return host.redact(table.concat(out))
  end
end

--- POST /v1/plans/ID/approve|deny {by, comment, expires}: as `runbook approve`, by `by`.
function Server:decide(id, verb, body)
  local doc, why = decode(body)
  if not doc then return 400, { error = why } end
  if type(doc.by) ~= "string" or doc.by == "" then return 400, { error = "by: who approves, as a string" } end
  if doc.comment ~= nil and type(doc.comment) ~= "string" then return 400, { error = "comment: expected a string" } end
  local ttl
  if doc.expires ~= nil then
    ttl, why = require("duration").parse(tostring(doc.expires))
    if not ttl then return 400, { error = "expires: " .. why } end
  end
  local plan = require("runbook.plan")
  if not require("lfs").attributes(plan.path(id)) then return 404, { error = "no plan " .. id } end
  local rec, err, code = plan.decide(id, doc.by, verb == "deny", doc.comment, ttl)
  if rec then return 200, rec end
  return code == EXIT.drift and 409 or 403, { error = err }
end

--- Plans in the state directory that wait for approval.
function Server:pending_plans()
  local plan, lfs, n = require("runbook.plan"), require("lfs"), 0
  local dir = plan.dir()
  if lfs.attributes(dir, "mode") ~= "directory" then return 0 end
  for f in lfs.dir(dir) do
    local p = f:match("^(.+)%.json$") and plan.read(dir .. "/" .. f)
    if p and plan.pending(p) then n = n + 1 end
  end
  return n
end

--- GET /metrics, in Prometheus's text exposition format.
function Server:metrics_text()
  local m, out = self.metrics, {}
  local function family(name, kind, help)
    out[#out + 1] = ("# HELP %s %s\n# TYPE %s %s"):format(name, help, name, kind)
  end
  local function sample(name, labels, v) out[#out + 1] = ("%s%s %s"):format(name, labels, v) end
  family("runbook_alerts_received_total", "counter", "Alerts received from Alertmanager.")
  sample("runbook_alerts_received_total", "", m.received)
  family("runbook_alerts_deduplicated_total", "counter", "Alerts not acted on again while they still fire.")
  sample("runbook_alerts_deduplicated_total", "", m.deduplicated)
  family("runbook_alerts_throttled_total", "counter", "Alerts firing again within their rule's throttle period.")
  sample("runbook_alerts_throttled_total", "", m.throttled)
  family("runbook_serve_refused_total", "counter", "Alerts and run requests refused: --max-runs runs were running.")
  sample("runbook_serve_refused_total", "", m.refused)
  family("runbook_serve_started_total", "counter", "Plans, runs and dry runs started, by runbook and mode.")
  for _, k in ipairs(sorted_keys(m.started)) do
    local rb, mode = k:match("^(.-)%z(.*)$")
    sample("runbook_serve_started_total", ('{runbook="%s",mode="%s"}'):format(label(rb), label(mode)), m.started[k])
  end
  run_metrics.write(m, family, sample)
  family("runbook_plans_pending_approval", "gauge", "Plans that wait for approval (not denied, not cancelled).")
  sample("runbook_plans_pending_approval", "", self:pending_plans())
  return table.concat(out, "\n") .. "\n"
end

--- The answer to an authorized request: status and document, or status and a stream.
function Server:route(req)
  local m, p = req.method, req.path
  if p == "/v1/alertmanager" and m == "POST" then return self:alertmanager(req.body) end
  if p == "/v1/runs" and m == "POST" then return self:start_run(req.body) end
  if p == "/v1/runs" and m == "GET" then return self:list_runs(req.query or {}) end
  local id, rest = p:match("^/v1/runs/([%w%-]+)(.*)$")
  if id and rest == "" and m == "GET" then return self:get_run(id) end
  if id and rest == "/events" and m == "GET" then
    if not self.by_run[id] and not require("lfs").attributes(journal.path(id)) then
      return 404, { error = "no run " .. id }
    end
    return 200, self:follow(id)
  end
  local plan, verb = p:match("^/v1/plans/([%w%-]+)/(%a+)$")
  if plan and (verb == "approve" or verb == "deny") and m == "POST" then return self:decide(plan, verb, req.body) end
  return 404, { error = ("no endpoint %s %s"):format(m, p) }
end

--- Every request: /healthz and /metrics open, /v1/ behind the bearer token,
-- the rest the console's (stdlib/runbook/console.lua), behind its login.
function Server:handle(req)
  if req.method == "GET" and req.path == "/healthz" then return 200, "ok\n" end
  if req.method == "GET" and req.path == "/metrics" then
    return 200, self:metrics_text(), "text/plain; version=0.0.4"
  end
  if not req.path:match("^/v1/") then return self.console:handle(req) end
  local status, doc
  local given = (req.authorization or ""):match("^Bearer%s+(.+)$") or ""
  if not require("runbook.httpd").equal(given, self.token) then
    status, doc = 401, { error = "missing or wrong bearer token" }
  else
    status, doc = self:route(req)
  end
  if type(doc) == "function" then return status, doc, "text/event-stream" end
  return status, host.redact(cjson.encode(doc)) .. "\n", "application/json"
end

local slurp = require("runbook.loader").read_file

--- `runbook serve`: o = {rules, listen, token_file, users, max_body, max_runs, timeout, tls_cert, tls_key};
-- resolve(name) -> path or nil, why.
function M.serve(o, resolve)
  local rules, allowed = M.load_rules(o.rules, resolve)
  if not rules then say("%s", allowed); return EXIT.usage end
  local token = os.getenv("RUNBOOK_SERVE_TOKEN")
  if o.token_file then
    local text, ferr = slurp(o.token_file)
    if not text then say("--token-file: %s", ferr); return EXIT.usage end
    token = text:match("^[^\n]*")
  end
  if not token or #token < 16 then
    say("a bearer token of at least 16 characters is needed: --token-file FILE or RUNBOOK_SERVE_TOKEN")
    return EXIT.usage
  end
  host.secret(token)
  local console, users = require("runbook.console"), nil
  if o.users then
    local text, uerr = slurp(o.users)
    if text then users, uerr = console.load_users(o.users, text) end
    if not users then say("--users: %s", uerr); return EXIT.usage end
  end
  local addr, port = (o.listen or "127.0.0.1:9095"):match("^([%d%.]+):(%d+)$")
  if not addr then say("--listen: expected IPV4:PORT, got %s", o.listen); return EXIT.usage end
  local tls = {}
  if (o.tls_cert == nil) ~= (o.tls_key == nil) then say("TLS needs both --tls-cert and --tls-key"); return EXIT.usage end
  for _, k in ipairs { "tls_cert", "tls_key" } do
    local why
    if o[k] then tls[k], why = slurp(o[k]) end
    if o[k] and not tls[k] then say("--%s: %s", k:gsub("_", "-"), why); return EXIT.usage end
  end
  local log_dir = journal.mkdirs(journal.state_dir() .. "/serve")
  local self = setmetatable({ rules = rules, allowed = allowed, token = token, children = {}, nchildren = 0,
    by_run = {}, exits = {}, nexits = 0, seen = {}, spawned = 0, rows = {}, nrows = 0,
    pid = host.identity().pid,
    max_runs = o.max_runs or 4,
    bin = require("lfs").symlinkattributes("/proc/self/exe").target,
    user = os.getenv("RUNBOOK_USER") or "runbook-serve",
    log_dir = log_dir, origins = load_origins(log_dir),
    metrics = { received = 0, deduplicated = 0, throttled = 0, refused = 0, started = {}, runs = {}, durations = {},
      last_success = {} } }, Server)
  self.console = console.new(self, { users = users, secure = tls.tls_cert ~= nil })
  local ok, server = pcall(require("runbook.httpd").listen, { host = addr, port = tonumber(port),
    max_body = o.max_body or 1048576, timeout = o.timeout or 10, tls_cert = tls.tls_cert, tls_key = tls.tls_key,
    handler = function(req) return self:handle(req) end })
  if not ok then say("%s", type(server) == "table" and server.message or tostring(server)); return EXIT.usage end
  -- Runs are forked from a pre-loaded child (host/zygote.c); without it, exec'd.
  local zok, zerr = pcall(host.zygote_start, { self.bin, "serve", "--zygote" })
  if not zok then say("%s; runs are exec'd", type(zerr) == "table" and zerr.message or tostring(zerr)) end
  io.stdout:write(("runbook serve: listening on %s://%s:%d (%d rules)\n"):format(tls.tls_cert and "https" or "http",
    addr, server:port(), #rules))
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
