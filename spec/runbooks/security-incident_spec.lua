-- runbooks/security-incident.lua against the sandbox: the backend taken as
-- compromised; kubectl checks the deny-all NetworkPolicy, sha256sum the
-- sealed evidence, and a dry run leaves no policy and no evidence behind.
local cli = require("spec.support.cli")
local json = require("json")
local sb = require("spec.sandbox.sandbox_helper")
local kh = require("spec.runbooks.k8s_helper")

local RUNBOOK = "runbooks/security-incident.lua"
local NS = "todo-chatbot"
local POLICY = "isolate-todo-chatbot-backend"

local function kubectl(args)
  local out, ok = sb.kubectl(args)
  assert(ok, "kubectl " .. args .. ": " .. out)
  return out
end

local function policy()
  local out, ok = sb.kubectl(("-n %s get networkpolicy %s -o json"):format(NS, POLICY))
  return ok and json.decode(out) or nil
end

describe("security-incident", function()
  teardown(kh.reset_world)
  local dir
  before_each(function() dir = cli.tmpdir() end)
  after_each(function()
    sb.kubectl(("-n %s delete networkpolicy %s --ignore-not-found"):format(NS, POLICY))
    cli.cleanup()
  end)

  it("changes nothing in a dry run: no policy, no evidence", function()
    local r = cli.run { "run", RUNBOOK, "--dry-run", "-p", "deployment=todo-chatbot-backend", "-p", "dir=" .. dir }
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("would apply networkpolicy " .. POLICY:gsub("%-", "%%-"), r.stdout)
    assert.is_nil(policy())
    assert.are.equal("", (sb.sh("ls -A " .. cli.quote(dir))))
  end)

  it("seals the evidence, isolates the pods with a deny-all policy, and names the Secrets to rotate", function()
    local r = cli.run { "run", RUNBOOK, "--yes", "-p", "deployment=todo-chatbot-backend", "-p", "dir=" .. dir, "-p", "log_tail=200" }
    local out = r.stdout .. r.stderr
    assert.are.equal(0, r.code, out)
    -- the policy, as kubectl sees it: the deployment's pods, both directions, no rule letting anything through
    local p = policy()
    assert.truthy(p, "no networkpolicy " .. POLICY)
    local selector = json.decode(kubectl(("-n %s get deploy todo-chatbot-backend -o jsonpath='{.spec.selector.matchLabels}'"):format(NS)))
    assert.are.same(selector, p.spec.podSelector.matchLabels)
    assert.are.same({ "Ingress", "Egress" }, p.spec.policyTypes)
    assert.is_nil(p.spec.ingress)
    assert.is_nil(p.spec.egress)
    -- the evidence: every file in the manifest checks with sha256sum; each pod's logs are there
    local set = out:match("evidence sealed in (%S+):")
    assert.truthy(set, out)
    local manifest = json.decode(cli.slurp(set .. "/manifest.json"))
    local lines = {}
    for _, f in ipairs(manifest.files) do lines[#lines + 1] = f.sha256 .. "  " .. f.path end
    cli.write(dir .. "/SHA256SUMS", table.concat(lines, "\n") .. "\n")
    local check, ok = sb.sh(("cd %s && sha256sum -c %s"):format(cli.quote(set), cli.quote(dir .. "/SHA256SUMS")))
    assert.is_true(ok, check)
    local pods = kubectl(("-n %s get pods -l app.kubernetes.io/component=backend -o name"):format(NS))
    local n = 0
    for pod in pods:gmatch("pod/(%S+)") do
      assert.truthy(io.open(("%s/logs/%s_backend.log"):format(set, pod)), "no log of " .. pod)
      n = n + 1
    end
    assert.is_true(n > 0, pods)
    assert.truthy(io.open(set .. "/pods.yaml") and io.open(set .. "/events.yaml") and io.open(set .. "/k8s/deployments.yaml"))
    assert.matches("to rotate: [^\n]*rotate%-secret %-p namespace=todo%-chatbot %-p secret=todo%-chatbot%-secrets", out)
    -- seed 002's access audit: the WARN and ERROR lines, sealed with the rest
    assert.truthy(io.open(set .. "/audit.log"), "no audit.log")
  end)

  it("rotates the credentials it is given, restarting their readers, and never prints them", function()
    local old = "leaked-key-0123456789"
    kubectl(("-n %s delete secret leaked --ignore-not-found"):format(NS))
    kubectl(("-n %s create secret generic leaked --from-literal=token=%s"):format(NS, old))
    kubectl(("-n %s patch deployment todo-chatbot-backend --type=json -p %s"):format(NS, cli.quote(
      '[{"op":"add","path":"/spec/template/spec/containers/0/env/-","value":{"name":"TOKEN","valueFrom":{"secretKeyRef":{"name":"leaked","key":"token"}}}}]')))
    assert.truthy(kh.wait_rolled_out("backend"))
    local r = cli.run { "run", RUNBOOK, "--yes", "-p", "deployment=todo-chatbot-backend", "-p", "dir=" .. dir, "-p", "log_tail=10",
      "-p", "rotate=leaked/token" }
    local out = r.stdout .. r.stderr
    assert.are.equal(0, r.code, out)
    local new = kubectl(("-n %s get secret leaked -o jsonpath='{.data.token}' | base64 -d"):format(NS))
    assert.are_not.equal(old, new)
    assert.matches("^%w+$", new)
    assert.falsy(out:find(new, 1, true), "the new value was printed")
    assert.matches("rotated leaked/token; restarted deployments/todo%-chatbot%-backend", out)
    assert.truthy(kubectl(("-n %s get deploy todo-chatbot-backend -o jsonpath='{.spec.template.metadata.annotations}'"):format(NS))
      :find("restartedAt", 1, true))
    assert.falsy(kubectl(("-n %s get secrets -o name"):format(NS)):find("leaked-before", 1, true))
    kubectl(("-n %s delete secret leaked"):format(NS))
  end)

  it("seed 002: every secret rotated (the database password in PostgreSQL too), the allow policy no longer reaching the pods, the patched image rolled out", function()
    local function key(k) return kubectl(("-n %s get secret todo-chatbot-secrets -o jsonpath='{.data.%s}' | base64 -d"):format(NS, k)) end
    local before = { url = key("DATABASE_URL"), jwt = key("JWT_SECRET"), redis = key("REDIS_URL"), redis_pw = key("REDIS_PASSWORD") }
    local env_url = sb.env("DATABASE_URL")
    local old_pw = env_url:match("^postgres%a*://[^:]+:([^@]+)@")
    finally(function() -- the sandbox's password back, whatever happened
      if not select(2, sb.psql("SELECT 1")) then
        sb.psql(("ALTER ROLE todo PASSWORD '%s'"):format(old_pw), env_url:gsub(":[^:@/]+@", ":" .. key("POSTGRES_PASSWORD") .. "@", 1))
      end
    end)
    local image = "registry.digitalocean.com/todo-chatbot/backend:v1.5.0"
    local r = cli.run { "run", RUNBOOK, "--yes", "-p", "deployment=todo-chatbot-backend", "-p", "dir=" .. dir, "-p", "log_tail=10",
      "-p", "rotate_all=true", "-p", "image=" .. image }
    local out = r.stdout .. r.stderr
    assert.are.equal(0, r.code, out)
    -- the database password: the Secret's new URL connects, the old password is refused
    local new_url = key("DATABASE_URL")
    assert.are_not.equal(before.url, new_url)
    local new_pw = new_url:match("^postgres%a*://[^:]+:([^@]+)@")
    assert.are.equal(new_pw, key("POSTGRES_PASSWORD"))
    assert.falsy(out:find(new_pw, 1, true), "the new password was printed")
    local url = env_url:gsub(":[^:@/]+@", ":" .. new_pw .. "@", 1)
    assert.matches("^%s*1", (sb.psql("SELECT 1", url)))
    assert.is_false(select(2, sb.psql("SELECT 1", env_url)))
    sb.psql(("ALTER ROLE todo PASSWORD '%s'"):format(old_pw), url)
    -- the app's own keys: new, and still equal to each other; Redis's credentials named, not changed
    assert.are_not.equal(before.jwt, key("JWT_SECRET"))
    assert.are.equal(key("JWT_SECRET"), key("BETTER_AUTH_SECRET"))
    assert.are.equal(before.redis, key("REDIS_URL"))
    assert.are.equal(before.redis_pw, key("REDIS_PASSWORD"))
    assert.matches("not rotated: todo%-chatbot%-secrets/REDIS_URL", out)
    -- the namespace-wide allow policy leaves the backend's pods to the deny-all
    local np = json.decode(kubectl(("-n %s get networkpolicy allow-same-namespace -o json"):format(NS)))
    assert.are.same({ { key = "app.kubernetes.io/component", operator = "NotIn", values = { "backend" } } },
      np.spec.podSelector.matchExpressions)
    assert.truthy(policy())
    assert.are.equal(image, kubectl(("-n %s get deploy todo-chatbot-backend -o jsonpath='{.spec.template.spec.containers[0].image}'"):format(NS)))
  end)
end)
