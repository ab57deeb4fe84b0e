-- hello.lua: a small runbook showing the DSL. Try:
--   runbook describe examples/hello.lua
--   runbook run examples/hello.lua -p name=ops
--   runbook run examples/hello.lua -p name=ops --dry-run
--   runbook run examples/hello.lua -p name=ops --step

name = "hello"
description = "Greets someone, looks at the machine, and writes a note about it"
version = "1.0.0"

param "name" { type = "string", required = true, help = "who to greet" }
param "shout" { type = "boolean", default = false, help = "greet in capitals" }
param "note" { type = "string", default = "/tmp/runbook-hello.txt", help = "where to write the note" }

step "Greet" {
  description = "Say hello and pass the greeting on",
  run = function(ctx)
    local greeting = ("hello, %s"):format(ctx.params.name)
    if ctx.params.shout then greeting = greeting:upper() end
    log.info(greeting)
    return { greeting = greeting }
  end,
}

step "Look around" {
  description = "Read the kernel name and uptime (commands that only read)",
  run = function(ctx)
    local uname = exec.run { "uname", "-sr", read = true }
    local up = fs.read("/proc/uptime"):match("^(%S+)")
    log.info("running on %s, up %s", uname.stdout:gsub("%s+$", ""), time.format(tonumber(up)))
    return { kernel = uname.stdout:gsub("%s+$", ""), uptime = tonumber(up) }
  end,
}

step "Write the note" {
  description = "Write the greeting to a file (a write: reported, not done, in a dry run)",
  needs = { "Greet", "Look around" },
  run = function(ctx)
    local text = ("%s from %s\n"):format(ctx.outputs["Greet"].greeting, ctx.outputs["Look around"].kernel)
    fs.write(ctx.params.note, text)
    return { path = ctx.params.note, bytes = #text }
  end,
  undo = function(ctx) fs.remove(ctx.params.note) end,
}

step "Touch a marker" {
  description = "Run a command that changes something (skipped in a dry run)",
  when = function(ctx) return not ctx.params.shout end,
  run = function(ctx)
    exec.run { "touch", ctx.params.note .. ".done" }
  end,
}
