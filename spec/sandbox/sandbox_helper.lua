-- Shared by the sandbox specs: run the real clients (psql, redis-cli, kcat,
-- curl) against the running sandbox and read its state.
local M = {}

local here = debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or "."
M.sandbox = here .. "/../../examples/sandbox"
-- The sandbox of SANDBOX_STATE when set (spec/suite gives each worker its own).
M.state = os.getenv("SANDBOX_STATE") or M.sandbox .. "/.state"

function M.quote(s)
    return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

-- Runs a shell command; returns its output (stdout and stderr) and whether it exited 0.
-- A spec may have put the host in dry-run mode, where io.popen refuses: the
-- spec's own client is no runbook's, so it runs in run mode.
function M.sh(cmd)
    local host = require("runbook.host")
    local mode = host.mode()
    host.set_mode("run")
    local ok, p = pcall(io.popen, "(" .. cmd .. ") 2>&1; echo \"__rc=$?\"")
    host.set_mode(mode)
    assert(ok and p, p)
    local out = p:read("a")
    p:close()
    local rc = tonumber(out:match("__rc=(%d+)%s*$"))
    return out:gsub("__rc=%d+%s*$", ""), rc == 0
end

-- Runs shell commands at once; returns their outputs and whether each exited 0, in order.
function M.sh_all(cmds)
    local dir = M.sh("mktemp -d"):match("%S+")
    local jobs = {}
    for i, cmd in ipairs(cmds) do
        jobs[i] = ("(%s) >%s/%d 2>&1; echo $? >%s/%d.rc &"):format(cmd, dir, i, dir, i)
    end
    M.sh(table.concat(jobs, "\n") .. "\nwait")
    local outs, oks = {}, {}
    for i in ipairs(cmds) do
        local f = io.open(dir .. "/" .. i)
        outs[i] = f and f:read("a") or ""
        if f then f:close() end
        f = io.open(dir .. "/" .. i .. ".rc")
        oks[i] = f and f:read("n") == 0
        if f then f:close() end
    end
    os.execute("rm -rf " .. M.quote(dir))
    return outs, oks
end

-- The sandbox's environment, read from .state/env on every call, so specs
-- still work after a spec restarted the sandbox on new ports.
function M.env(name)
    local f = io.open(M.state .. "/env")
    if f then
        for line in f:lines() do
            local k, v = line:match("^export ([%w_]+)='?(.-)'?$")
            if k == name then
                f:close()
                return v
            end
        end
        f:close()
    end
    return os.getenv(name)
end

function M.ctl(args)
    return M.sh(M.sandbox .. "/ctl " .. args)
end

function M.psql(sql, url)
    return M.sh("psql -X -A -t -v ON_ERROR_STOP=1 " .. M.quote(url or M.env("DATABASE_URL"))
        .. " -c " .. M.quote(sql))
end

function M.redis(args)
    return M.sh("redis-cli --no-auth-warning -u " .. M.quote(M.env("REDIS_URL")) .. " " .. args)
end

-- The sidecar endpoint of one app id (each app has its own sidecar).
function M.dapr_endpoint(app)
    if not app or app == "backend" then return M.env("DAPR_HTTP_ENDPOINT") end
    local f = assert(io.open(M.state .. "/dapr.json"))
    local doc = require("cjson").decode(f:read("a"))
    f:close()
    return assert(doc[app], "no sidecar for " .. app).endpoint
end

-- curl against a sidecar (the backend's unless `app` says otherwise); returns
-- the HTTP status, the body and the headers.
function M.dapr(method, path, body, headers, app)
    local hfile = os.tmpname()
    local cmd = "curl -s -m 20 -D " .. hfile .. " -X " .. method
    for _, h in ipairs(headers or {}) do cmd = cmd .. " -H " .. M.quote(h) end
    if body then cmd = cmd .. " --data-binary " .. M.quote(body) end
    local out = M.sh(cmd .. " " .. M.quote(M.dapr_endpoint(app) .. path))
    local f = io.open(hfile)
    local head = f and f:read("a") or ""
    if f then f:close() end
    os.remove(hfile)
    return tonumber(head:match("^HTTP/%S+ (%d+)")), out, head
end

function M.kcat(args)
    return M.sh("timeout 20 kcat -b " .. M.quote(M.env("KAFKA_BROKERS")) .. " " .. args)
end

-- High watermarks per partition ({[0] = n, ...}) from `kcat -Q` (ListOffsets, latest).
-- The lines of a whole topic as kcat prints them in format `fmt`, sorted.
function M.topic_lines(topic, fmt)
    local out, ok = M.kcat(("-C -t %s -e -q -f '%s'"):format(topic, fmt))
    assert(ok, out)
    local lines = {}
    for l in out:gmatch("[^\n]+") do lines[#lines + 1] = l end
    table.sort(lines)
    return lines
end

function M.watermarks(topic, partitions)
    return M.all_watermarks({ [topic] = partitions })[topic]
end

-- The same for many topics ({topic = partitions}) in one `kcat -Q`: {topic = {[0] = n, ...}}.
function M.all_watermarks(topics)
    local args, marks = {}, {}
    for topic, partitions in pairs(topics) do
        marks[topic] = {}
        for p = 0, partitions - 1 do args[#args + 1] = "-t " .. topic .. ":" .. p .. ":-1" end
    end
    local out, ok = M.kcat("-Q " .. table.concat(args, " "))
    assert(ok, out)
    for topic, p, offset in out:gmatch("(%S+) %[(%d+)%] offset (%-?%d+)") do
        marks[topic][tonumber(p)] = tonumber(offset)
    end
    return marks
end

-- Committed offsets against high watermarks. kcat has no read-only way to show a
-- group's committed offsets: `kcat -C -o stored -X group.id=G` starts from them but
-- commits what it consumed, moving the group (it did, in a trial). So committed
-- offsets come from `kafka-sandbox lag`, a separate librdkafka process that only
-- sends OffsetFetch and ListOffsets (no JoinGroup, no commit); specs cross-check
-- its high watermarks with kcat -Q.
local function lag_cmd(group, topic)
    -- Built once per checkout, in the first sandbox's state (examples/sandbox/lib.sh).
    return M.sandbox .. "/.state/bin/kafka-sandbox lag " .. M.quote(M.env("KAFKA_BROKERS")) .. " " .. group .. " " .. topic
end

local function parse_lag(out, ok)
    assert(ok, out)
    local parts = {}
    for t, p, committed, high in out:gmatch("(%S+) (%d+) (%-?%d+) (%d+) %-?%d+\n") do
        parts[#parts + 1] = {topic = t, partition = tonumber(p), committed = tonumber(committed),
                             high = tonumber(high)}
    end
    return tonumber(out:match("total (%-?%d+)")), parts
end

function M.lag(group, topic)
    return parse_lag(M.sh(lag_cmd(group, topic)))
end

-- M.lag of each {group, topic} of `list`, run at once: {{total, parts}, ...} in order.
function M.lags(list)
    local cmds = {}
    for i, gt in ipairs(list) do cmds[i] = lag_cmd(gt[1], gt[2]) end
    local outs, oks = M.sh_all(cmds)
    local lags = {}
    for i in ipairs(list) do lags[i] = table.pack(parse_lag(outs[i], oks[i])) end
    return lags
end

-- The replica count the simulated consumers of a deployment scale with.
function M.replicas(deployment)
    local f = io.open(M.state .. "/replicas/" .. deployment)
    local n = f and tonumber(f:read("l"))
    if f then f:close() end
    return n
end

local function named(list, name)
    for _, item in ipairs(list) do
        if item.name == name then return item end
    end
    error("kubeconfig has no entry " .. name)
end

-- curl with KUBECONFIG's current context (server, CA and bearer token) for
-- the Kubernetes stand-in; kubectl is not a Debian package. Returns the start
-- of the command line, the server's URL and a function removing the CA's files.
local function k8s_curl()
    local f = assert(io.open(M.env("KUBECONFIG")))
    local cfg = require("lyaml").load(f:read("a"))
    f:close()
    local ctx = named(cfg.contexts, cfg["current-context"]).context
    local cluster = named(cfg.clusters, ctx.cluster).cluster
    local user = named(cfg.users, ctx.user).user
    local ca = os.tmpname()
    f = assert(io.open(ca, "w"))
    f:write(cluster["certificate-authority-data"])
    f:close()
    local curl = ("base64 -d -i %s > %s.pem && curl -s -m 20 --cacert %s.pem -H %s"):format(
        ca, ca, ca, M.quote("Authorization: Bearer " .. user.token))
    return curl, cluster.server, function()
        os.remove(ca)
        os.remove(ca .. ".pem")
    end
end

-- curl against the Kubernetes stand-in. Returns the HTTP status and the decoded body.
function M.k8s(method, path, body)
    local curl, server, done = k8s_curl()
    local cmd = ("%s -X %s -w '\n%%{http_code}' %s"):format(curl, method, M.quote(server .. path))
    if body then
        cmd = cmd .. " -H 'Content-Type: application/merge-patch+json' --data-binary "
            .. M.quote(require("cjson").encode(body))
    end
    local out = M.sh(cmd)
    done()
    local text, status = out:match("^(.*)\n(%d+)%s*$")
    local ok, doc = pcall(require("cjson").decode, text or "")
    return tonumber(status), ok and doc or out
end

-- GETs of every path of `paths` in one curl (one connection):
-- {{status, body}, ...} in order, as M.k8s returns them.
function M.k8s_get_all(paths)
    local curl, server, done = k8s_curl()
    local dir = M.sh("mktemp -d"):match("%S+")
    local cmd = { curl, "-w '%{http_code}\\n'" }
    for i, path in ipairs(paths) do cmd[#cmd + 1] = ("-o %s/%d %s"):format(dir, i, M.quote(server .. path)) end
    local out = M.sh(table.concat(cmd, " "))
    done()
    local got, i = {}, 0
    for status in out:gmatch("%d+") do
        i = i + 1
        local f = io.open(dir .. "/" .. i)
        local text = f and f:read("a") or ""
        if f then f:close() end
        local ok, doc = pcall(require("cjson").decode, text)
        got[i] = { tonumber(status), ok and doc or text }
    end
    os.execute("rm -rf " .. M.quote(dir))
    return got
end

-- An instant query with curl against the sandbox's Prometheus: {{labels, value}, ...}.
function M.promql(q)
    local out, ok = M.sh("curl -s -m 10 -G --data-urlencode " .. M.quote("query=" .. q) .. " "
        .. M.quote(M.env("PROMETHEUS_URL") .. "/api/v1/query"))
    assert(ok, out)
    local doc = require("cjson").decode(out)
    assert(doc.status == "success", out)
    local rows = {}
    for i, r in ipairs(doc.data.result) do rows[i] = { labels = r.metric, value = tonumber(r.value[2]) } end
    return rows
end

-- kubectl with the sandbox's kubeconfig, the manifest (YAML) on stdin when given.
function M.kubectl(args, manifest)
    local cmd = "KUBECONFIG=" .. M.quote(M.env("KUBECONFIG")) .. " kubectl --cache-dir " .. M.quote(M.state .. "/kubectl-cache")
        .. " " .. args
    if manifest then cmd = "printf '%s' " .. M.quote(manifest) .. " | " .. cmd end
    return M.sh(cmd)
end

function M.sleep(s)
    os.execute("sleep " .. s)
end

-- Polls fn until it returns a truthy value or `seconds` pass; returns that value.
function M.wait_until(seconds, fn)
    local deadline = os.time() + seconds
    repeat
        local v = fn()
        if v then return v end
        M.sleep(0.2)
    until os.time() > deadline
    return fn()
end

-- The 5xx share of each service and version over the last 10 s (as the
-- metric specs' runbooks read it), above `above`: {"service version"...}.
function M.erroring(above)
    local out = {}
    for _, r in ipairs(M.promql('sum by (service, version) (rate(http_requests_total{status=~"5.."}[10s]))'
        .. ' / sum by (service, version) (rate(http_requests_total[10s])) > ' .. above)) do
        out[#out + 1] = r.labels.service .. " " .. tostring(r.labels.version)
    end
    return out
end

-- Ends the metric faults and waits until no service and version fails more
-- than 1% over a 10 s window: a later spec must not read this one's errors.
function M.metrics_reset()
    M.ctl("metrics reset")
    assert(M.wait_until(60, function() return #M.erroring(0.01) == 0 end),
        "errors still showing 60 s after the faults ended: " .. table.concat(M.erroring(0.01), ", "))
end

-- Ends the metric faults and waits (90 s at most) until the namespace's 5xx
-- share over 1m, which outage-recovery's gate holds under 1%, is under 0.5%:
-- faults an earlier spec injected must first leave that window.
function M.settle_error_rate()
    M.ctl("metrics reset")
    local q = 'sum(rate(http_requests_total{namespace="todo-chatbot",status=~"5.."}[1m]))'
        .. ' / sum(rate(http_requests_total{namespace="todo-chatbot"}[1m]))'
    assert(M.wait_until(90, function()
        local rows = M.promql(q)
        return #rows == 0 or rows[1].value < 0.005
    end), "the namespace's error rate did not settle under 0.5% within 90 s")
end

return M
