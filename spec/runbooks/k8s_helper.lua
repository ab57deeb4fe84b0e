--- What the runbook specs do to the Kubernetes stand-in and read from it, with
--- curl (sandbox_helper.k8s), never through runbook's own k8s module.
local sb = require("spec.sandbox.sandbox_helper")

local M = {}

M.NS = "todo-chatbot"
local DEPLOYS = "/apis/apps/v1/namespaces/todo-chatbot/deployments/"

function M.deployment(app)
  local status, d = sb.k8s("GET", DEPLOYS .. "todo-chatbot-" .. app)
  assert(status == 200, ("GET deployment %s: %s %s"):format(app, tostring(status), tostring(d)))
  return d
end

--- The app container's image tag.
function M.tag(app)
  return M.deployment(app).spec.template.spec.containers[1].image:match(":([^:]+)$")
end

--- A release, as CI would make it: the app container's image set to `tag`.
function M.release(app, tag)
  local d = M.deployment(app)
  local containers = d.spec.template.spec.containers
  containers[1].image = containers[1].image:gsub(":[^:]+$", ":" .. tag)
  local status, out = sb.k8s("PATCH", DEPLOYS .. "todo-chatbot-" .. app,
    { spec = { template = { spec = { containers = containers } } } })
  assert(status == 200, ("release %s %s: %s %s"):format(app, tag, tostring(status), tostring(out)))
  assert(M.wait_rolled_out(app), "the release of " .. app .. " did not roll out")
end

--- Scale by hand, as an operator would with kubectl scale, and wait until the pods match.
function M.scale(app, replicas)
  local status, out = sb.k8s("PATCH", DEPLOYS .. "todo-chatbot-" .. app, { spec = { replicas = replicas } })
  assert(status == 200, ("scale %s to %d: %s %s"):format(app, replicas, tostring(status), tostring(out)))
  assert(M.wait_rolled_out(app), app .. " did not settle at " .. replicas .. " replicas")
end

--- True once the deployment is rolled out with every replica ready and no old pod left.
function M.rolled_out(app)
  local d = M.deployment(app)
  local st, want = d.status or {}, d.spec.replicas or 1
  if (st.observedGeneration or 0) < d.metadata.generation then return false end
  if (st.updatedReplicas or 0) ~= want or (st.readyReplicas or 0) ~= want or (st.replicas or 0) ~= want then return false end
  return #M.pods(app) == want
end

function M.wait_rolled_out(app, seconds)
  return sb.wait_until(seconds or 20, function() return M.rolled_out(app) end)
end

function M.pods(app)
  local status, list = sb.k8s("GET", "/api/v1/namespaces/todo-chatbot/pods?labelSelector="
    .. "app.kubernetes.io%2Fcomponent%3D" .. app)
  assert(status == 200, tostring(list))
  return list.items
end

--- The first waiting reason among the app's pods (CrashLoopBackOff, ImagePullBackOff ...).
function M.waiting(app)
  for _, p in ipairs(M.pods(app)) do
    for _, cs in ipairs((p.status or {}).containerStatuses or {}) do
      local w = (cs.state or {}).waiting
      if w and w.reason ~= "ContainerCreating" then return w.reason end
    end
  end
end

--- The app container's restarts summed over the app's pods.
function M.restarts(app)
  local n = 0
  for _, p in ipairs(M.pods(app)) do
    for _, cs in ipairs((p.status or {}).containerStatuses or {}) do
      if cs.name == app then n = n + (cs.restartCount or 0) end
    end
  end
  return n
end

function M.wait_waiting(app, reason)
  assert(sb.wait_until(20, function() return M.waiting(app) == reason end),
    ("%s never showed %s (now %s)"):format(app, reason, tostring(M.waiting(app))))
end

--- GET the app's /health through the API server's service proxy: the HTTP status.
function M.health(app, port)
  local status = sb.k8s("GET", ("/api/v1/namespaces/todo-chatbot/services/todo-chatbot-%s:%d/proxy/health"):format(app, port))
  return status
end

--- True when a container of one of the app's pods was last OOM-killed.
function M.oom_killed(app)
  for _, p in ipairs(M.pods(app)) do
    for _, cs in ipairs((p.status or {}).containerStatuses or {}) do
      if ((cs.lastState or {}).terminated or {}).reason == "OOMKilled" then return true end
    end
  end
  return false
end

--- Faults cleared and every object reseeded (history, images, pods), so specs do not depend on order.
function M.reset_world()
  local out, ok = sb.ctl("k8s reset --world")
  assert(ok, out)
  for _, app in ipairs { "backend", "frontend", "websocket", "recurring-task", "notification" } do
    assert(M.wait_rolled_out(app), app .. " did not settle after the reseed")
  end
end

return M
