-- Helm release records in a dry run. Each row is a step run with --dry-run
-- against the sandbox's release todo-chatbot; kubectl lists the namespace's
-- Deployments (generation, resourceVersion) and Secrets (resourceVersion)
-- before and after, and they must be the same. A row may fail with an error;
-- either way nothing is rolled back and no record is written.
local adv = require("spec.adversarial.support")
local sb = require("spec.sandbox.sandbox_helper")
local cli = require("spec.support.cli")

local function objects()
  local out, ok = sb.kubectl("-n todo-chatbot get deployments,secrets -o jsonpath='{range .items[*]}{.kind}/{.metadata.name}"
    .. "={.metadata.generation}/{.metadata.resourceVersion} {end}'")
  assert(ok, out)
  return out
end

local NS = '{ namespace = "todo-chatbot" }'

local VARIANTS = {
  { "helm.rollback", "helm.rollback('todo-chatbot', " .. NS .. ")" },
  { "to a given revision, twice, the first one's error caught",
    "pcall(helm.rollback, 'todo-chatbot', { namespace = 'todo-chatbot', revision = 1 })\n"
      .. "helm.rollback('todo-chatbot', { namespace = 'todo-chatbot', revision = 2, wait = true, timeout = '5s' })" },
  { "the k8s library's writes replaced before the rollback", [[
      k8s.apply = function(...) return k8s.create(...) end
      k8s.replace = function(o) o.metadata.resourceVersion = nil; return k8s.create(o) end
      helm.rollback('todo-chatbot', { namespace = 'todo-chatbot' }) ]] },
  { "a record of its own making, then its rollback", [[
      local s = k8s.get('secret/sh.helm.release.v1.todo-chatbot.v2', { namespace = 'todo-chatbot' })
      s.metadata = { name = 'sh.helm.release.v1.todo-chatbot.v9', namespace = 'todo-chatbot',
        labels = { owner = 'helm', name = 'todo-chatbot', status = 'deployed', version = '9' } }
      k8s.create(s)
      helm.rollback('todo-chatbot', { namespace = 'todo-chatbot', revision = 1 }) ]] },
}

describe("adversarial: Helm release records in a dry run", function()
  teardown(cli.cleanup)
  for _, v in ipairs(VARIANTS) do
    it(v[1], function()
      adv.check { step = v[2], snapshot = objects, check = function(r)
        assert.is_nil((r.stdout .. r.stderr):find("traceback", 1, true), r.stdout .. r.stderr)
      end }
    end)
  end
end)
