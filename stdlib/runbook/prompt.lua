--- Asking the operator before a step (--step, or a step with confirm = true).
local host = require("runbook.host")

local M = {}

local CHOICES = { y = "run", yes = "run", n = "skip", no = "skip", s = "skip", skip = "skip",
  p = "preview", preview = "preview", a = "all", all = "all", q = "quit", quit = "quit" }

local function say(s)
  host.term_write(s)
end

--- Show `[i/total] name: description` and ask until the answer is one of the
-- choices. Returns "run", "skip", "preview", "all" or "quit" (also at end of input).
function M.step(step, total, stepping)
  local header = ("[%d/%d] %s"):format(step.index, total, step.name)
  if step.description ~= "" then header = header .. ": " .. step.description end
  if step.confirm then header = header .. "  (asks for confirmation)" end
  say("\n" .. header .. "\n")
  local question = stepping and "Run this step? [y]es [n]o/skip [p]review [a]ll [q]uit "
    or "Run this step? [y]es [n]o/skip [p]review [q]uit "
  while true do
    say(question)
    local line = host.read_line()
    if line == nil then say("\n"); return "quit" end
    local choice = CHOICES[line:lower():match("^%s*(.-)%s*$")]
    if choice and (stepping or choice ~= "all") then return choice end
    say("Please answer y, n, p" .. (stepping and ", a" or "") .. " or q.\n")
  end
end

local RESUME_CHOICES = { r = "rerun", rerun = "rerun", s = "skip", skip = "skip", q = "quit", quit = "quit" }

--- On resume, a step that was cut off after changing things: ask whether to
-- run it again, treat it as done, or stop. `effects` are its performed effects.
function M.interrupted_step(step, effects)
  say(("\nStep '%s' was interrupted after it had already:\n"):format(step.name))
  for _, e in ipairs(effects) do say(("  - %s\n"):format(e.summary or (e.module .. " " .. e.op))) end
  say("It is not declared idempotent, so running it again may repeat these.\n")
  while true do
    say("[r]erun it, [s]kip it (treat as done), or [q]uit? ")
    local line = host.read_line()
    if line == nil then say("\n"); return "quit" end
    local choice = RESUME_CHOICES[line:lower():match("^%s*(.-)%s*$")]
    if choice then return choice end
    say("Please answer r, s or q.\n")
  end
end

local UNKNOWN_CHOICES = { r = "redo", redo = "redo", s = "skip", skip = "skip", q = "quit", quit = "quit" }

--- On resume, a step cut off while effects were in flight: whether they
-- happened is unknown. Ask to run it again, treat them as done, or stop.
function M.unknown_step(step, unknown)
  say(("\nStep '%s' was cut off while these effects were in flight; whether they happened is unknown:\n")
    :format(step.name))
  for _, e in ipairs(unknown) do say(("  - %s\n"):format(e.summary or (e.module .. " " .. e.op))) end
  while true do
    say("[r]edo the step, [s]kip it (they happened), or [q]uit? ")
    local line = host.read_line()
    if line == nil then say("\n"); return "quit" end
    local choice = UNKNOWN_CHOICES[line:lower():match("^%s*(.-)%s*$")]
    if choice then return choice end
    say("Please answer r, s or q.\n")
  end
end

return M
