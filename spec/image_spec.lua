-- The container image `make image` builds (no registry: a debootstrap root
-- imported as the base, the .deb installed into it by pkg/Containerfile),
-- run with podman against the sandbox (host network), as the CronJob of
-- examples/team/cronjob.yaml runs it: as its own user, the journal on a
-- volume that outlives the container.
local cli = require("spec.support.cli")

local function sh(cmd)
  local p = io.popen("(" .. cmd .. ") 2>&1")
  local out = p:read("a")
  local ok = p:close()
  return ok, out
end

local BASE = "localhost/runbook-base:bookworm"

--- The podman options this machine needs to run a container: none, else
-- runc (crun refuses cgroups in hybrid mode) and ulimits within the hard
-- limits. Returns them, or nil and why no container can run.
local function podman_opts()
  local _, nofile = sh("ulimit -Hn")
  local _, nproc = sh("ulimit -Hu")
  local last
  for _, opts in ipairs { "", ("--runtime runc --ulimit nofile=%d:%d --ulimit nproc=%d:%d"):format(
      tonumber(nofile) or 1024, tonumber(nofile) or 1024, tonumber(nproc) or 4096, tonumber(nproc) or 4096) } do
    local ok, out = sh(("podman run --rm --network=host %s %s true"):format(opts, BASE))
    if ok then return opts end
    last = out:gsub("%s+$", "")
  end
  return nil, "podman cannot run a container here (" .. last .. ")"
end

local function unavailable()
  if select(2, sh("id -u")):match("%d+") ~= "0" then return "needs root (debootstrap and podman)" end
  for _, tool in ipairs { "podman", "debootstrap", "dpkg-deb" } do
    if not sh("command -v " .. tool) then return tool .. " is not installed" end
  end
  local ok, out = sh("make --no-print-directory base-image")
  if not ok then return "no base image: " .. out:gsub("%s+$", ""):sub(-300) end
  return nil
end

describe("the container image", function()
  local why, opts, image, state, kubeconfig

  local function run(args)
    local parts = {}
    for _, a in ipairs(args) do parts[#parts + 1] = cli.quote(a) end
    return sh(("podman run --rm --network=host %s -v %s:/var/lib/runbook -v %s:/etc/runbook/kubeconfig:ro "
      .. "-e KUBECONFIG=/etc/runbook/kubeconfig %s %s"):format(opts, state, kubeconfig, image, table.concat(parts, " ")))
  end

  setup(function()
    why = unavailable()
    if why then return end
    opts, why = podman_opts()
    if not opts then return end
    local ok, out = sh(("make --no-print-directory image PODMAN_OPTS=%s"):format(cli.quote(opts)))
    assert(ok, out)
    image = out:match("Successfully tagged (%S+)")
    -- the image's user (10001) owns its journal and reads its kubeconfig, as in a pod
    local dir = cli.tmpdir()
    state, kubeconfig = dir .. "/state", dir .. "/kubeconfig"
    assert(os.execute(("install -d -m 700 -o 10001 %s && install -m 600 -o 10001 %s %s")
      :format(state, cli.quote(os.getenv("KUBECONFIG")), kubeconfig)))
  end)
  teardown(cli.cleanup)

  it("is named as the CronJob names it and runs as a user of its own", function()
    if why then return pending(why) end
    assert.matches("^localhost/runbook:%d+%.%d+%.%d+$", image)
    assert.truthy(cli.slurp("examples/team/cronjob.yaml"):find("image: " .. image, 1, true),
      "examples/team/cronjob.yaml does not name " .. image)
    local ok, out = sh(("podman run --rm %s --entrypoint id %s -u"):format(opts, image))
    assert.is_true(ok, out)
    assert.are.equal("10001", out:match("%d+"))
  end)

  it("dry-runs a shipped runbook against the sandbox, and its report survives the container", function()
    if why then return pending(why) end
    local ok, out = run { "run", "outage-recovery", "--dry-run", "-p", "namespace=todo-chatbot" }
    assert.is_true(ok, out)
    assert.matches("dry run ok: 8 ok, 0 failed", out)
    local id = out:match("runbook report (%S+)")
    ok, out = run { "report", id }
    assert.is_true(ok, out)
    assert.truthy(out:find(id, 1, true), out)
    assert.truthy(out:find("Final verification", 1, true), out)
  end)
end)
