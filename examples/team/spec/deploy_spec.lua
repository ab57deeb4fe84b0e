-- The team's spec of how it ships a service: the shipped `deploy` runbook,
-- by name, with the team's deployments. Run inside the runbook host:
--   runbook test examples/team/spec
-- It runs the runbook as the team does (the `runbook` command, JSON output)
-- against the cluster KUBECONFIG names (here the sandbox's), and reads the
-- result back with the k8s module, which `runbook test` can load.
local k8s = require("k8s")
local run = require("examples.team.spec.run")

local NS = "todo-chatbot"

local function deploy(service, tag)
  return run { "run", "deploy", "-p", "deployment=todo-chatbot-" .. service, "-p", "tag=" .. tag, "--yes", "--output", "json" }
end

local function image(service)
  local d = k8s.get("deploy/todo-chatbot-" .. service, { namespace = NS })
  return d.spec.template.spec.containers[1].image:match(":([^:]+)$")
end

describe("team deploy", function()
  it("deploys a tag and checks /health", function()
    local before = image("websocket")
    finally(function() deploy("websocket", before) end)
    local code, events, out = deploy("websocket", "v1.5.0")
    assert.are.equal(0, code, out)
    assert.are.equal("v1.5.0", image("websocket"))
    local h = k8s.deployment_health(NS, "todo-chatbot-websocket")
    assert.is_true(h.healthy, table.concat(h.problems, "; "))
    local last = events[#events]
    assert.are.equal("run_end", last.event)
    assert.are.equal("ok", last.status)
  end)

  it("rolls back a tag whose image cannot be pulled", function()
    local before = image("websocket")
    local code, events, out = deploy("websocket", "does-not-exist")
    assert.are.equal(1, code, out)
    local undone
    for _, e in ipairs(events) do
      if e.event == "undo_end" and e.step == "Set the image" then undone = e.status end
    end
    assert.are.equal("ok", undone)
    assert.are.equal(before, image("websocket"))
    k8s.rollout_status("deploy/todo-chatbot-websocket", { namespace = NS, timeout = "30s" })
  end)

  it("refuses to deploy the tag that already runs", function()
    local code, _, out = deploy("websocket", image("websocket"))
    assert.are.equal(1, code)
    assert.matches("already runs", out)
  end)
end)
