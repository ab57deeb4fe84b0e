--- Plans, approvals and applies (docs/design.md, "Plans and approvals").
--
-- `runbook plan` runs the dry run and writes what it reported as a plan: the
-- runbook's hash, the params (secrets redacted; all of them bound by a
-- salted hash), the Kubernetes target, who asked and when, the ordered
-- effects, and a digest over all of it. `runbook approve` records a second
-- person's approval of that digest. `runbook apply` refuses a plan whose
-- runbook, params or target changed, or that lacks its approvals, then runs
-- for real with the plan handed to the gate (host/plan.c), which holds every
-- effect to it before it is performed.
local host = require("runbook.host")
local cjson = require("cjson")
local EXIT = require("runbook.exit")
local journal = require("runbook.journal")

local M = {}

M.FORMAT = "runbook-plan/1"
M.APPROVAL_TTL = 3600   -- seconds an approval holds unless `approve --expires` says otherwise

local function say(fmt, ...)
  io.stderr:write(host.redact("runbook: " .. fmt:format(...) .. "\n"))
end

--- JSON with object keys sorted and no whitespace, so the digest of a plan
-- is the same however its table was built or read back.
function M.canonical(v)
  if type(v) ~= "table" then return cjson.encode(v) end
  local parts = {}
  if #v > 0 or next(v) == nil then
    for i = 1, #v do parts[i] = M.canonical(v[i]) end
    return "[" .. table.concat(parts, ",") .. "]"
  end
  local keys = {}
  for k in pairs(v) do keys[#keys + 1] = tostring(k) end
  table.sort(keys)
  for i, k in ipairs(keys) do parts[i] = cjson.encode(k) .. ":" .. M.canonical(v[k]) end
  return "{" .. table.concat(parts, ",") .. "}"
end

--- The digest of a plan: over everything in it but the digest.
function M.digest(plan)
  local copy = {}
  for k, v in pairs(plan) do copy[k] = v end
  copy.digest = nil
  return "sha256:" .. host.sha256(M.canonical(copy))
end

--- Who is asking: RUNBOOK_USER (the person at a shared account), else the login name.
function M.identity()
  local u = os.getenv("RUNBOOK_USER")
  return u and u ~= "" and u or host.identity().user
end

local function iso(t) return os.date("!%Y-%m-%dT%H:%M:%SZ", math.floor(t)) end

local function parse_iso(s)
  local y, mo, d, h, mi, sec = tostring(s):match("^(%d+)-(%d+)-(%d+)T(%d+):(%d+):(%d+)Z$")
  if not y then return nil end
  local t = os.time { year = y, month = mo, day = d, hour = h, min = mi, sec = sec }
  return t + (t - os.time(os.date("!*t", t)))
end
M.parse_iso = parse_iso

local function hex(bytes) return (bytes:gsub(".", function(c) return ("%02x"):format(c:byte()) end)) end

local function random_hex(n)
  local f = assert(io.open("/dev/urandom", "rb"))
  local bytes = f:read(n)
  f:close()
  return hex(bytes)
end
M.random_hex = random_hex   -- serve's console: session ids and CSRF tokens

--- The params bound by hash: secrets included, salted so a plan file is no
-- lookup table for them.
local function params_hash(salt, values) return host.sha256(salt .. M.canonical(values)) end

--- The Kubernetes context, namespace and server a run would use, or nil
-- when there is no configuration (a runbook without Kubernetes).
local function k8s_target()
  local ok, cfg = pcall(require("k8s.config").resolve)
  if not ok then return nil end
  return { context = cfg.context, namespace = cfg.namespace, server = cfg.server }
end

local function plans_dir() return journal.state_dir() .. "/plans" end
M.dir = plans_dir

--- Where the plan `id` is kept.
function M.path(id) return plans_dir() .. "/" .. id .. ".json" end
local function resolved_path(alert) return journal.state_dir() .. "/resolved/" .. host.sha256(alert) .. ".json" end

--- Record that `alert` resolved: the plans made for it before now are cancelled.
function M.resolve_alert(alert)
  local ok, err = pcall(journal.mkdirs, journal.state_dir() .. "/resolved")
  if ok then ok, err = host.plan_write(resolved_path(alert), M.canonical { alert = alert, at = iso(os.time()) }) end
  return ok, err
end

--- When the alert `plan` answers resolved after the plan was made, nil otherwise.
local function resolved_since(plan)
  if type(plan.alert) ~= "string" then return nil end
  local f = io.open(resolved_path(plan.alert), "rb")
  if not f then return nil end
  local ok, rec = pcall(cjson.decode, f:read("a"))
  f:close()
  local at = ok and type(rec) == "table" and parse_iso(rec.at)
  if at and at >= (parse_iso(plan.created_at) or 0) then return rec.at end
end
local function approvals_path(id) return journal.state_dir() .. "/approvals/" .. id .. ".jsonl" end

--- A plan file's text: its canonical JSON, one line.
local function encode(plan) return M.canonical(plan) .. "\n" end

--- The would-be result of a dry-run effect, short: a string, or a record's summary.
local function would(result)
  if type(result) == "string" then return result end
  if type(result) == "table" and type(result.summary) == "string" then return result.summary end
end

--- `runbook plan`: the dry run of `rb` as `req` asks, written as a plan to
-- the state directory and to `out` when given; `alert` names the alert it
-- answers (serve's), whose resolution cancels it. Returns the exit status.
function M.make(rb, req, out, require_n, alert)
  local params = require("runbook.params")
  local pok, values = pcall(params.resolve, rb, req.given, req.params_file)
  if not pok then
    say("%s", getmetatable(values) == params.ParamError and values.message or tostring(values))
    return EXIT.usage
  end
  -- The gate's record is what apply checks; the dry run's effect events add
  -- the would-be outcome to the effect they report.
  local effects, run_id = {}, nil
  host.plan_record(function(e) effects[#effects + 1] = e end)
  req.mode = "dry-run"
  req.sink = function(e)
    if e.event == "run_start" then run_id = e.run_id end
    local last = effects[#effects]
    if e.event == "effect" and last and not last.outcome and last.module == e.module and last.op == e.op
      and last.target == e.target then
      last.outcome, last.result = e.summary ~= last.summary and e.summary or nil, would(e.result)
      last.outcome = last.outcome or ""
    end
  end
  local code = require("runbook.run").start(rb, req)
  host.plan_record(nil)
  for _, e in ipairs(effects) do e.outcome = e.outcome ~= "" and e.outcome or nil end
  if code ~= EXIT.ok then
    say("the dry run did not succeed (exit %d): no plan written", code)
    return code
  end
  local salt, who = random_hex(16), host.identity()
  local policy = rb.approval or {}
  local plan = {
    format = M.FORMAT, id = run_id,
    runbook = { name = rb.name, version = rb.version, path = require("runbook.run").absolute(rb.file),
      sha256 = host.sha256(rb.source) },
    params = params.redacted(rb, values), params_salt = salt, params_sha256 = params_hash(salt, values),
    target = k8s_target(), requested_by = { user = M.identity(), host = who.host }, created_at = iso(os.time()),
    effects = effects, alert = alert, lock = type(req.lock) == "string" and req.lock or nil,
    approval = { required = math.max(policy.required or 0, require_n or 0), by = policy.by },
  }
  plan.digest = M.digest(plan)
  local mok, merr = pcall(journal.mkdirs, plans_dir())
  local path = M.path(plan.id)
  local ok, werr = false, type(merr) == "table" and merr.message or merr
  if mok then ok, werr = host.plan_write(path, encode(plan)) end
  if ok and out then ok, werr = host.plan_write(out, encode(plan)) end
  if not ok then
    say("the plan was not written: %s", tostring(werr))
    return EXIT.usage
  end
  io.stdout:write(("\nplan %s: %d effect%s, %s\n  written to %s\n"):format(plan.id, #effects,
    #effects == 1 and "" or "s", plan.digest, out or path))
  if plan.approval.required > 0 then
    io.stdout:write(("  needs %d approval%s: runbook approve %s\n"):format(plan.approval.required,
      plan.approval.required == 1 and "" or "s", plan.id))
  end
  io.stdout:write(("  apply: runbook apply %s\n"):format(out or plan.id))
  return EXIT.ok
end

--- The plan at `ref` (a file, or a plan id in the state directory), its
-- digest verified. Returns the plan, or nil, why and the exit status.
function M.read(ref)
  local path = ref
  if not ref:find("/", 1, true) and not ref:match("%.json$") then path = M.path(ref) end
  local f, err = io.open(path, "rb")
  if not f then return nil, ("plan %s: %s"):format(ref, err), EXIT.usage end
  local text = f:read("a")
  f:close()
  local ok, plan = pcall(cjson.decode, text)
  if not ok or type(plan) ~= "table" or plan.format ~= M.FORMAT or type(plan.runbook) ~= "table"
    or type(plan.effects) ~= "table" or type(plan.id) ~= "string" then
    return nil, ("%s: not a runbook plan (%s)"):format(path, ok and "expected format " .. M.FORMAT or tostring(plan)),
      EXIT.usage
  end
  if M.digest(plan) ~= plan.digest then
    return nil, ("%s: the plan was changed after it was made (its digest does not match); make a new plan"):format(
      path), EXIT.drift
  end
  return plan
end

-- ---- show ------------------------------------------------------------------------

local function params_text(plan)
  local keys, out = {}, {}
  for k in pairs(plan.params or {}) do keys[#keys + 1] = k end
  table.sort(keys)
  for i, k in ipairs(keys) do out[i] = k .. "=" .. require("runbook.params").text(plan.params[k]) end
  return #out > 0 and table.concat(out, ", ") or "none"
end

local function facts(plan)
  local t, a = plan.target, plan.approval or {}
  local valid = M.valid_approvals(plan)
  local by = {}
  for i, v in ipairs(valid) do by[i] = v.by end
  return {
    { "runbook", ("%s (%s, sha256 %s)"):format(plan.runbook.name, plan.runbook.path, plan.runbook.sha256:sub(1, 12)) },
    { "requested", ("by %s on %s at %s"):format(plan.requested_by.user, plan.requested_by.host, plan.created_at) },
    { "Kubernetes", t and ("context %s, namespace %s (%s)"):format(t.context, t.namespace, t.server) or "none" },
    { "params", params_text(plan) },
    { "approvals", ("%d needed%s; %d valid%s"):format(a.required or 0,
      type(a.by) == "table" and #a.by > 0 and (" from " .. table.concat(a.by, ", ")) or "", #valid,
      #by > 0 and (" (" .. table.concat(by, ", ") .. ")") or "") },
    { "digest", plan.digest },
  }
end

local function would_text(e)
  local text = e.outcome or e.summary
  return e.result and (text .. " → " .. e.result) or text
end

--- `runbook show PLAN [--format markdown]`: the plan as the dry run showed
-- it, or as Markdown for a ticket. Returns the exit status.
function M.show(ref, format)
  local plan, why, code = M.read(ref)
  if not plan then say("%s", why); return code end
  local out = {}
  if format == "markdown" then
    out[#out + 1] = ("## Plan %s: %s\n\n| | |\n| --- | --- |"):format(plan.id, plan.runbook.name)
    for _, f in ipairs(facts(plan)) do out[#out + 1] = ("| %s | %s |"):format(f[1], f[2]:gsub("|", "\\|")) end
    out[#out + 1] = "\n| # | step | module | op | target | would |\n| --- | --- | --- | --- | --- | --- |"
    for i, e in ipairs(plan.effects) do
      local cells = { tostring(i), e.step or "", e.module, e.op, e.target, would_text(e) }
      for j, c in ipairs(cells) do cells[j] = tostring(c):gsub("|", "\\|") end
      out[#out + 1] = "| " .. table.concat(cells, " | ") .. " |"
    end
    if #plan.effects == 0 then out[#out + 1] = "\nNo effects: the run changes nothing." end
  else
    out[#out + 1] = ("plan %s"):format(plan.id)
    for _, f in ipairs(facts(plan)) do out[#out + 1] = ("  %-11s %s"):format(f[1], f[2]) end
    local step
    for _, e in ipairs(plan.effects) do
      if e.step ~= step then step = e.step; out[#out + 1] = ("[%s]"):format(step or "outside any step") end
      out[#out + 1] = "    would " .. would_text(e)
    end
    if #plan.effects == 0 then out[#out + 1] = "  no effects: the run changes nothing" end
  end
  io.stdout:write(host.redact(table.concat(out, "\n") .. "\n"))
  return EXIT.ok
end

-- ---- approvals -------------------------------------------------------------------

--- The approvals and denials recorded for `plan`'s digest, each a table, in order.
function M.verdicts(plan)
  local out = {}
  local f = io.open(approvals_path(plan.id), "rb")
  if not f then return out end
  for line in f:lines() do
    local ok, a = pcall(cjson.decode, line)
    if ok and type(a) == "table" and a.digest == plan.digest and type(a.by) == "string" then out[#out + 1] = a end
  end
  f:close()
  return out
end

--- Who the plan's policy lets decide on it (a set), or nil when anyone but the requester may.
local function approvers(plan)
  local by = plan.approval.by
  if type(by) ~= "table" or #by == 0 then return nil end
  local set = {}
  for _, name in ipairs(by) do set[name] = true end
  return set
end

--- The approvals recorded for `plan` that still count: its digest, not
-- expired, not by the requester, by someone the policy names, one per person.
function M.valid_approvals(plan)
  local out, seen, by, now = {}, {}, approvers(plan), os.time()
  for _, a in ipairs(M.verdicts(plan)) do
    if not a.denied and a.by ~= plan.requested_by.user and (not by or by[a.by]) and not seen[a.by]
      and (parse_iso(a.expires) or 0) > now then
      seen[a.by] = true
      out[#out + 1] = a
    end
  end
  return out
end

--- The first denial of `plan`'s digest by someone who may decide on it, or nil.
-- A denial does not expire: the plan is refused for good, a new plan is asked again.
function M.denial(plan)
  local by = approvers(plan)
  for _, a in ipairs(M.verdicts(plan)) do
    if a.denied and a.by ~= plan.requested_by.user and (not by or by[a.by]) then return a end
  end
end

--- Whether `plan` waits for approvals: it needs more than it has, and was
-- neither denied nor cancelled by its alert resolving.
function M.pending(plan)
  return (plan.approval.required or 0) > #M.valid_approvals(plan) and not M.denial(plan) and not resolved_since(plan)
end

--- `who` approves (or, `deny` true, denies) the plan at `ref`, bound to its
-- digest; `ttl` seconds an approval holds. `runbook approve` and serve's POST
-- /v1/plans/ID/approve|deny both record here. Returns the record, or nil,
-- why and the exit status.
function M.decide(ref, who, deny, comment, ttl)
  local plan, why, code = M.read(ref)
  if not plan then return nil, why, code end
  local verb = deny and "deny" or "approve"
  if who == plan.requested_by.user then
    return nil, ("%s: %s requested plan %s, so another person approves it (identity: RUNBOOK_USER, else the login "
      .. "name)"):format(verb, who, plan.id), EXIT.usage
  end
  if approvers(plan) and not approvers(plan)[who] then
    return nil, ("%s: %s may not %s plan %s (approvers: %s)"):format(verb, who, verb, plan.id,
      table.concat(plan.approval.by, ", ")), EXIT.usage
  end
  local now = os.time()
  local rec = { plan = plan.id, digest = plan.digest, by = who, host = host.identity().host, at = iso(now),
    expires = not deny and iso(now + (ttl or M.APPROVAL_TTL)) or nil, denied = deny or nil, comment = comment }
  -- Appended under the journal's lock, so approvers at the same time both count.
  local ok, f = pcall(journal.mkdirs, journal.state_dir() .. "/approvals")
  local err
  if ok then f, err = host.journal_open(approvals_path(plan.id)) else err = type(f) == "table" and f.message or f end
  if f then ok, err = pcall(f.write, f, M.canonical(rec) .. "\n") end
  if f then f:close() end
  if not (f and ok) then
    return nil, ("%s: the %s was not recorded: %s"):format(verb, deny and "denial" or "approval", tostring(err)),
      EXIT.usage
  end
  return rec
end

--- `runbook approve PLAN [--comment TEXT] [--expires DURATION]`.
function M.approve(ref, comment, ttl)
  local rec, why, code = M.decide(ref, M.identity(), false, comment, ttl)
  if not rec then say("%s", why); return code end
  print(("approved plan %s (%s) as %s, until %s"):format(rec.plan, rec.digest, rec.by, rec.expires))
  return EXIT.ok
end

-- ---- apply -----------------------------------------------------------------------

--- The params of the plan over the secrets given again with -p, checked
-- against the plan's hash. Returns the values, or nil, why and the exit status.
local function plan_params(rb, plan, given)
  local params = require("runbook.params")
  local ok, values = pcall(params.resolve, rb, given, nil, plan.params)
  if not ok then
    return nil, getmetatable(values) == params.ParamError and values.message or tostring(values), EXIT.usage
  end
  if params_hash(plan.params_salt or "", values) ~= plan.params_sha256 then
    local now, differ = params.redacted(rb, values), {}
    for _, p in ipairs(rb.params) do
      if M.canonical(now[p.name]) ~= M.canonical(plan.params[p.name]) or p.secret then
        differ[#differ + 1] = p.secret and (p.name .. " (secret)") or
          ("%s (planned %s, now %s)"):format(p.name, M.canonical(plan.params[p.name]), M.canonical(now[p.name]))
      end
    end
    return nil, "the params differ from the plan's: " .. table.concat(differ, ", "), EXIT.drift
  end
  return values
end

--- Refuse, before anything runs, a plan whose runbook, params, target or
-- approvals do not hold. Returns the values of the params, or nil, why and
-- the exit status.
local function check(rb, plan, given)
  local resolved = resolved_since(plan)
  if resolved then
    return nil, ("the alert plan %s answers (%s) resolved at %s, so the plan was cancelled; a new firing makes a "
      .. "new plan"):format(plan.id, plan.alert, resolved), EXIT.drift
  end
  local sha = host.sha256(rb.source)
  if sha ~= plan.runbook.sha256 then
    return nil, ("runbook %s changed since the plan was made (sha256 %s, now %s); make a new plan"):format(
      plan.runbook.path, plan.runbook.sha256:sub(1, 12), sha:sub(1, 12)), EXIT.drift
  end
  local values, why, code = plan_params(rb, plan, given)
  if not values then return nil, why, code end
  if plan.target then
    local defaults = require("k8s.config").defaults
    defaults.context = defaults.context or plan.target.context
    defaults.namespace = defaults.namespace or plan.target.namespace
    local now = k8s_target() or {}
    for _, k in ipairs { "context", "namespace", "server" } do
      if now[k] ~= plan.target[k] then
        return nil, ("the Kubernetes %s differs from the plan's (planned %s, now %s)"):format(k,
          tostring(plan.target[k]), tostring(now[k])), EXIT.drift
      end
    end
  end
  local denied = M.denial(plan)
  if denied then
    return nil, ("plan %s was denied by %s at %s%s; make a new plan"):format(plan.id, denied.by, denied.at,
      denied.comment and (" (" .. denied.comment .. ")") or ""), EXIT.unapproved
  end
  local required = math.max(plan.approval.required or 0, rb.approval and rb.approval.required or 0)
  local approvals = M.valid_approvals(plan)
  if #approvals < required then
    return nil, ("plan %s needs %d approval%s by someone other than %s, and has %d valid (approvals expire; "
      .. "a changed plan needs new ones): runbook approve %s"):format(plan.id, required, required == 1 and "" or "s",
      plan.requested_by.user, #approvals, plan.id), EXIT.unapproved
  end
  return values, approvals
end

--- `runbook apply PLAN`: `o` as the CLI parsed it, `load_runbook` the CLI's
-- loader. Returns the exit status.
function M.apply(ref, o, load_runbook)
  local plan, why, code = M.read(ref)
  if not plan then say("%s", why); return code end
  local rb
  rb, code = load_runbook(plan.runbook.path)
  if not rb then return code end
  local values, approvals
  values, approvals, code = check(rb, plan, o["-p"] or {})
  if not values then say("apply: %s", approvals); return code end
  local by_step = {}
  for _, e in ipairs(plan.effects) do
    local list = by_step[e.step or ""] or {}
    by_step[e.step or ""] = list
    list[#list + 1] = { module = e.module, op = e.op, target = e.target, summary = e.summary }
  end
  host.plan_load(by_step)
  local run = require("runbook.run")
  local req = run.request(o)
  req.given, req.mode, req.lock = {}, "run", plan.lock
  local signed = {}
  for i, a in ipairs(approvals) do signed[i] = { by = a.by, at = a.at, digest = a.digest, comment = a.comment } end
  req.plan = { id = plan.id, digest = plan.digest, requested_by = plan.requested_by.user, approvals = signed }
  return run.start(rb, req, { params = values })
end

return M
