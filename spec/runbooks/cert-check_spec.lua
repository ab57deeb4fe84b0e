-- runbooks/cert-check.lua against the sandbox: TLS Secrets made with the
-- openssl CLI and put in by kubectl (expired, about to expire, fine, not
-- covering the Ingress's host), a live endpoint served by openssl s_server;
-- the verdicts checked, a renewal checked with kubectl and openssl. A
-- cert-manager Certificate (the stand-in issues it) near expiry whose renewal
-- failed: warned about, then renewed through cert-manager.
local cli = require("spec.support.cli")
local certs = require("spec.support.certs")
local sb = require("spec.sandbox.sandbox_helper")
local kh = require("spec.runbooks.k8s_helper")

local RUNBOOK = "runbooks/cert-check.lua"
local NS = "todo-chatbot"

local function kubectl(args)
  local out, ok = sb.kubectl(args)
  assert(ok, "kubectl " .. args .. ": " .. out)
  return out
end

local function put_tls(name, cert)
  kubectl(("-n %s delete secret %s --ignore-not-found"):format(NS, name))
  kubectl(("-n %s create secret tls %s --cert=%s --key=%s"):format(NS, name, cli.quote(cert.cert), cli.quote(cert.key)))
end

-- The sha256 fingerprint of a Secret's tls.crt, read by kubectl and openssl.
local function fingerprint(name)
  local out = kubectl(("-n %s get secret %s -o jsonpath='{.data.tls\\.crt}' | base64 -d | openssl x509 -noout -fingerprint -sha256")
    :format(NS, name))
  return (out:match("Fingerprint=([%x:]+)"):gsub(":", ""))
end

-- Every Secret's and deployment's resourceVersion in the namespace, by kubectl.
local function versions()
  return kubectl(("-n %s get secrets,deployments -o custom-columns=N:.metadata.name,V:.metadata.resourceVersion --no-headers")
    :format(NS))
end

local function line_of(out, source)
  for line in out:gmatch("[^\n]+") do
    if line:find(source, 1, true) and line:match("^%s*|%s+[A-Z]+%s") then return line end
  end
end

describe("cert-check", function()
  local dir, ca, good, soon, later, old, other
  setup(function()
    dir = cli.tmpdir()
    ca = certs.make(dir, "ca", { cn = "Spec Root CA", is_ca = true, days = 365 })
    good = certs.make(dir, "good", { cn = "todo.example.com", sans = "DNS:todo.example.com", days = 90, ca = ca })
    soon = certs.make(dir, "soon", { cn = "soon.example.test", sans = "DNS:soon.example.test", days = 3, ca = ca })
    later = certs.make(dir, "later", { cn = "later.example.test", sans = "DNS:later.example.test", days = 20 })
    old = certs.make(dir, "old", { cn = "todo.example.com", sans = "DNS:todo.example.com", expired = true })
    other = certs.make(dir, "other", { cn = "other.example.com", sans = "DNS:other.example.com", days = 90 })
  end)
  teardown(function()
    kh.reset_world()
    cli.cleanup()
  end)

  it("gives each TLS Secret and endpoint its verdict, and fails on the critical ones", function()
    put_tls("todo-chatbot-tls", other)   -- the Ingress serves todo.example.com with it
    put_tls("later-tls", later)
    put_tls("fine-tls", good)
    local port, stop = certs.serve(soon)
    local refused = certs.free_port()
    local r = cli.run { "run", RUNBOOK, "--yes", "-p", ("endpoints=127.0.0.1:%d@soon.example.test,127.0.0.1:%d"):format(port, refused),
      "-p", "timeout=5s" }
    stop()
    local out = r.stdout .. r.stderr
    assert.are.equal(1, r.code, out)
    local fine = line_of(out, "secret todo-chatbot/fine-tls")
    assert.matches("^%s*| OK%s+8[89]%s+" .. os.date("!%Y-%m-%d", certs.not_after(good.cert)):gsub("%-", "%%-"), fine)
    assert.matches("CRITICAL .*todo%-chatbot/todo%-chatbot%-tls .*other%.example%.com: does not cover todo%.example%.com",
      line_of(out, "todo-chatbot-tls"))
    assert.matches("WARN%s+1[89] .*expires in 1[89] days", line_of(out, "later-tls"))
    assert.matches("CRITICAL%s+[23] .*soon%.example%.test: expires in [23] days", line_of(out, "@soon.example.test"))
    assert.matches("CRITICAL .*127%.0%.0%.1:" .. refused .. ": connecting: Connection refused", line_of(out, "127.0.0.1:" .. refused))
    assert.matches("1 ok, 1 warnings, 3 critical", out)
    assert.matches("3 certificates need action now", out)
    assert.falsy(out:find("traceback", 1, true), out)
  end)

  it("says an expired Secret is expired, and a bad tls.crt is unreadable, naming the Secret", function()
    put_tls("todo-chatbot-tls", old)
    kubectl(("-n %s delete secret later-tls fine-tls --ignore-not-found"):format(NS))
    kubectl(("-n %s create secret generic broken-tls --type=kubernetes.io/tls --from-literal=tls.crt=junk --from-literal=tls.key=junk")
      :format(NS))
    local r = cli.run { "run", RUNBOOK, "--yes" }
    kubectl(("-n %s delete secret broken-tls"):format(NS))
    local out = r.stdout .. r.stderr
    assert.are.equal(1, r.code, out)
    assert.matches("CRITICAL%s+%-%d+%s+2025%-02%-01 00:00 .*expired %d+ days ago", line_of(out, "todo-chatbot-tls"))
    assert.matches("secret todo%-chatbot/broken%-tls: no certificate in it", line_of(out, "broken-tls"))
  end)

  it("renews a Secret from PEM files in a dry run without changing anything", function()
    put_tls("todo-chatbot-tls", old)
    local before = versions()
    local r = cli.run { "run", RUNBOOK, "--dry-run", "-p", "renew_secret=todo-chatbot-tls", "-p", "cert_file=" .. good.cert,
      "-p", "key_file=" .. good.key }
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.are.equal(before, versions())
    assert.matches("would create secret todo%-chatbot%-tls%-before%-", r.stdout)
  end)

  it("refuses a key that is not the certificate's, and changes nothing", function()
    local before = kubectl(("-n %s get secret todo-chatbot-tls -o jsonpath='{.metadata.resourceVersion}'"):format(NS))
    local r = cli.run { "run", RUNBOOK, "--yes", "-p", "renew_secret=todo-chatbot-tls", "-p", "cert_file=" .. good.cert,
      "-p", "key_file=" .. other.key }
    assert.are.equal(1, r.code, r.stdout .. r.stderr)
    assert.matches("is not the private key of", r.stdout .. r.stderr)
    assert.are.equal(before, kubectl(("-n %s get secret todo-chatbot-tls -o jsonpath='{.metadata.resourceVersion}'"):format(NS)))
  end)

  it("renews the Secret, keeps the old one, restarts the workloads that mount it, and never prints the key", function()
    kubectl(("-n %s patch deployment todo-chatbot-frontend --type=json -p %s"):format(NS, cli.quote(
      '[{"op":"add","path":"/spec/template/spec/volumes","value":[{"name":"tls","secret":{"secretName":"todo-chatbot-tls"}}]}]')))
    assert.truthy(kh.wait_rolled_out("frontend"))
    local r = cli.run { "run", RUNBOOK, "--yes", "-p", "renew_secret=todo-chatbot-tls", "-p", "cert_file=" .. good.cert,
      "-p", "key_file=" .. good.key }
    local out = r.stdout .. r.stderr
    assert.are.equal(0, r.code, out)
    assert.are.equal(fingerprint("todo-chatbot-tls"), certs.openssl("x509 -noout -fingerprint -sha256 -in " .. cli.quote(good.cert))
      :match("Fingerprint=([%x:]+)"):gsub(":", ""))
    local copy = out:match("kept as (todo%-chatbot%-tls%-before%-%d+)")
    assert.truthy(copy, out)
    assert.are.equal(fingerprint(copy), (certs.openssl("x509 -noout -fingerprint -sha256 -in " .. cli.quote(old.cert))
      :match("Fingerprint=([%x:]+)"):gsub(":", "")))
    assert.matches("restarted: deployments/todo%-chatbot%-frontend\n", out)
    assert.truthy(kubectl(("-n %s get deploy todo-chatbot-frontend -o jsonpath='{.spec.template.metadata.annotations}'"):format(NS))
      :find("restartedAt", 1, true))
    assert.truthy(kh.wait_rolled_out("frontend"))
    local key_body = cli.slurp(good.key):match("KEY%-%-%-%-%-\n(.-)\n")
    assert.falsy(out:find(key_body, 1, true), "the private key was printed")
  end)

  -- A cert-manager Certificate in a namespace of its own (CNS), issued by the stand-in, then left
  -- with 5 days and a failed renewal.
  local CNS = "cert-spec"
  local function expiring_certificate()
    kubectl("create namespace " .. CNS)
    assert(sb.kubectl(("-n %s apply -f -"):format(CNS), [[
apiVersion: cert-manager.io/v1
kind: Certificate
metadata: {name: api-cert}
spec:
  secretName: api-cert-tls
  dnsNames: [api.todo.example.com]
  duration: 2160h
  renewBefore: 720h
  issuerRef: {name: letsencrypt, kind: ClusterIssuer}
]]))
    assert.truthy(sb.wait_until(20, function()
      return sb.kubectl(("-n %s get certificate api-cert -o jsonpath='{.status.revision}'"):format(CNS)) == "1"
    end), "the Certificate was not issued")
    assert(sb.ctl("k8s cert-expiring " .. CNS .. "/api-cert 5"))
    return function() kubectl("delete namespace " .. CNS) end
  end

  -- Days until the Secret's certificate expires, by kubectl, openssl and date.
  local function days_left(name)
    local out = kubectl(("-n %s get secret %s -o jsonpath='{.data.tls\\.crt}' | base64 -d | openssl x509 -noout -enddate")
      :format(CNS, name))
    local t = tonumber((sb.sh("date -u -d " .. sb.quote(out:match("notAfter=(.-)%s*$")) .. " +%s")))
    return (t - os.time()) / 86400
  end

  it("warns of a cert-manager Certificate near expiry whose renewal failed, and renews it through cert-manager", function()
    finally(expiring_certificate())
    local r = cli.run { "run", RUNBOOK, "--yes", "-p", "namespace=" .. CNS }
    local out = r.stdout .. r.stderr
    assert.are.equal(1, r.code, out)
    assert.matches("CRITICAL%s+[45] .*certificate cert%-spec/api%-cert .*expires in [45] days; its last renewal failed at .*403 urn:ietf:params:acme:error:unauthorized",
      line_of(out, "certificate cert-spec/api-cert"))
    assert.matches("%-p renew=expiring renews them", out)
    assert.is_true(days_left("api-cert-tls") < 6)
    -- a dry run of the renewal changes nothing
    local before = kubectl(("-n %s get certificate,secret -o custom-columns=N:.metadata.name,V:.metadata.resourceVersion --no-headers"):format(CNS))
    r = cli.run { "run", RUNBOOK, "--dry-run", "-p", "namespace=" .. CNS, "-p", "renew=expiring" }
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("would patch certificate api%-cert", r.stdout)
    assert.are.equal(before, kubectl(("-n %s get certificate,secret -o custom-columns=N:.metadata.name,V:.metadata.resourceVersion --no-headers"):format(CNS)))
    -- the renewal: cert-manager issues a new certificate for the whole duration
    r = cli.run { "run", RUNBOOK, "--yes", "-p", "namespace=" .. CNS, "-p", "renew=expiring" }
    out = r.stdout .. r.stderr
    assert.are.equal(0, r.code, out)
    -- 90 days from its issue: 89 or 90 whole days left, by where the seconds fall
    local left = tonumber(out:match("secret cert%-spec/api%-cert%-tls: the new certificate, (%d+) days left"))
    assert.truthy(left == 89 or left == 90, out)
    assert.is_true(days_left("api-cert-tls") > 89)
    local described = kubectl(("-n %s describe certificate api-cert"):format(CNS))
    assert.matches("Certificate re%-issuance manually triggered", described)
    assert.matches("Reason:%s+Ready\n%s+Status:%s+True\n%s+Type:%s+Ready", described)
  end)

end)
