--- Steps that several shipped runbooks share, as step tables:
--
--   step "Stop writes" (steps.stop_writers { needs = { "Verify the backup set" } })
--   step "Start writes" (steps.start_writers { stopped = "Stop writes" })
--
-- Each reads the params the runbooks declare for it (named below) and takes
-- the usual step fields (description, needs, confirm ...) from its argument.
local M = {}

local function with(fields, spec)
  for k, v in pairs(fields) do if spec[k] == nil then spec[k] = v end end
  return spec
end

--- The deployments of param `writers` (comma-separated names) as targets.
function M.writers(ctx)
  local list = {}
  for d in ctx.params.writers:gmatch("[^,%s]+") do list[#list + 1] = "deploy/" .. d end
  if #list == 0 then error("param writers: name at least one deployment", 0) end
  return list
end

--- Scale the writers (params writers, namespace, timeout) to 0 and wait until
-- their pods are gone, remembering their replicas; undo starts them again.
function M.stop_writers(t)
  return with(t, {
    description = "Scale the writer deployments to 0 and wait until their pods are gone (replicas remembered)",
    confirm = true,
    run = function(ctx)
      local saved = require("k8s").stop_workloads(M.writers(ctx),
        { namespace = ctx.params.namespace, timeout = ctx.params.timeout })
      for _, s in ipairs(saved) do require("log").info("%s stopped (was %d replicas)", s.target, s.replicas) end
      return { saved = saved }
    end,
    undo = function(ctx, out) require("k8s").start_workloads(out.saved, { timeout = ctx.params.timeout }) end,
  })
end

--- Scale the writers the step `t.stopped` stopped back to their replicas and
-- wait for their rollouts (skipped with it when the operator kept them running).
function M.start_writers(t)
  local stopped = t.stopped
  t.stopped = nil
  return with(t, {
    description = "Scale the writers back to their replicas and wait for their rollouts",
    needs = { stopped },
    run = function(ctx)
      local saved = ctx.outputs[stopped].saved
      require("k8s").start_workloads(saved, { timeout = ctx.params.timeout })
      for _, s in ipairs(saved) do require("log").info("%s back at %d replicas", s.target, s.replicas) end
    end,
  })
end

--- Keep the database (param database_url) as it is now, as a backup set
-- PREFIX..t.suffix-STAMP in param dir.
function M.backup_database(t)
  local suffix = t.suffix
  t.suffix = nil
  return with(t, {
    run = function(ctx)
      local backupset = require "backupset"
      local set = backupset.new(ctx.params.dir, ctx.params.prefix .. suffix)
      local m = backupset.seal(set, { database = backupset.dump_database(set, { url = ctx.params.database_url }) })
      require("log").info("the database as it was is kept in %s", set.final)
      return { path = set.final, files = #m.files }
    end,
  })
end

--- The restored database against the set: row counts against its manifest,
-- and each query of param t.queries returns 0. `t.set(ctx)` is the set's
-- path; `t.kept` names the step that kept the database as it was (for the
-- message). In a dry run, nothing was restored: it shows the state now.
function M.validate(t)
  local set_of, queries, kept = t.set, t.queries, t.kept
  t.set, t.queries, t.kept = nil, nil, nil
  return with(t, {
    run = function(ctx)
      local backupset = require "backupset"
      local path = set_of(ctx)
      local problems = backupset.validate { manifest = backupset.verify(path), url = ctx.params.database_url,
        queries = backupset.queries(ctx.params[queries]) }
      if ctx.dry_run then
        require("log").info("now, before the restore: %s", #problems == 0 and "the database matches the set"
          or table.concat(problems, "; "))
      elseif #problems > 0 then
        local was = not ctx.skipped(kept) and ctx.outputs[kept].path
        error("the restored database is not valid: " .. table.concat(problems, "; ")
          .. (was and ("; the database before the restore is in " .. was) or ""), 0)
      else
        require("log").info("the database matches %s", path)
      end
      return { problems = problems }
    end,
  })
end

return M
