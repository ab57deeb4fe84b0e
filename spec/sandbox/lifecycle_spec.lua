-- Starting and stopping the sandbox: `make sandbox` is idempotent, a sandbox
-- starts from an empty state directory on its own free ports, and
-- `make sandbox-stop` leaves no process behind. The fresh start uses a second
-- sandbox (SANDBOX_STATE) so the one the other specs use keeps running.
package.path = "spec/sandbox/?.lua;" .. package.path
local sb = require("sandbox_helper")

local function slurp(path)
    local f = io.open(path)
    if not f then return nil end
    local s = f:read("a")
    f:close()
    return s
end

local function env_of(state)
    local env = {}
    for k, v in (slurp(state .. "/env") or ""):gmatch("export ([%w_]+)='?([^'\n]*)'?") do env[k] = v end
    return env
end

local function port(url) return url:match(":(%d+)/") or url:match(":(%d+)$") end

-- Every process the sandbox in `state` started: recorded pids, PostgreSQL's
-- postmaster, and all their descendants.
local function sandbox_processes(state)
    local pids = {}
    for pid in sb.sh("cat " .. sb.quote(state) .. "/pids/* 2>/dev/null"):gmatch("%d+") do pids[pid] = true end
    local pm = slurp(state .. "/postgres/data/postmaster.pid")
    if pm then pids[pm:match("^(%d+)")] = true end
    local children = {}
    for pid, ppid in sb.sh("ps -e -o pid=,ppid="):gmatch("(%d+)%s+(%d+)") do
        children[ppid] = children[ppid] or {}
        table.insert(children[ppid], pid)
    end
    local all, queue = {}, {}
    for pid in pairs(pids) do queue[#queue + 1] = pid end
    while #queue > 0 do
        local pid = table.remove(queue)
        if not all[pid] then
            all[pid] = true
            for _, c in ipairs(children[pid] or {}) do queue[#queue + 1] = c end
        end
    end
    return all
end

-- The pids still running, after up to 3 s for a SIGKILLed one to go. A zombie
-- has ended: it only waits for PID 1 (the machine's init) to reap it.
local function alive(pids)
    local left
    for _ = 1, 30 do
        left = {}
        for pid in pairs(pids) do
            local stat = sb.sh("ps -o stat= -p " .. pid)
            if stat:match("%S") and not stat:match("Z") then left[#left + 1] = pid end
        end
        if #left == 0 then break end
        sb.sh("sleep 0.1")
    end
    return left
end

describe("sandbox lifecycle", function()
    it("returns at once from a second make sandbox, changing nothing", function()
        local env_before = slurp(sb.state .. "/env")
        local pids_before = sb.sh("cat " .. sb.state .. "/pids/*")
        local wall = sb.sh("s=$(date +%s%N); make -s sandbox >/dev/null 2>&1; echo $((($(date +%s%N) - s) / 1000000))")
        assert.is_true(tonumber(wall:match("%d+")) < 2000, "took " .. wall .. " ms")
        assert.equal(env_before, slurp(sb.state .. "/env"))
        assert.equal(pids_before, (sb.sh("cat " .. sb.state .. "/pids/*")))
    end)

    it("says what runs where with ctl status", function()
        local out, ok = sb.ctl("status")
        assert.is_true(ok, out)
        assert.matches("postgres%s+running%s+127%.0%.0%.1:" .. port(sb.env("DATABASE_URL")), out)
        assert.matches("redis%s+running%s+127%.0%.0%.1:" .. port(sb.env("REDIS_URL")), out)
        assert.matches("kafka%s+running%s+bootstrap=" .. sb.env("KAFKA_BROKERS"):gsub("%p", "%%%0"), out)
        assert.matches("dapr%s+running%s+sidecars: backend=" .. port(sb.env("DAPR_HTTP_ENDPOINT")), out)
        assert.matches("replicas%s+recurring%-task%s+%d", out)
    end)

    it("listens on loopback only", function()
        -- listening sockets of the sandbox's processes, from /proc (no ss needed)
        local pids = {}
        for pid in pairs(sandbox_processes(sb.state)) do pids[#pids + 1] = pid end
        local out, ok = sb.sh("for p in " .. table.concat(pids, " ") .. "; do ls -l /proc/$p/fd 2>/dev/null;"
            .. " done | grep -o 'socket:\\[[0-9]*\\]' | tr -dc '0-9\\n' | sort -u >/tmp/sandbox-spec-inodes.$$;"
            .. " awk 'NR == FNR { ino[$1] = 1; next } FNR > 1 && $4 == \"0A\" && ($10 in ino) { print $2 }'"
            .. " /tmp/sandbox-spec-inodes.$$ /proc/net/tcp /proc/net/tcp6; rm -f /tmp/sandbox-spec-inodes.$$")
        assert.is_true(ok, out)
        local n = 0
        for addr in out:gmatch("%S+") do
            n = n + 1
            assert.matches("^%x%x%x%x%x%x7F:", addr)   -- 127.0.0.0/8 (Redis also on 127.0.0.2 for the TLS specs)
        end
        -- PostgreSQL, Redis, 3 brokers, Kafka control, 5 sidecars, 5 apps, Kubernetes
        assert.is_true(n >= 17, out)
    end)

    it("says so when ctl finds no sandbox", function()
        local out, ok = sb.sh("SANDBOX_STATE=/nonexistent/sandbox " .. sb.sandbox .. "/ctl status")
        assert.is_false(ok)
        assert.matches("the sandbox is not running", out)
    end)

    it("starts from an empty state directory on its own ports and stops leaving no process", function()
        local state = sb.sh("mktemp -d /tmp/runbook-sandbox-spec.XXXXXX"):match("%S+")
        local with_state = "SANDBOX_STATE=" .. sb.quote(state) .. " "
        finally(function()
            sb.sh(with_state .. "make -s sandbox-stop; " .. with_state .. sb.sandbox .. "/down --purge")
        end)
        local out, ok = sb.sh(with_state .. "make -s sandbox")
        assert.is_true(ok, out)
        local seconds = tonumber(out:match("ready in ([%d.]+)s"))
        assert.is_true(seconds < 20, out)   -- about 3.5 s from nothing on the 2-core CI machine

        local env, main = env_of(state), env_of(sb.state)
        for _, name in ipairs({"DATABASE_URL", "REDIS_URL", "KAFKA_BROKERS", "DAPR_HTTP_ENDPOINT", "KUBECONFIG"}) do
            assert.is_string(env[name], name)
            assert.are_not.equal(main[name], env[name], name)
        end
        out, ok = sb.psql("SELECT count(*) FROM tasks", env.DATABASE_URL)
        assert.is_true(ok, out)
        assert.equal(3000, tonumber(out))

        local pids = sandbox_processes(state)
        local n = 0
        for _ in pairs(pids) do n = n + 1 end
        assert.is_true(n >= 5, "expected PostgreSQL, Redis, Kafka, Dapr and Kubernetes processes")
        out, ok = sb.sh(with_state .. "make -s sandbox-stop")
        assert.is_true(ok, out)
        assert.same({}, alive(pids))
        assert.is_nil(slurp(state .. "/env"))
        assert.is_false(select(2, sb.psql("SELECT 1", env.DATABASE_URL)))
        assert.is_false(select(2, sb.sh("curl -s -m 2 " .. env.DAPR_HTTP_ENDPOINT .. "/v1.0/healthz")))
    end)

    it("as root, starts in a new checkout at the path of a deleted one the postgres user could not enter", function()
        if sb.sh("id -u"):match("%d+") ~= "0" then return pending("only root runs PostgreSQL as another user") end
        local private = sb.sh("mktemp -d /tmp/runbook-sandbox-spec.XXXXXX"):match("%S+")  -- mode 700
        local state = private .. "/state"
        local with_state = "SANDBOX_STATE=" .. sb.quote(state) .. " "
        finally(function()
            sb.sh(with_state .. "make -s sandbox-stop; " .. with_state .. sb.sandbox .. "/down --purge; rm -rf "
                .. sb.quote(private))
        end)
        local out, ok = sb.sh(with_state .. "make -s sandbox && " .. with_state .. "make -s sandbox-stop")
        assert.is_true(ok, out)
        local cluster = sb.sh("readlink " .. sb.quote(state .. "/postgres")):match("%S+")
        assert.matches("^/tmp/runbook%-sandbox%-pg%-", cluster)
        sb.sh("rm -rf " .. sb.quote(state))   -- the checkout is deleted without down --purge
        out, ok = sb.sh(with_state .. "make -s sandbox")
        assert.is_true(ok, out)
        out, ok = sb.psql("SELECT count(*) FROM tasks", env_of(state).DATABASE_URL)
        assert.is_true(ok, out)
        assert.equal(3000, tonumber(out))
    end)
end)
