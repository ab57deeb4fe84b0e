-- The dry-run check every runbook spec relies on must see a change in each backend.
local backends = require("spec.support.backends")
local sb = require("spec.sandbox.sandbox_helper")
local kh = require("spec.runbooks.k8s_helper")

local function changed(fn)
  local ok, err = pcall(backends.assert_unchanged, fn)
  assert.is_false(ok, "the change went unnoticed")
  return tostring(err)
end

describe("backends.assert_unchanged", function()
  it("passes when nothing is written, with the workload paused", function()
    assert.are.equal(42, backends.assert_unchanged(function() sb.sleep(1); return 42 end))
  end)

  it("passes while a pod crash-loops: the paused Kubernetes stand-in restarts nothing", function()
    finally(kh.reset_world)
    sb.ctl("k8s crashloop frontend")
    kh.wait_waiting("frontend", "CrashLoopBackOff")
    -- unpaused, its first back-offs (1.5 s, 3 s) would each restart a pod and post events
    local paused = backends.assert_unchanged(function() sb.sleep(5); return kh.restarts("frontend") end)
    assert.truthy(sb.wait_until(20, function() return kh.restarts("frontend") > paused end),
      "the crash loop did not go on after the resume")
  end)

  it("names a changed Kubernetes object", function()
    local err = changed(function()
      local status = sb.k8s("PATCH", "/api/v1/namespaces/todo-chatbot/configmaps/todo-chatbot-config",
        { metadata = { annotations = { ["spec/touched"] = tostring(os.time()) } } })
      assert.are.equal(200, status)
    end)
    assert.matches("k8s configmaps todo%-chatbot/todo%-chatbot%-config: %d+ %-> %d+", err)
  end)

  it("names a changed Postgres table and an advanced sequence", function()
    finally(function() sb.psql("drop table if exists backends_spec") end)
    sb.psql("create table if not exists backends_spec (id serial primary key, v text)")
    local err = changed(function()
      assert(select(2, sb.psql("insert into backends_spec (v) values ('x')")))
    end)
    assert.matches("pg public.backends_spec: 0  %-> 1 %x+", err)
    assert.matches("pg public.backends_spec_id_seq:", err)
    err = changed(function()
      assert(select(2, sb.psql("begin; insert into backends_spec (v) values ('y'); rollback")))
    end)
    assert.not_matches("pg public.backends_spec:", err)
    assert.matches("pg public.backends_spec_id_seq:", err)
  end)

  it("names a changed Redis key", function()
    finally(function() sb.redis("DEL backends-spec") end)
    local err = changed(function() sb.redis("SET backends-spec 1") end)
    assert.matches("redis backends%-spec: added", err)
  end)

  it("names a new message and a moved committed offset", function()
    local err = changed(function()
      local out, ok = sb.sh("printf backends-spec | timeout 20 kcat -P -t reminders -p 0 -b "
        .. sb.quote(sb.env("KAFKA_BROKERS")))
      assert(ok, out)
    end)
    assert.matches("kafka reminders%[0%] high: %d+ %-> %d+", err)
    local ok
    ok, err = pcall(backends.assert_unchanged, function()
      local out, done = sb.kcat("-G backends-spec -X auto.offset.reset=earliest -c 1 -e reminders")
      assert(done, out)
    end, { groups = { "backends-spec" } })
    assert.is_false(ok)
    assert.matches("kafka backends%-spec reminders%[%d%] committed: %-?%d+ %-> %d+", tostring(err))
  end)
end)
