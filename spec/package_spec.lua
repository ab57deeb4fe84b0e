-- The Debian package as a new machine gets it: `make deb`, then
-- `apt-get install ./runbook_*.deb` in a fresh Debian 12 root (debootstrap
-- --variant=minbase, cached in build/ and overlaid, so every run starts from
-- the same untouched root), its Depends resolved from Debian's archive. The
-- installed command then runs against the sandbox: version, a shipped
-- runbook's dry run by name, and a team spec through `runbook test`.
local cli = require("spec.support.cli")

local CACHE, DIR = "build/bookworm-minbase", "build/deb-test"
local ROOT = "pkg/debian-root.sh"

local function sh(cmd)
  local p = io.popen("(" .. cmd .. ") 2>&1")
  local out = p:read("a")
  local ok = p:close()
  return ok, out
end

--- Why this machine cannot run the spec, or nil when it can.
local function unavailable()
  if select(2, sh("id -u")):match("%d+") ~= "0" then return "needs root (debootstrap, chroot and mounts)" end
  for _, tool in ipairs { "debootstrap", "dpkg-deb", "dpkg-shlibdeps", "scdoc", "unshare", "chroot" } do
    if not sh("command -v " .. tool) then return tool .. " is not installed" end
  end
  if not sh("unshare --mount true") then return "this machine cannot make a mount namespace" end
  local ok, out = sh(ROOT .. " prepare " .. CACHE)
  if not ok then
    return "no Debian root: debootstrap failed (" .. select(2, sh("tail -3 " .. CACHE .. ".log")):gsub("%s+$", "") .. ")"
  end
  return nil, out
end

--- Run a shell command line as root of the installed machine, from /work,
-- with the sandbox's cluster and nothing else of this machine's environment.
local function in_root(cmd)
  return sh(("%s run %s %s env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root KUBECONFIG=/work/kubeconfig "
    .. "RUNBOOK_STATE_DIR=/work/state RUNBOOK_BIN=runbook sh -c %s"):format(ROOT, CACHE, DIR, cli.quote("cd /work && " .. cmd)))
end

describe("the Debian package", function()
  local why, installed, install_out

  setup(function()
    why = unavailable()
    if why then return end
    local ok, out = sh("make --no-print-directory deb")
    assert(ok, out)
    local deb = out:match("in '([^']+%.deb)'")
    local up = DIR .. "/upper"
    assert(os.execute(("rm -rf %s && mkdir -p %s/work %s/etc && cp %s %s/work/ && cp %s %s/work/kubeconfig && cp -R examples %s/work/ "
      .. "&& cp /etc/resolv.conf %s/etc/"):format(DIR, up, up, deb, up, cli.quote(os.getenv("KUBECONFIG")), up, up, up)))
    -- Recommends left out: ca-certificates' set-up alone took a minute, and nothing here needs it.
    installed, install_out = in_root("DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "
      .. "-o Dpkg::Options::=--force-unsafe-io ./" .. deb)
  end)

  it("installs with apt-get into a bare Debian 12, its Depends resolved from the archive", function()
    if why then return pending(why) end
    assert.is_true(installed, install_out)
    local _, deps = in_root("dpkg-query -W -f '${Depends}' runbook")
    for _, dep in ipairs { "lua-filesystem", "lua-argparse", "lua-luaossl", "lua-zlib", "lua-cjson", "lua-yaml", "lua-busted", "libcurl4", "libpq5", "librdkafka1",
      "libhiredis0.14" } do
      assert.truthy(deps:find(dep, 1, true), dep .. " missing from Depends: " .. deps)
    end
  end)

  it("puts the command, library, runbooks, man page and completions where Debian looks", function()
    if why then return pending(why) end
    local ok, out = in_root("runbook version && ls /usr/share/man/man1/runbook.1.gz /usr/share/bash-completion/completions/runbook "
      .. "/usr/share/zsh/vendor-completions/_runbook /usr/lib/runbook/runbook/k8s.so /usr/share/runbook/runbooks/backup.lua")
    assert.is_true(ok, out)
    assert.matches("^runbook %d+%.%d+%.%d+", out)
    local _, list = in_root("runbook list")
    local _, n = list:gsub("\noutage%-recovery ", "")
    assert.are.equal(1, n, list)
  end)

  it("dry-runs a shipped runbook, by name, against the sandbox", function()
    if why then return pending(why) end
    local ok, out = in_root("runbook run outage-recovery --dry-run -p namespace=todo-chatbot")
    assert.is_true(ok, out)
    assert.matches("dry run ok: 8 ok, 0 failed", out)
    assert.matches("nothing was changed", out)
  end)

  it("runs a team's spec with runbook test", function()
    if why then return pending(why) end
    local ok, out = in_root("runbook test examples/team/spec/deploy_spec.lua")
    assert.is_true(ok, out)
    assert.matches("3 passed, 0 failed", out)
  end)
end)

describe("make install and make uninstall", function()
  teardown(cli.cleanup)

  it("uninstall removes every file install put there", function()
    local dest = cli.tmpdir()
    local make = ("make --no-print-directory DESTDIR=%s PREFIX=/usr "):format(cli.quote(dest))
    local ok, out = sh(make .. "install")
    assert.is_true(ok, out)
    local _, files = sh("find " .. cli.quote(dest) .. " -type f | wc -l")
    assert.is_true(tonumber(files) > 100, files)
    ok, out = sh(make .. "uninstall")
    assert.is_true(ok, out)
    local _, left = sh("find " .. cli.quote(dest) .. " -type f")
    assert.are.equal("", left)
  end)
end)
