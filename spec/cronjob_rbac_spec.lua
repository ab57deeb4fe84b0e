-- examples/team/cronjob.yaml's RBAC, enforced by the sandbox's Kubernetes
-- stand-in for service-account tokens: the CronJob's command, run with a token
-- of its service account (kubectl create token), succeeds with exactly the
-- Role and ClusterRole the file ships, and fails with a 403 naming the missing
-- permission once one rule is removed. The objects are applied and the token
-- made with kubectl, from the file itself.
local cli = require("spec.support.cli")
local lyaml = require("lyaml")

local FILE = "examples/team/cronjob.yaml"
local RBAC = { ServiceAccount = true, Role = true, RoleBinding = true, ClusterRole = true, ClusterRoleBinding = true }

local function sh(cmd)
  local p = io.popen("(" .. cmd .. ") 2>&1")
  local out = p:read("a")
  return p:close(), out
end

local write = cli.write

--- The file's RBAC objects, with `edit(docs)` applied, as YAML.
local function rbac_yaml(edit)
  local docs = {}
  for _, d in ipairs(lyaml.load(cli.slurp(FILE), { all = true })) do
    if RBAC[d.kind] then docs[#docs + 1] = d end
  end
  if edit then edit(docs) end
  return lyaml.dump(docs)
end

local function kind(docs, k)
  for _, d in ipairs(docs) do if d.kind == k then return d end end
end

describe("the CronJob's service account under RBAC", function()
  local dir, args, kubeconfig

  setup(function()
    dir = cli.tmpdir()
    for _, d in ipairs(lyaml.load(cli.slurp(FILE), { all = true })) do
      if d.kind == "CronJob" then args = d.spec.jobTemplate.spec.template.spec.containers[1].args end
    end
    local ok, out = sh("kubectl apply -f " .. write(dir .. "/rbac.yaml", rbac_yaml()))
    assert(ok, out)
    local token
    ok, token = sh("kubectl -n todo-chatbot create token runbook")
    assert(ok, token)
    -- the sandbox's cluster, as the service account
    kubeconfig = dir .. "/kubeconfig"
    ok, out = sh(("kubectl config view --raw --minify --flatten > %s && KUBECONFIG=%s kubectl config set-credentials sa "
      .. "--token=%s && KUBECONFIG=%s kubectl config set-context --current --user=sa")
      :format(kubeconfig, kubeconfig, token:match("%S+"), kubeconfig))
    assert(ok, out)
  end)

  -- The recovery holds the namespace's error rate: an earlier spec's faults must have left its window.
  before_each(function() require("spec.sandbox.sandbox_helper").settle_error_rate() end)

  teardown(function()
    sh("kubectl delete --ignore-not-found -f " .. dir .. "/rbac.yaml")
    sh("kubectl -n todo-chatbot delete lease outage-recovery --ignore-not-found")
    cli.cleanup()
  end)

  -- The file's command with the error rate held 2 s instead of its minute:
  -- the hold only queries Prometheus, which RBAC has no part in.
  local function run_as_cronjob()
    local argv = { table.unpack(args) }
    table.move({ "-p", "error_rate_hold=2s" }, 1, 2, #argv + 1, argv)
    return cli.run(argv, { KUBECONFIG = kubeconfig })
  end

  it("runs the recovery with exactly the Role and ClusterRole shipped", function()
    local ok, who = sh("KUBECONFIG=" .. kubeconfig .. " kubectl auth whoami")
    assert.is_true(ok, who)
    assert.matches("system:serviceaccount:todo%-chatbot:runbook", who)
    local r = run_as_cronjob()
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches('"event":"run_end"', r.stdout)
  end)

  -- rule taken away -> exit status, what the 403 (Forbidden) names
  local removed = {
    { "the Lease rule", function(docs) table.remove(kind(docs, "Role").rules, 5) end, 1,
      'cannot get resource "leases" in API group "coordination.k8s.io" in the namespace "todo%-chatbot"' },
    { "the read rule for namespaces, pods, services and events",
      function(docs) table.remove(kind(docs, "Role").rules, 1) end, 1, 'cannot [a-z]+ resource "[a-z]+" in API group ""' },
    -- outage-recovery assesses the namespace without node readiness, warning why
    { "the nodes ClusterRole's rule", function(docs) kind(docs, "ClusterRole").rules = {} end, 0,
      'cannot list resource "nodes" in API group "": .*%(403%)' },
  }
  for _, c in ipairs(removed) do
    it("is refused, the 403 naming the permission, without " .. c[1], function()
      local ok, out = sh("kubectl replace -f " .. write(dir .. "/less.yaml", rbac_yaml(c[2])))
      assert.is_true(ok, out)
      finally(function() sh("kubectl replace -f " .. dir .. "/rbac.yaml") end)
      local r = run_as_cronjob()
      assert.are.equal(c[3], r.code, r.stdout .. r.stderr)
      local said = (r.stdout .. r.stderr):gsub('\\"', '"')   -- the JSON lines' escaped quotes
      assert.matches('is forbidden: User "system:serviceaccount:todo%-chatbot:runbook" ' .. c[4], said)
    end)
  end
end)
