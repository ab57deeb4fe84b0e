-- stdlib/helm.lua against the sandbox's Helm release todo-chatbot (three release
-- records written as helm writes them): what it reads is checked against the
-- records decoded by base64 and gunzip, a rollback against kubectl.
local cli = require("spec.support.cli")
local sb = require("spec.sandbox.sandbox_helper")
local kh = require("spec.runbooks.k8s_helper")
local json = require("cjson")

local NS = "todo-chatbot"

-- A runbook of one step running `body` (ctx in scope), printing what it returns as JSON.
local function run(body, ...)
  local path = cli.runbook(([[
name = "helm-spec"
description = "helm library"
step "helm" { run = function(ctx)
  local out = (function() %s end)()
  log.info("RESULT %%s", json.encode(out or {}))
end }
]]):format(body))
  return cli.run { "run", path, ... }
end

local function result(r)
  assert.are.equal(0, r.code, r.stdout .. r.stderr)
  return json.decode((assert(r.stdout:match("RESULT (%b{})"), r.stdout)))
end

-- A record decoded without the library: kubectl, base64 -d twice, gunzip.
local function record(revision)
  local out, ok = sb.sh(("KUBECONFIG=%s kubectl -n %s get secret sh.helm.release.v1.todo-chatbot.v%d -o jsonpath='{.data.release}'"
    .. " | base64 -d | base64 -d | gunzip"):format(sb.quote(sb.env("KUBECONFIG")), NS, revision))
  assert(ok, out)
  return json.decode(out)
end

-- Each Deployment's generation and each Secret's resourceVersion, as kubectl lists them:
-- what a rollback would move.
local function writes()
  local out, ok = sb.kubectl("-n " .. NS .. " get deployments,secrets -o jsonpath='{range .items[*]}{.kind}/{.metadata.name}"
    .. "={.metadata.generation}{.metadata.resourceVersion} {end}'")
  assert(ok, out)
  return out
end

-- name=status of each release record, as kubectl lists them.
local function statuses()
  local out, ok = sb.kubectl("-n " .. NS .. " get secrets -l owner=helm -o jsonpath='{range .items[*]}{.metadata.labels.version}={.metadata.labels.status} {end}'")
  assert(ok, out)
  local list = {}
  for v in out:gmatch("%S+") do list[#list + 1] = v end
  table.sort(list)
  return table.concat(list, " ")
end

describe("helm", function()
  setup(kh.reset_world)
  teardown(function()
    kh.reset_world()
    cli.cleanup()
  end)

  it("reads the history, the values and the manifest as the records hold them", function()
    local got = result(run [[
      return { releases = helm.releases { namespace = "todo-chatbot" },
               history = helm.history("todo-chatbot", { namespace = "todo-chatbot" }),
               two = helm.get("todo-chatbot", { namespace = "todo-chatbot", revision = 2 }),
               last = helm.get("todo-chatbot", { namespace = "todo-chatbot" }) }
    ]])
    assert.are.equal(1, #got.releases)
    assert.are.same({ "todo-chatbot", 3, "deployed", "todo-chatbot-0.5.0" },
      { got.releases[1].name, got.releases[1].revision, got.releases[1].status, got.releases[1].chart })
    for i, h in ipairs(got.history) do
      local rec = record(i)
      assert.are.same({ i, rec.info.status, rec.info.description, rec.info.last_deployed },
        { h.revision, h.status, h.description, h.updated })
    end
    local two = record(2)
    assert.are.same(two.config, got.two.values)
    assert.are.equal(two.manifest, got.two.manifest)
    assert.are.equal("v1.3.1", got.two.values.backend.image.tag)
    assert.are.equal(5, #got.two.objects)
    assert.are.equal(3, got.last.revision)
    assert.are.same({ name = "todo-chatbot", version = "0.5.0", app_version = "1.4.0" }, got.last.chart)
  end)

  it("says clearly what is wrong: no release, no such revision, a corrupt record", function()
    local r = run [[ return helm.history("nope", { namespace = "todo-chatbot" }) ]]
    assert.are.equal(1, r.code)
    assert.matches("release nope not found in namespace todo%-chatbot", r.stdout .. r.stderr)
    r = run [[ return helm.rollback("todo-chatbot", { namespace = "todo-chatbot", revision = 9 }) ]]
    assert.are.equal(1, r.code)
    assert.matches("release todo%-chatbot has no revision 9 %(revisions: 1, 2, 3%)", r.stdout .. r.stderr)
    local out, ok = sb.kubectl("-n " .. NS .. " apply -f -", [[
apiVersion: v1
kind: Secret
metadata: {name: sh.helm.release.v1.broken.v1, labels: {owner: helm, name: broken, status: deployed, version: "1"}}
type: helm.sh/release.v1
data: {release: bm90IGd6aXAgbm9yIGpzb24=}
]])
    assert(ok, out)
    r = run [[ return helm.get("broken", { namespace = "todo-chatbot" }) ]]
    assert.are.equal(1, r.code)
    assert.matches("release record todo%-chatbot/sh%.helm%.release%.v1%.broken%.v1 is corrupt", r.stdout .. r.stderr)
    assert.is_nil((r.stdout .. r.stderr):find("traceback", 1, true))
    sb.kubectl("-n " .. NS .. " delete secret sh.helm.release.v1.broken.v1")
  end)

  it("changes nothing in a dry run of a rollback, and says what it would do", function()
    local before = writes()
    local r = run([[ return helm.rollback("todo-chatbot", { namespace = "todo-chatbot" }) ]], "--dry-run")
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("would apply deployment todo%-chatbot%-backend", r.stdout)
    assert.matches("would replace secret sh%.helm%.release%.v1%.todo%-chatbot%.v3", r.stdout)
    assert.matches("would create secret sh%.helm%.release%.v1%.todo%-chatbot%.v4", r.stdout)
    assert.are.equal(before, writes())
    assert.are.equal("1=superseded 2=superseded 3=deployed", statuses())
  end)

  it("rolls back as helm rollback does: the old objects applied, a new deployed record, the last superseded", function()
    local got = result(run([[ return helm.rollback("todo-chatbot", { namespace = "todo-chatbot" }) ]], "--yes"))
    assert.are.same({ 3, 2, 4 }, { got.from, got.to, got.revision })
    -- kubectl: the Deployments run revision 2's images, the records are as helm leaves them
    assert.are.equal("v1.3.1", kh.tag("backend"))
    assert.are.equal("v1.3.0", kh.tag("frontend"))
    assert.are.equal("todo-chatbot", kh.deployment("backend").metadata.annotations["meta.helm.sh/release-name"])
    assert.are.equal("1=superseded 2=superseded 3=superseded 4=deployed", statuses())
    local four, two = record(4), record(2)
    assert.are.same({ 4, "deployed", "Rollback to 2" }, { four.version, four.info.status, four.info.description })
    assert.are.same(two.config, four.config)
    assert.are.equal(two.manifest, four.manifest)
    assert.are.equal(record(3).info.first_deployed, four.info.first_deployed)
  end)
end)
