-- Six steps, one countable effect each, for spec/durable/kill_spec.lua. Each
-- effect carries the step's idempotency key (ctx.key), and each step's check
-- looks for it with a read, so a resume can tell whether it happened.
-- `pause` = "STEP:before" or "STEP:after" holds that step there (logging
-- "paused STEP:WHERE") until the run is killed or DIR/go-STEP:WHERE appears; `inflight` makes the command
-- sleep after appending; `nocheck` = "yes" makes every check unable to tell.
name = "durable-effects"
description = "six countable effects"
param "dir" { required = true }
param "kinds" { default = "file,command" }
param "pause" { default = "" }
param "inflight" { default = "0" }
param "nocheck" { default = "no" }
param "namespace" { default = "todo-chatbot" }
param "topic" { default = "durable-effects" }

local function hold(ctx, where)
  local here = ctx.step .. ":" .. where
  if ctx.params.pause ~= here then return end
  log.info("paused %s", here)
  for _ = 1, 600 do
    if fs.exists(ctx.params.dir .. "/go-" .. here) then return end
    time.sleep(0.05)
  end
end

local function acts(ctx, kind) return ("," .. ctx.params.kinds .. ","):find("," .. kind .. ",", 1, true) end

local function has_line(path, key)
  if not fs.exists(path) then return false end
  for line in fs.read(path):gmatch("[^\n]+") do if line == key then return true end end
  return false
end

local function step_of(kind, effect, check)
  step(kind) {
    run = function(ctx)
      if not acts(ctx, kind) then return end
      hold(ctx, "before")
      effect(ctx)
      hold(ctx, "after")
    end,
    check = function(ctx)
      if ctx.params.nocheck == "yes" then return nil end
      return check(ctx)
    end,
  }
end

local function cm_name(ctx) return "durable-" .. ctx.run_id:lower() end

step_of("file", function(ctx)
  fs.write(ctx.params.dir .. "/file.log", ctx.key .. "\n", { append = true })
end, function(ctx) return has_line(ctx.params.dir .. "/file.log", ctx.key) end)

step_of("command", function(ctx)
  exec.run { "sh", "-c", 'echo "$1" >> "$2"; sleep "$3"', "sh", ctx.key, ctx.params.dir .. "/command.log",
    ctx.params.inflight, timeout = 60 }
end, function(ctx) return has_line(ctx.params.dir .. "/command.log", ctx.key) end)

step_of("pg", function(ctx)
  pg.exec("INSERT INTO durable_effects (key) VALUES ($1)", ctx.key)
end, function(ctx) return pg.value("SELECT count(*) FROM durable_effects WHERE key = $1", ctx.key) > 0 end)

step_of("redis", function(ctx)
  redis.command("EVAL", "redis.call('INCR', KEYS[1]); redis.call('SET', KEYS[2], '1'); return 1", "2",
    "durable:count:" .. ctx.key, "durable:mark:" .. ctx.key)
end, function(ctx) return redis.command("EXISTS", "durable:mark:" .. ctx.key) == 1 end)

step_of("k8s", function(ctx)
  k8s.create { apiVersion = "v1", kind = "ConfigMap",
    metadata = { name = cm_name(ctx), namespace = ctx.params.namespace }, data = { key = ctx.key } }
end, function(ctx)
  return k8s.get("configmap/" .. cm_name(ctx), { namespace = ctx.params.namespace, missing_ok = true }) ~= nil
end)

step_of("kafka", function(ctx)
  kafka.produce { topic = ctx.params.topic, key = ctx.key, value = "1" }
end, function(ctx)
  for m in kafka.consume { topic = ctx.params.topic, from = "earliest", timeout = "3s" } do
    if m.key == ctx.key then return true end
  end
  return false
end)
