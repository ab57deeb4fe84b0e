-- heap-dump.lua: a heap dump of the pod that uses the most memory, copied out
-- with a checksum, then the pod restarted if asked.
--
-- Replaces seed 003 "Memory Leaks": `kubectl top pods`, `kubectl exec ... jmap
-- -dump` (or the app's own dump command), `kubectl cp` of the dump,
-- `kubectl delete pod` to get the memory back while the dump is analysed, and
-- the memory limit set (`kubectl patch ... resources`, with memory_limit),
-- which rolls every pod. The dump is checked byte for byte (sha256 in the pod
-- and here) before any pod is restarted, so the evidence is never lost with it.
--
--   runbook run heap-dump -p deployment=todo-chatbot-backend -p dir=./dumps
--   runbook run heap-dump -p deployment=todo-chatbot-backend -p dir=./dumps -p restart=true \
--     -p dump_command='jmap -dump:live,format=b,file=/tmp/heap.hprof 1'

name = "heap-dump"
description = "Dump the heap of a deployment's biggest pod, copy it out with a checksum, restart the pod if asked"
replaces = { "003-8", "003-15" }
version = "1.0.0"

params (steps.params) { "deployment", "namespace", "container" }
param "dir" { required = true, help = "local directory the dump is copied into" }
param "dump_file" { default = "/tmp/heap.hprof", help = "where the dump command writes the dump in the pod" }
param "dump_command" { default = "./heapdump /tmp/heap.hprof",
  help = "the app's dump command, run by sh -c in the container (the sandbox's apps have ./heapdump)" }
param "restart" { type = "boolean", default = false, help = "delete the pod after the dump is safe, so it restarts" }
param "memory_limit" { default = "", help = "after the dump is copied out, set the app container's memory limit to this (seed 003: 512Mi); the pods roll" }
param "memory_request" { default = "", help = "and its memory request (seed 003: 256Mi)" }
param "timeout" { type = "duration", default = "5m", help = "how long the dump, the copy and each rollout may take" }

local function opts(ctx, extra)
  local o = { namespace = ctx.params.namespace, container = ctx.params.container ~= "" and ctx.params.container or nil,
    timeout = ctx.params.timeout }
  for k, v in pairs(extra or {}) do o[k] = v end
  return o
end

-- The container the dump and the limit are for: param container, else the template's first (the app).
local function app_container(d, ctx)
  for _, c in ipairs(d.spec.template.spec.containers) do
    if c.name == ctx.params.container then return c end
  end
  if ctx.params.container ~= "" then error(("deployment %s has no container %s"):format(d.metadata.name, ctx.params.container), 0) end
  return d.spec.template.spec.containers[1]
end

step "Find the pod" {
  description = "kubectl top pods --sort-by=memory: the deployment's pod using the most memory",
  run = function(ctx)
    for _, p in ipairs { "memory_limit", "memory_request" } do
      if ctx.params[p] ~= "" and not k8s.quantity(ctx.params[p]) then
        error(("param %s: %q is not a quantity (e.g. 512Mi)"):format(p, ctx.params[p]), 0)
      end
    end
    local d = k8s.get("deploy/" .. ctx.params.deployment, { namespace = ctx.params.namespace })
    local sel = {}
    for k, v in pairs(d.spec.selector.matchLabels) do sel[#sel + 1] = k .. "=" .. v end
    table.sort(sel)
    local top = k8s.top("pods", { namespace = ctx.params.namespace, selector = table.concat(sel, ","), sort_by = "memory" })
    if #top == 0 then error("no pod of " .. ctx.params.deployment .. " reports its memory use") end
    log.info("%s uses the most memory: %d MiB", top[1].name, top[1].memory_bytes // (1024 * 1024))
    return { pod = top[1].name, memory_bytes = top[1].memory_bytes }
  end,
}

step "Dump the heap" {
  description = "kubectl exec POD -- <dump command>; sha256sum of the dump in the pod",
  needs = { "Find the pod" },
  run = function(ctx, found)
    local pod = "pod/" .. found.pod
    local r = k8s.exec(pod, { "sh", "-c", ctx.params.dump_command }, opts(ctx))
    if r.skipped then return { dumped = false } end
    local sum = k8s.exec(pod, { "sha256sum", ctx.params.dump_file }, opts(ctx, { read = true }))
    local size = k8s.exec(pod, { "wc", "-c", ctx.params.dump_file }, opts(ctx, { read = true }))
    local dump = { dumped = true, sha256 = sum.stdout:match("^(%x+)"), bytes = tonumber(size.stdout:match("^%s*(%d+)")) }
    log.info("dump %s: %d bytes, sha256 %s", ctx.params.dump_file, dump.bytes, dump.sha256)
    return dump
  end,
}

step "Copy the dump out" {
  description = "kubectl cp POD:/tmp/heap.hprof DIR/...; sha256sum here must match the pod's",
  needs = { "Find the pod", "Dump the heap" },
  when = function(ctx) return ctx.outputs["Dump the heap"].dumped end,
  run = function(ctx, found, dump)
    local pod = found.pod
    local to = ("%s/heap-%s-%s.hprof"):format(ctx.params.dir, pod, os.date("!%Y%m%dT%H%M%SZ"))
    exec.run { "mkdir", "-p", ctx.params.dir }
    k8s.cp(("pod/%s:%s"):format(pod, ctx.params.dump_file), to, opts(ctx))
    local here = exec.read { "sha256sum", to }.stdout:match("^(%x+)")
    if here ~= dump.sha256 then error(("the copy %s has sha256 %s, the pod's dump %s: not restarting"):format(to, here, dump.sha256)) end
    log.info("copied to %s, sha256 matches", to)
    return { file = to, sha256 = here }
  end,
}

step "Restart the pod" {
  description = "kubectl delete pod POD: the deployment replaces it, with its memory back",
  needs = { "Find the pod", "Copy the dump out" },
  when = function(ctx) return ctx.params.restart end,
  confirm = true,
  run = function(ctx, found)
    local pod = found.pod
    k8s.delete("pod/" .. pod, { namespace = ctx.params.namespace })
    k8s.rollout_status("deploy/" .. ctx.params.deployment, { namespace = ctx.params.namespace, timeout = ctx.params.timeout })
    return { deleted = pod }
  end,
}

step "Raise the memory limit" {
  description = "kubectl patch the app container's memory limit (and request) to memory_limit, after the dump is safe; "
    .. "wait for the pods to roll",
  when = function(ctx) return ctx.params.memory_limit ~= "" end,
  confirm = true,
  run = function(ctx)
    local d = k8s.get("deploy/" .. ctx.params.deployment, { namespace = ctx.params.namespace })
    local c = app_container(d, ctx)
    local now = (c.resources or {}).limits or {}
    local request = ctx.params.memory_request ~= "" and ctx.params.memory_request or nil
    log.info("%s: memory limit %s -> %s%s", c.name, now.memory or "none", ctx.params.memory_limit,
      request and (", request %s -> %s"):format(((c.resources or {}).requests or {}).memory or "none", request) or "")
    steps.set_memory(ctx, ctx.params.deployment, c.name, ctx.params.memory_limit, request)
    k8s.rollout_status("deploy/" .. ctx.params.deployment,
      { namespace = ctx.params.namespace, timeout = ctx.params.timeout, fail_fast = true })
    return { container = c.name, from = now.memory, to = ctx.params.memory_limit }
  end,
}
