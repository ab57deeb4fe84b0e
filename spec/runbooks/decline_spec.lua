-- Every shipped runbook, declined at each step that asks for confirmation,
-- one dry run per step through a terminal (--step asks before every step;
-- each answer but that one is y): the run ends coherently, never with a Lua
-- error about ctx.outputs.
local cli = require("spec.support.cli")
local loader = require("runbook.loader")
local sb = require("spec.sandbox.sandbox_helper")
local certs = require("spec.support.certs")

local dir = cli.tmpdir()
local PARAMS = {
  ["backup"] = { "dir=" .. dir },
  ["security-incident"] = { "deployment=todo-chatbot-backend", "dir=" .. dir, "rotate=todo-chatbot-secrets/API_KEY",
    "rotate_all=true", "image=registry.digitalocean.com/todo-chatbot/backend:v1.5.0" },
  ["rotate-secret"] = { "secret=todo-chatbot-secrets", "key=API_KEY" },
  ["cert-check"] = { "renew_secret=todo-chatbot-tls", "cert_file=" .. dir .. "/renewed.crt", "key_file=" .. dir .. "/renewed.key",
    "renew=expiring" },
  ["deploy"] = { "deployment=todo-chatbot-websocket", "tag=v1.5.0", "backup=true", "dir=" .. dir, "smoke_paths=/health" },
  ["blue-green-switch"] = { "from=todo-chatbot-frontend", "tag=v1.5.0", "observe=1s" },
  ["config-update"] = { "object=configmap/todo-chatbot-config", "key=LOG_LEVEL", "value=WARNING" },
  ["consumer-offset-reset"] = { "to=earliest" },
  ["crashloop-triage"] = { "deployment=todo-chatbot-backend", "observe=1s", "fix=restart" },
  ["data-corruption"] = { "dir=" .. dir, "force=true" },
  ["db-pool-exhausted"] = { "idle_for=0s", "running_for=0s", "pool_size=30",
    "db_workload=deployment/todo-chatbot-notification", "restart_db=true" },   -- any workload's pods stand for the database's
  ["kafka-lag-remediation"] = { "threshold=0", "watch=1s", "interval=1s" },
  ["outage-recovery"] = { "settle=1s" },
  ["restore"] = { "dir=" .. dir, "kubernetes=true", "topics=all" },
  ["disaster-recovery"] = { "dir=" .. dir, "force=true" },
  ["rollback"] = { "deployment=todo-chatbot-backend" },
  ["restart"] = { "deployments=todo-chatbot-frontend,todo-chatbot-websocket" },
  ["scale"] = { "deployments=todo-chatbot-frontend,todo-chatbot-websocket", "replicas=3" },
  ["canary-deployment"] = { "deployment=todo-chatbot-backend", "tag=v1.5.0", "interval=1s", "every=1s", "warmup=0s" },
  ["high-error-rate"] = { "service=backend", "replicas=3" },
  ["high-latency"] = { "service=backend" },
  ["hpa"] = { "deployment=todo-chatbot-recurring-task", "max=12", "lag_metric=kafka_consumer_lag" },
  ["heap-dump"] = { "deployment=todo-chatbot-backend", "dir=" .. dir, "restart=true", "memory_limit=512Mi" },
  -- an endpoint that refuses connections: the handshake fails, so the restart is offered
  ["websocket-triage"] = { "websocket_url=ws://127.0.0.1:9/ws", "settle=1s" },
  ["rate-limit"] = { "service=backend", "add_keys=sk-decline-spec-key" },
  ["service-degradation"] = { "deployment=todo-chatbot-notification", "debug_for=1s", "observe=1s" },
  ["maintenance-window"] = { "deployment=todo-chatbot-frontend", "image=registry.digitalocean.com/todo-chatbot/frontend:v1.5.0",
    "reason=declined at the prompt", "backup_dir=" .. dir, "watch=1s", "error_rate_window=10s" },
}

-- Runbooks whose confirm steps depend on metrics the sandbox may not have
-- (a high error rate or latency, a canary's traffic): the run still ends
-- coherently, but an earlier step may skip or fail before the prompt.
-- heap-dump restarts the pod only after a copy, which a dry run does not make.
local MAY_NOT_REACH = { ["heap-dump"] = true, ["canary-deployment"] = true, ["high-error-rate"] = true, ["high-latency"] = true }

-- What a runbook needs in the sandbox to reach its confirm steps.
local SETUP = {
  -- a backup set to restore, with the namespace's objects, a topic and a group's offsets
  ["restore"] = function()
    if not io.open(dir .. "/done") then
      assert.are.equal(0, cli.run({ "run", "runbooks/backup.lua", "-p", "dir=" .. dir, "-p", "kubernetes=true",
        "-p", "topics=reminders-dlq", "-p", "groups=recurring-task-service:task-events", "--yes" }).code)
      io.open(dir .. "/done", "w"):close()
    end
  end,
  -- a session idle in a transaction and one running a query (ended after the run)
  ["db-pool-exhausted"] = function()
    for _, sql in ipairs { "BEGIN;\\nSELECT 1;", "SELECT pg_sleep(30);" } do
      local p = io.popen(("sh -c \"(printf '%s\\n'; sleep 30) | PGAPPNAME=decline-spec psql -X -q %s\" "
        .. ">/dev/null 2>&1 & echo $!"):format(sql, sb.env("DATABASE_URL")))
      p:close()
    end
    assert(sb.wait_until(10, function()
      return sb.psql("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'decline-spec' "
        .. "AND state IN ('idle in transaction', 'active')"):match("^%s*2") end), "no idle session and running query")
  end,
}
-- a TLS Secret to renew, and the certificate to renew it with
SETUP["cert-check"] = function()
  if not io.open(dir .. "/renewed.crt") then
    certs.make(dir, "renewed", { cn = "todo.example.com", sans = "DNS:todo.example.com", days = 90 })
  end
  -- (already there from the step before, unless a reset removed it)
  sb.kubectl(("-n todo-chatbot create secret tls todo-chatbot-tls --cert=%s --key=%s"):format(
    cli.quote(dir .. "/renewed.crt"), cli.quote(dir .. "/renewed.key")))
end
-- crowded websocket pods, so that the scale-out is offered (cleared after each run)
SETUP["websocket-triage"] = function() assert(select(2, sb.ctl("dapr ws-load websocket 900"))) end
SETUP["data-corruption"] = SETUP["restore"]
SETUP["disaster-recovery"] = SETUP["restore"]
SETUP["maintenance-window"] = SETUP["restore"]   -- a recent backup set

local function runbooks()
  local p = io.popen("ls runbooks/*.lua")
  local out = {}
  for f in p:lines() do out[#out + 1] = f end
  p:close()
  return out
end

describe("declining a step at the prompt", function()
  teardown(cli.cleanup)
  after_each(function()
    sb.psql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'decline-spec'")
    sb.ctl("dapr ws-load websocket 0")
  end)
  for _, file in ipairs(runbooks()) do
    local rb = loader.load(file)
    for _, step in ipairs(rb.steps) do
      if step.confirm then
        it(("%s: '%s'"):format(rb.name, step.name), function()
          local args = { "run", file, "--dry-run", "--step" }
          for _, kv in ipairs(PARAMS[rb.name] or {}) do args[#args + 1] = "-p"; args[#args + 1] = kv end
          if SETUP[rb.name] then SETUP[rb.name]() end
          local code, out = cli.pty("", args, { RUNBOOK_STATE_DIR = cli.tmpdir(), PTY_DECLINE = step.name })
          assert.falsy(out:find("ctx.outputs", 1, true), out)
          assert.falsy(out:find("traceback", 1, true), out)
          assert.truthy(code == 0 or code == 1, out)
          if not MAY_NOT_REACH[rb.name] then
            assert.truthy(out:find(step.name .. " skipped (by the operator)", 1, true), out)
          else
            assert.truthy(out:find(step.name .. " skipped", 1, true) or code == 1 and out:find(" failed after ", 1, true), out)
          end
        end)
      end
    end
  end
end)

-- The operator's view of two observations (see spec/operator_spec.lua for the rest).
describe("an operator at a terminal", function()
  teardown(cli.cleanup)

  it("declines a step that later steps need: they are skipped with that reason, not failed", function()
    local code, out = cli.pty("", { "run", "runbooks/outage-recovery.lua", "--step", "--dry-run", "-p", "settle=1s" },
      { RUNBOOK_STATE_DIR = cli.tmpdir(), PTY_DECLINE = "Restart unhealthy deployments" })
    assert.are.equal(0, code, out)
    assert.truthy(out:find("Restart unhealthy deployments skipped (by the operator)", 1, true), out)
    assert.truthy(out:find("Wait for rollouts skipped (it needs 'Restart unhealthy deployments', which was skipped)",
      1, true), out)
    assert.falsy(out:find("ctx.outputs", 1, true), out)
  end)

  it("previews a batched purge as a plan that ends: 'would delete N rows in M batches'", function()
    local code, out = cli.pty("p,n", { "run", "runbooks/db-maintenance.lua", "-p", "batch_size=10" },
      { RUNBOOK_STATE_DIR = cli.tmpdir() })
    assert.are.equal(0, code, out)
    assert.truthy(out:find("would delete %d+ rows from checkpoints in %d+ batches of 10"), out)
    assert.truthy(out:find("Purge old rows skipped (by the operator)", 1, true), out)
  end)

  it("previews waits as what they would wait for, returning at once", function()
    local rb = cli.runbook([[
name = "waits" description = "d"
step "Wait" { confirm = true, run = function()
  k8s.rollout_status("deploy/todo-chatbot-backend", { namespace = "todo-chatbot", timeout = "5m" })
  k8s.wait("pods", "condition=Ready=False", { namespace = "todo-chatbot",
    selector = "app.kubernetes.io/component=backend", timeout = "10m" })
  time.wait_until({ timeout = "10m", what = "the queue to drain" }, function() return false end)
end }
]])
    local code, out = cli.pty("p,n", { "run", rb }, { RUNBOOK_STATE_DIR = cli.tmpdir() })
    assert.are.equal(0, code, out)
    assert.truthy(out:find("would wait up to 5m for the rollout of deploy/todo-chatbot-backend", 1, true), out)
    assert.truthy(out:find("would wait up to 10m for condition=Ready=False of pods", 1, true), out)
    assert.truthy(out:find("would wait up to 10m for the queue to drain", 1, true), out)
  end)
end)
