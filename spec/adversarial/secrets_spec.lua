-- Secrets never print (issue 20, class 5). A canary secret is planted in each
-- place the program reads credentials from (PLACES), a runbook obtains it and
-- emits it every way a runbook can (print, log, io.write, io.stderr, step
-- outputs, an error, a webhook and a mail, raw, base64 and percent-encoded),
-- and every output channel (CHANNELS) is grepped for the canary in its raw,
-- JSON-escaped, percent-encoded and base64 forms (the latter at each of the
-- three alignments inside a longer base64 text). The forms are computed here
-- with cjson and coreutils' base64, not with runbook's modules.
--
-- A place is {canary = fn() -> the secret, read = Lua source of a function
-- body giving the secret inside a step, env =, args =, setup =, teardown =};
-- a channel is fn(run) -> the text it emitted. Adding one is a few lines.
local cli = require("spec.support.cli")
local sb = require("spec.sandbox.sandbox_helper")
local cjson = require("cjson")

local NS = "todo-chatbot"

local function hex(n)
  local f = assert(io.open("/dev/urandom", "rb"))
  local s = f:read(n):gsub(".", function(c) return ("%02x"):format(c:byte()) end)
  f:close()
  return s
end

-- A value with every character that an encoding changes: / " \ a newline, non-ASCII.
local function nasty(tag) return ("%s-%s/q\"b\\s\nü-end"):format(tag, hex(6)) end

local function url_encode(s)
  return (s:gsub("[^%w%-%._~]", function(c) return ("%%%02X"):format(c:byte()) end))
end

local function base64(s)
  local path = os.tmpname()
  local f = assert(io.open(path, "wb"))
  f:write(s)
  f:close()
  local p = io.popen("base64 -w0 " .. cli.quote(path))
  local out = p:read("a")
  p:close()
  os.remove(path)
  return out
end

-- The forms to grep for: each with a name for the failure message.
local function forms(v)
  local json = cjson.encode(v):sub(2, -2)
  local out = { raw = v, json = json, ["json (/ plain)"] = json:gsub("\\/", "/"), url = url_encode(v),
    ["url (lower hex)"] = url_encode(v):gsub("%%%x%x", string.lower), base64 = base64(v):gsub("=+$", "") }
  for k = 1, 2 do   -- the value k bytes into a longer base64 text: skip the characters mixing in the prefix
    local b = base64(("\0"):rep(k) .. v)
    out["base64 at +" .. k] = b:sub(k == 1 and 3 or 4, math.floor((k + #v) * 8 / 6))
  end
  return out
end

local function leaked(text, v)
  text = text:gsub("\r\n", "\n")   -- a terminal's newlines
  for name, form in pairs(forms(v)) do
    if #form >= 8 and text:find(form, 1, true) then return name end
  end
end

-- ---- the receivers ------------------------------------------------------------

local hook, smtp, mailbox, smtp_pid

local function mails()
  local out = {}
  for line in cli.slurp(mailbox):gmatch("[^\n]+") do out[#out + 1] = cjson.decode(line).data end
  return table.concat(out, "\n")
end

-- ---- places -------------------------------------------------------------------

local function k8s_secret(name, field, value)
  local body = { apiVersion = "v1", kind = "Secret", metadata = { name = name, namespace = NS },
    [field] = { v = field == "data" and base64(value) or value } }
  local status, doc = sb.k8s("POST", "/api/v1/namespaces/" .. NS .. "/secrets", body)
  assert(status == 201 or status == 200, "creating the canary Secret: " .. tostring(status) .. " " .. cjson.encode(doc))
end

local function delete_secret(name) sb.k8s("DELETE", "/api/v1/namespaces/" .. NS .. "/secrets/" .. name) end

-- A copy of the sandbox kubeconfig with a second context whose user holds `user`.
local function kubeconfig(user)
  local f = assert(io.open(sb.env("KUBECONFIG")))
  local kc = require("lyaml").load(f:read("a"))
  f:close()
  local ctx = kc.contexts[1].context
  kc.users[#kc.users + 1] = { name = "canary", user = user }
  kc.contexts[#kc.contexts + 1] = { name = "canary", context = { cluster = ctx.cluster, user = "canary", namespace = NS } }
  local path = cli.tmpdir() .. "/kubeconfig"
  f = assert(io.open(path, "w"))
  f:write(cjson.encode(kc))   -- JSON is YAML
  f:close()
  return path
end

-- Reads the canary user's field back from the kubeconfig, after k8s read the file.
local READ_KUBECONFIG = [[
  k8s.get("namespace/todo-chatbot")
  for _, u in ipairs(yaml.load(fs.read(os.getenv("KUBECONFIG"))).users) do
    if u.name == "canary" then return u.user.%s end
  end]]

local URL_PASSWORD = [[
  local u = os.getenv("%s")
  print(u)
  return (u:match("//[^:]*:([^@]*)@"):gsub("%%%%(%%x%%x)", function(h) return string.char(tonumber(h, 16)) end))]]

local PLACES = {
  { name = "a secret param", canary = function(p) p.v = nasty("param"); return p.v end,
    args = function(p) return { "-p", "token=" .. p.v } end, read = "return ctx.params.token" },
  { name = "a k8s Secret's data (k8s.get)",
    canary = function(p) p.v, p.secret = nasty("data"), "canary-data-" .. hex(4); k8s_secret(p.secret, "data", p.v); return p.v end,
    teardown = function(p) delete_secret(p.secret) end,
    read = function(p) return ('return base64.decode(k8s.get("secret/%s", { namespace = %q }).data.v)'):format(p.secret, NS) end },
  { name = "a k8s Secret's stringData (k8s.list)",
    canary = function(p) p.v, p.secret = nasty("sdata"), "canary-sdata-" .. hex(4); k8s_secret(p.secret, "stringData", p.v); return p.v end,
    teardown = function(p) delete_secret(p.secret) end,
    read = function(p) return ([[
      for _, s in ipairs(k8s.list("secrets", { namespace = %q })) do
        if s.metadata.name == %q then return base64.decode(s.data.v) end
      end]]):format(NS, p.secret) end },
  { name = "a k8s Secret's data (k8s.watch)",
    canary = function(p) p.v, p.secret = nasty("wdata"), "canary-wdata-" .. hex(4); k8s_secret(p.secret, "data", p.v); return p.v end,
    teardown = function(p) delete_secret(p.secret) end,
    read = function(p) return ([[
      local v
      k8s.watch("secrets", { namespace = %q, timeout = 10 }, function(_, s)
        if s.metadata.name == %q then v = base64.decode(s.data.v); return true end
      end)
      return v]]):format(NS, p.secret) end },
  { name = "another kubeconfig context's token",
    canary = function(p) p.v = "tok-" .. hex(16); p.kc = kubeconfig { token = p.v }; return p.v end,
    env = function(p) return { KUBECONFIG = p.kc } end, read = READ_KUBECONFIG:format("token") },
  { name = "another kubeconfig context's password",
    canary = function(p) p.v = nasty("kpw"); p.kc = kubeconfig { username = "ops", password = p.v }; return p.v end,
    env = function(p) return { KUBECONFIG = p.kc } end, read = READ_KUBECONFIG:format("password") },
  { name = "the DATABASE_URL password",
    canary = function(p) p.v = nasty("pg"); return p.v end,
    env = function(p) return { DATABASE_URL = "postgresql://todo:" .. url_encode(p.v) .. "@127.0.0.1:9/todo" } end,
    read = URL_PASSWORD:format("DATABASE_URL") },
  { name = "the REDIS_URL password",
    canary = function(p) p.v = nasty("redis"); return p.v end,
    env = function(p) return { REDIS_URL = "redis://default:" .. url_encode(p.v) .. "@127.0.0.1:9/0" } end,
    read = URL_PASSWORD:format("REDIS_URL") },
  { name = "the PROMETHEUS_URL password",
    canary = function(p) p.v = nasty("prom"); return p.v end,
    env = function(p) return { PROMETHEUS_URL = "http://ops:" .. url_encode(p.v) .. "@127.0.0.1:9" } end,
    read = URL_PASSWORD:format("PROMETHEUS_URL") },
  { name = "a webhook URL given to notify.webhook",
    canary = function(p) p.v = "capture/wh-" .. hex(12); return p.v end,
    env = function(p) return { CANARY_WEBHOOK = hook.url:gsub("capture/hook$", "") .. p.v } end,
    read = [[
      require("notify").webhook { url = os.getenv("CANARY_WEBHOOK"), json = { text = "hello" } }
      return os.getenv("CANARY_WEBHOOK")]] },
  { name = "a webhook URL in the notify hooks",
    canary = function(p) p.v = "capture/whc-" .. hex(12); return p.v end,
    env = function(p) return { CANARY_HOOK = hook.url:gsub("capture/hook$", "") .. p.v } end,
    read = [[return os.getenv("CANARY_HOOK")]] },
  { name = "a Dapr secret",
    canary = function(p)
      local f = assert(io.open(sb.state .. "/dapr/secrets.json"))
      p.v = cjson.decode(f:read("a"))["app-secrets"]["jwt-secret"]
      f:close()
      return p.v
    end,
    read = [[return dapr.secret("local-secret-store", "app-secrets")["jwt-secret"] ]] },
}

-- ---- the runbook --------------------------------------------------------------

local RUNBOOK = [=[
name = "canary"
description = "obtains a secret and emits it every way a runbook can"
param "token" { type = "string", secret = true, default = "unused" }
notify = { on_failure = {
  webhook = { url = os.getenv("CANARY_HOOK") or os.getenv("CANARY_NOTIFY") .. "/hook" },
  email = { smtp_url = os.getenv("CANARY_SMTP"), from = "runbook@example.com", to = "ops@example.com" },
} }

local function url(v) return (v:gsub("[^%%w%%-%%._~]", function(c) return ("%%%%%%02X"):format(c:byte()) end)) end
local function secret_value(ctx)
%s
end

step "read and print" { run = function(ctx)
  local v = secret_value(ctx)
  print(v)
  io.write(v, "\n")
  io.stdout:write(v, "\n")
  io.stderr:write(v, "\n")
  log.warn("as base64 %%s, percent-encoded %%s", base64.encode(v), url(v))
  -- librdkafka names its client.id in its own log lines, written from its threads
  kafka.connect { brokers = "127.0.0.1:1", ["client.id"] = v, debug = "broker" }
  require("notify").webhook { url = os.getenv("CANARY_NOTIFY") .. "/body", json = { text = v, b64 = base64.encode(v) } }
  require("notify").email { smtp_url = os.getenv("CANARY_SMTP"), from = "runbook@example.com", to = "ops@example.com",
    subject = "canary", body = v .. "\n" .. base64.encode(v) }
  return { value = v, b64 = base64.encode(v), url = url(v) }
end }

step "fail with it" { run = function(ctx)
  local v = secret_value(ctx)
  error("cannot go on with " .. v .. " (" .. base64.encode(v) .. ")")
end }
]=]

-- Runs the place's runbook on every channel once; returns what each emitted.
local function run_place(p)
  local v = p.canary(p)
  local state = cli.tmpdir()
  local tag = "/capture/" .. hex(6)
  local notify = hook.url:gsub("/capture/hook$", "") .. tag
  local env = { RUNBOOK_STATE_DIR = state, CANARY_NOTIFY = notify, CANARY_SMTP = smtp }
  for k, x in pairs(p.env and p.env(p) or {}) do env[k] = x end
  local read = type(p.read) == "function" and p.read(p) or p.read
  local file = cli.runbook(RUNBOOK:format(read))
  local function args(extra)
    local a = { "run", file }
    for _, x in ipairs(p.args and p.args(p) or {}) do a[#a + 1] = x end
    for _, x in ipairs(extra or {}) do a[#a + 1] = x end
    return a
  end
  local run = { v = v }
  run.plain = cli.run(args(), env)
  run.json = cli.run(args { "--output", "json" }, env)
  run.dry = cli.run(args { "--dry-run" }, env)
  local _, pty = cli.pty("p,y,p,y", args { "--step" }, env)   -- each step previewed, then run
  run.pty = pty
  run.events = {}   -- the JSON lines among what io.write put on stdout
  for line in run.json.stdout:gmatch("[^\n]+") do
    local ok, e = pcall(cjson.decode, line)
    if ok and type(e) == "table" then run.events[#run.events + 1] = e end
  end
  local id = (cli.only(run.events, "run_start")[1] or {}).run_id or "none"
  -- history and report run without the place's environment, as a later reader would
  local later = { RUNBOOK_STATE_DIR = state }
  run.history = cli.run({ "history" }, later)
  run.history_json = cli.run({ "history", "--output", "json" }, later)
  run.report = cli.run({ "report", id }, later)
  run.report_json = cli.run({ "report", id, "--format", "json" }, later)
  run.journal = cli.slurp(state .. "/runs/" .. id .. ".jsonl")
  local posted = {}
  for _, r in ipairs(hook.posts()) do
    if r.path:find(tag, 1, true) or r.path:find(p.v, 1, true) then posted[#posted + 1] = r.body end
  end
  run.posts = table.concat(posted, "\n")
  if p.teardown then p.teardown(p) end
  return run
end

local function both(r) return r.stdout .. "\n" .. r.stderr end

local CHANNELS = {
  { "a terminal (pty, --step with previews)", function(r) return r.pty end },
  { "--dry-run", function(r) return both(r.dry) end },
  { "plain stdout", function(r) return r.plain.stdout end },
  { "plain stderr", function(r) return r.plain.stderr end },
  { "--output json", function(r) return both(r.json) end },
  { "the journal", function(r) return r.journal end },
  { "history", function(r) return both(r.history) .. both(r.history_json) end },
  { "report", function(r) return both(r.report) end },
  { "report --format json", function(r) return both(r.report_json) end },
  { "error messages", function(r)
      local out = {}
      for _, e in ipairs(r.events) do
        if type(e.error) == "table" then out[#out + 1] = tostring(e.error.message) end
      end
      return table.concat(out, "\n") .. (r.plain.stdout:match("[^\n]*FAILED[^\n]*") or "")
    end },
  { "webhook bodies", function(r) return r.posts end },
  { "mail", function(r) return r.mail end },
}

describe("secrets never print (adversarial)", function()
  local runs = {}
  setup(function()
    hook = cli.webhook()
    mailbox = cli.tmpdir() .. "/mailbox.jsonl"
    local port
    port, smtp_pid = cli.fixture("smtp_server.py", mailbox)
    smtp = "smtp://127.0.0.1:" .. port
  end)
  teardown(function()
    hook.stop()
    os.execute("kill " .. smtp_pid)
    cli.cleanup()
  end)

  for _, p in ipairs(PLACES) do
    for _, ch in ipairs(CHANNELS) do
      it(("%s: %s"):format(p.name, ch[1]), function()
        if not runs[p] then
          local before = #cli.slurp(mailbox)
          runs[p] = run_place(p)
          runs[p].mail = cli.slurp(mailbox):sub(before + 1)
        end
        local r = runs[p]
        -- the runbook did emit the secret: a clean channel must not come from a broken run
        local ends = cli.only(r.events, "step_end")
        assert(#ends == 2 and ends[1].status == "ok" and ends[2].status == "failed", "the canary runbook did not run: "
          .. both(r.json))
        assert(r.posts ~= "" and r.mail ~= "", "no notification reached the receivers")
        assert(r.pty:find("preview of read and print", 1, true), "the terminal run did not preview:\n" .. r.pty)
        local text = ch[2](r)
        local form = leaked(text, r.v)
        assert(not form, ("the %s form of the canary from %s shows in %s:\n%s"):format(
          tostring(form), p.name, ch[1], text))
      end)
    end
  end

  it("the state directory, runs/ and locks/ are 0700 and lock files 0600", function()
    local state = cli.tmpdir() .. "/state"
    local file = cli.runbook('name = "modes"\ndescription = "x"\nstep "s" { run = function() end }\n')
    local r = cli.run({ "run", file }, { RUNBOOK_STATE_DIR = state })
    assert.are.equal(0, r.code, r.stderr)
    local p = io.popen(("stat -c '%%a %%n' %s %s/runs %s/locks %s/locks/*"):format(state, state, state, state))
    local modes = p:read("a")
    p:close()
    for mode, path in modes:gmatch("(%d+) ([^\n]+)") do
      assert.are.equal(path:match("%.lock$") and "600" or "700", mode, path)
    end
    assert.truthy(modes:find("locks/", 1, true), modes)
  end)
end)
