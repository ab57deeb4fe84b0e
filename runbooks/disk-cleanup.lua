-- disk-cleanup.lua: what fills a deployment's pods' log volume, and the old
-- rotated logs removed.
--
-- Replaces seed 004 "Log Rotation" (`kubectl exec ... -- du -sh /var/log`) and
-- seed 001 "Log Cleanup": in each pod of the deployment, the volume's use and
-- its largest entries; then, through the gate, the rotated logs older than
-- `older_than` are deleted (the live logs are never touched), and the space
-- freed is measured. A dry run lists what would be deleted and deletes nothing.
--
--   runbook run disk-cleanup -p deployment=todo-chatbot-backend --dry-run
--   runbook run disk-cleanup -p deployment=todo-chatbot-backend -p older_than=3d --yes

name = "disk-cleanup"
description = "Find what fills a deployment's pods' log volume and delete old rotated logs"
replaces = { "004-16" }
version = "1.0.0"

params (steps.params) { "deployment", "namespace", "container" }
param "path" { default = "/var/log", help = "the directory that fills up" }
param "older_than" { type = "duration", default = "7d", help = "rotated logs older than this are deleted" }

-- Rotated logs: app.log.1, app.log.2.gz ... never the live app.log.
local ROTATED = { "-name", "*.log.[0-9]*" }

local function pods(ctx)
  local d = k8s.get("deploy/" .. ctx.params.deployment, { namespace = ctx.params.namespace })
  local names = {}
  for _, p in ipairs(k8s.list("pods", { namespace = ctx.params.namespace, selector = d.spec.selector.matchLabels })) do
    if (p.status or {}).phase == "Running" then names[#names + 1] = p.metadata.name end
  end
  table.sort(names)
  return names
end

local function opts(ctx, extra)
  local o = { namespace = ctx.params.namespace, container = ctx.params.container ~= "" and ctx.params.container or nil }
  for k, v in pairs(extra or {}) do o[k] = v end
  return o
end

-- Kilobytes used under path in one pod.
local function used_kb(ctx, pod)
  local r = k8s.exec("pod/" .. pod, { "du", "-sk", ctx.params.path }, opts(ctx, { read = true }))
  return tonumber(r.stdout:match("^(%d+)")) or 0
end

local function find_args(ctx, tail)
  local days = math.floor(ctx.params.older_than / 86400)
  local argv = { "find", ctx.params.path, "-type", "f", ROTATED[1], ROTATED[2], "-mtime", "+" .. math.max(days - 1, 0) }
  for _, a in ipairs(tail) do argv[#argv + 1] = a end
  return argv
end

step "Measure the volume" {
  description = "kubectl exec POD -- df -k / du -sk /var/log/*: use and the largest entries in each pod",
  run = function(ctx)
    local out = {}
    for _, pod in ipairs(pods(ctx)) do
      local df = k8s.exec("pod/" .. pod, { "df", "-k", ctx.params.path }, opts(ctx, { read = true }))
      local last = df.stdout:gsub("%s+$", ""):match("([^\n]*)$")
      local use = last:match("(%d+)%%")
      local du = k8s.exec("pod/" .. pod, { "sh", "-c", 'du -sk "$1"/* | sort -rn | head -5', "sh", ctx.params.path },
        opts(ctx, { read = true }))
      log.info("%s: %s %d KB, volume %s%% full", pod, ctx.params.path, used_kb(ctx, pod), use or "?")
      for line in du.stdout:gmatch("[^\n]+") do log.info("  %s", line) end
      local old = k8s.exec("pod/" .. pod, find_args(ctx, { "-print" }), opts(ctx, { read = true }))
      local files = {}
      for f in old.stdout:gmatch("[^\n]+") do files[#files + 1] = f end
      log.info("  %d rotated log(s) older than %s", #files, duration.format(ctx.params.older_than))
      out[pod] = { used_kb = used_kb(ctx, pod), volume_use = tonumber(use), old_files = files }
    end
    return out
  end,
}

step "Delete old rotated logs" {
  description = "kubectl exec POD -- find /var/log -name '*.log.[0-9]*' -mtime +N -delete (through the gate)",
  needs = { "Measure the volume" },
  run = function(ctx)
    local deleted = {}
    for pod, m in pairs(ctx.outputs["Measure the volume"]) do
      if #m.old_files > 0 then
        local r = k8s.exec("pod/" .. pod, find_args(ctx, { "-print", "-delete" }), opts(ctx))
        local n = 0
        for _ in r.stdout:gmatch("[^\n]+") do n = n + 1 end
        deleted[pod] = r.skipped and #m.old_files or n
      end
    end
    return { deleted = deleted }
  end,
}

step "Verify the space freed" {
  description = "du -sk again in each pod",
  needs = { "Measure the volume" },
  when = function() return not gate.dry_run() end,
  run = function(ctx)
    local freed = {}
    for pod, m in pairs(ctx.outputs["Measure the volume"]) do
      freed[pod] = m.used_kb - used_kb(ctx, pod)
      log.info("%s: %d KB freed", pod, freed[pod])
      local left = k8s.exec("pod/" .. pod, find_args(ctx, { "-print" }), opts(ctx, { read = true }))
      if left.stdout ~= "" then error(("%s still has rotated logs older than %s: %s"):format(pod,
        duration.format(ctx.params.older_than), left.stdout:gsub("\n", " "))) end
    end
    return { freed_kb = freed }
  end,
}
