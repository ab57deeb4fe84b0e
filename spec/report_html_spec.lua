-- `runbook report ID --html`: one self-contained page (inline CSS, an inline
-- SVG timeline with a bar per step coloured by its status, every step with its
-- logs and effects, everything escaped, secrets masked), rendered by headless
-- Chromium to check the DOM it builds from it.
local cli = require("spec.support.cli")

local RB = [[
name = "html <report>" description = "steps of every status"
param "token" { type = "string", secret = true }
param "dir" { type = "string", required = true }
step "Write <b>it</b> & \"quote\"" {
  run = function(ctx)
    log.info("token is %s; <script>alert(1)</script>", ctx.params.token)
    fs.write(ctx.params.dir .. "/out", "x")
  end,
}
step "Never" { when = function() return false end, run = function() end }
step "Break" { run = function() log.warn("about to break\nsecond line"); error("broken with " .. "<i>tags</i>") end }
]]

local STATUSES = { "ok", "skipped", "failed" }
local COLOURS = { ok = "#2da44e", skipped = "#8c959f", failed = "#cf222e" }

local sh = cli.sh

describe("report --html", function()
  teardown(cli.cleanup)

  it("is one self-contained, escaped page that Chromium renders with the SVG timeline and every step", function()
    local state, dir = cli.tmpdir(), cli.tmpdir()
    local env = { RUNBOOK_STATE_DIR = state }
    local r = cli.run({ "run", cli.runbook(RB), "-p", "token=hunter2-s3cr3t", "-p", "dir=" .. dir }, env)
    assert.are.equal(1, r.code, r.stdout .. r.stderr)
    local id = r.stdout:match("runbook resume (%S+)")
    local rep = cli.run({ "report", id, "--html" }, env)
    assert.are.equal(0, rep.code, rep.stderr)
    local page = rep.stdout
    assert.are.equal(page, cli.run({ "report", id, "--format", "html" }, env).stdout)
    local both = cli.run({ "report", id, "--html", "--format", "json" }, env)
    assert.are.equal(2, both.code)
    assert.matches("--html and --format json ask for different formats", both.stderr, 1, true)
    assert.matches("^<!DOCTYPE html>\n", page)
    assert.matches("<style>", page, 1, true)
    for _, external in ipairs { "<script", "<link", "src=", "href=", "url(", "@import", "http://", "https://" } do
      assert.is_nil(page:find(external, 1, true), external)
    end
    assert.is_nil(page:find("hunter2", 1, true))
    assert.matches("token is *** ; &lt;script&gt;alert(1)&lt;/script&gt;", page:gsub("%*%*%* ?", "*** "), 1, true)
    assert.matches("Write &lt;b&gt;it&lt;/b&gt; &amp; &quot;quote&quot;", page, 1, true)
    assert.matches("broken with &lt;i&gt;tags&lt;/i&gt;", page, 1, true)

    if not os.execute("command -v chromium >/dev/null 2>&1") then return pending("chromium is not installed") end
    local file = cli.tmpdir() .. "/report.html"
    local f = assert(io.open(file, "w"))
    f:write(page)
    f:close()
    -- No display: headless needs none, and an inherited DISPLAY must not be used.
    -- As root Chromium needs --no-sandbox; a profile of its own keeps it from
    -- sharing state with another Chromium on the machine; a container's small
    -- /dev/shm would crash its renderer.
    local log = cli.tmpdir() .. "/chromium.log"
    local dom = sh(("env -u DISPLAY -u WAYLAND_DISPLAY timeout 120 chromium --headless --no-sandbox --disable-gpu"
      .. " --disable-dev-shm-usage --no-first-run --user-data-dir=%s --dump-dom file://%s 2>%s"):format(
      cli.tmpdir(), file, log))
    -- The DOM Chromium built, not the file: it adds tbody to every table.
    assert.matches("<tbody>", dom, 1, true, "chromium wrote no DOM:\n" .. cli.slurp(log):sub(-2000))
    local svg = dom:match('<svg class="timeline".-</svg>')
    assert.truthy(svg, dom)
    local bars = {}
    for step, status, fill in svg:gmatch('<g class="bar" data%-step="(.-)" data%-status="(%a+)">.-fill="(#%x+)"') do
      bars[#bars + 1] = { step = step, status = status, fill = fill }
    end
    assert.are.equal(#STATUSES, #bars)
    for i, status in ipairs(STATUSES) do
      assert.are.equal(status, bars[i].status)
      assert.are.equal(COLOURS[status], bars[i].fill)
    end
    local ENTITIES = { lt = "<", gt = ">", quot = '"', ["#39"] = "'", amp = "&" }
    assert.are.equal('Write <b>it</b> & "quote"', (bars[1].step:gsub("&(#?%w+);", ENTITIES)))
    for i = 1, #STATUSES do
      local section = dom:match('<section class="step" id="step%-' .. i .. '".-</section>')
      assert.truthy(section, "step " .. i)
      assert.matches("<h4>Effects</h4>", section, 1, true)
      assert.matches("<h4>Log</h4>", section, 1, true)
    end
    local first = dom:match('<section class="step" id="step%-1".-</section>')
    assert.matches("<b>done</b> write 1 bytes to " .. dir .. "/out", first, 1, true)
    assert.matches("INFO  token is ***", first, 1, true)
    local third = dom:match('<section class="step" id="step%-3".-</section>')
    assert.matches("WARN  about to break\n%d%d%d%d%-.- WARN  second line", third)
    assert.is_nil(dom:find("hunter2", 1, true))
    assert.is_nil(dom:find("<script", 1, true))
  end)
end)
