-- examples/team/serve.yaml, `runbook serve` in-cluster: kubectl validates it
-- against the sandbox's API server (apply --dry-run=client), its parts agree
-- with each other (the args, mounts, ports and selector), the rules in its
-- ConfigMap load in `runbook serve`, and amtool accepts the Alertmanager
-- configuration that sends to it. Run from the repository root (runbook test
-- examples/team/spec).
local cli = require("spec.support.cli")
local lyaml = require("lyaml")

local FILE = "examples/team/serve.yaml"

local function sh(cmd)
  local p = io.popen("(" .. cmd .. ") 2>&1")
  local out = p:read("a")
  return p:close(), out
end

local docs = {}
for _, d in ipairs(lyaml.load(cli.slurp(FILE), { all = true })) do docs[d.kind .. "/" .. d.metadata.name] = d end

local deployment = docs["Deployment/runbook-serve"]
local pod = deployment.spec.template.spec
local container = pod.containers[1]

--- The value after `flag` in the container's args.
local function arg(flag)
  for i, a in ipairs(container.args) do if a == flag then return container.args[i + 1] end end
end

--- The volume mounted at the directory of `path`, and the file's name in it.
local function mounted(path)
  for _, m in ipairs(container.volumeMounts) do
    if path:sub(1, #m.mountPath + 1) == m.mountPath .. "/" then
      for _, v in ipairs(pod.volumes) do
        if v.name == m.name then return v, path:sub(#m.mountPath + 2) end
      end
    end
  end
end

teardown(function() cli.cleanup() end)

describe("examples/team/serve.yaml", function()
  it("is valid for kubectl (apply --dry-run=client against the sandbox's API server)", function()
    local ok, out = sh("kubectl apply --dry-run=client -f " .. FILE)
    assert(ok, out)
    for _, what in ipairs { "serviceaccount/runbook-serve", "role.rbac.authorization.k8s.io/runbook-serve",
      "rolebinding.rbac.authorization.k8s.io/runbook-serve", "persistentvolumeclaim/runbook-serve-state",
      "configmap/runbook-serve-rules", "deployment.apps/runbook-serve", "service/runbook-serve" } do
      assert.truthy(out:find(what .. " created (dry run)", 1, true), out)
    end
  end)

  it("runs two replicas of serve whose args, mounts, ports and Service agree", function()
    assert.are.equal(2, deployment.spec.replicas)
    assert.are.same({ "serve", "runbook-serve" }, { container.args[1], pod.serviceAccountName })
    local rules, key = mounted(arg("--rules"))
    assert.are.same({ "runbook-serve-rules", true }, { rules.configMap.name,
      docs["ConfigMap/runbook-serve-rules"].data[key] ~= nil })
    local token = mounted(arg("--token-file"))
    assert.are.equal("runbook-serve-token", token.secret.secretName)
    local env = {}
    for _, e in ipairs(container.env) do env[e.name] = e.value end
    local state = mounted(env.RUNBOOK_STATE_DIR .. "/x")
    assert.are.equal("runbook-serve-state", state.persistentVolumeClaim.claimName)
    assert.are.same({ "ReadWriteMany" }, docs["PersistentVolumeClaim/runbook-serve-state"].spec.accessModes)
    local port = container.ports[1]
    assert.are.equal("0.0.0.0:" .. port.containerPort, arg("--listen"))
    local service = docs["Service/runbook-serve"]
    assert.are.same(deployment.spec.template.metadata.labels, service.spec.selector)
    assert.are.equal(port.name, service.spec.ports[1].targetPort)
    assert.are.equal("/healthz", container.readinessProbe.httpGet.path)
    local leases
    for _, r in ipairs(docs["Role/runbook-serve"].rules) do
      if r.apiGroups[1] == "coordination.k8s.io" then leases = table.concat(r.verbs, ",") end
    end
    assert.are.equal("get,create,update", leases)
  end)

  it("has rules that runbook serve loads, their runbooks found by name", function()
    local dir = cli.tmpdir()
    local rules = cli.write(dir .. "/rules.yml", docs["ConfigMap/runbook-serve-rules"].data["rules.yml"])
    local s = cli.spawn({ "serve", "--rules", rules, "--listen", "127.0.0.1:0",
      "--token-file", cli.write(dir .. "/token", "serve-yaml-spec-token-0123\n") }, { RUNBOOK_PATH = "runbooks" })
    local listening = cli.eventually(function()
      return cli.slurp(s.dir .. "/out"):find("listening", 1, true) or cli.slurp(s.dir .. "/code") ~= ""
    end, "serve to start")
    os.execute("kill " .. tostring(s.pid))
    assert.truthy(cli.slurp(s.dir .. "/out"):find("(2 rules)", 1, true), listening and cli.slurp(s.dir .. "/err"))
  end)

  it("gives Alertmanager a receiver that amtool accepts, sending to the Service with the token", function()
    local text = docs["ConfigMap/runbook-serve-alertmanager"].data["alertmanager.yml"]
    local ok, out = sh("amtool check-config " .. cli.write(cli.tmpdir() .. "/alertmanager.yml", text))
    assert(ok, out)
    local am = lyaml.load(text)
    local hook = am.receivers[2].webhook_configs[1]
    local service = docs["Service/runbook-serve"]
    assert.are.equal(("http://%s.%s.svc:%d/v1/alertmanager"):format(service.metadata.name,
      service.metadata.namespace, service.spec.ports[1].port), hook.url)
    assert.truthy(hook.http_config.authorization.credentials_file:find("runbook-serve-token", 1, true))
  end)
end)
