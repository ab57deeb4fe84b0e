-- kafka-topics.lua: list the topics, describe one or all (partitions, leaders,
-- replicas, ISR, offsets, configuration), and name what is wrong. Only reads.
--
-- Replaces seed 002 "List Topics" and "Describe Topic" (kafka-topics.sh --list
-- and --describe --topic task-events), adding what those leave to the reader:
-- brokers that do not answer, partitions without a leader or led by such a
-- broker, replicas missing from the ISR. The run fails (exit 1) naming each.
-- A topic's configuration comes from the admin API (DescribeConfigs), which
-- librdkafka's mock brokers do not implement: there it is reported unavailable.
--
--   runbook run kafka-topics
--   runbook run kafka-topics -p topic=task-events

name = "kafka-topics"
description = "List Kafka topics, describe one or all (leaders, replicas, ISR, offsets, config); name unreachable brokers and unhealthy partitions"
replaces = { "002-7" }
version = "1.0.0"

param "topic" { default = "", help = "the topic to describe (default: every topic)" }
param "config_timeout" { type = "duration", default = "10s", help = "how long DescribeConfigs may take" }

step "List the topics" {
  description = "kafka-topics.sh --list: every topic with its partitions",
  run = function()
    local names = {}
    for _, t in ipairs(kafka.topics()) do
      names[#names + 1] = t.name
      log.info("%-30s %d partitions", t.name, t.partitions)
    end
    return { topics = names }
  end,
}

step "Check the brokers" {
  description = "Each broker answers (ApiVersions) and leads partitions",
  run = function()
    local down = {}
    for _, b in ipairs(kafka.brokers { probe_timeout = "2s" }) do
      log.info("broker %s (%s:%d): %s, leads %d partitions", tostring(b.id), b.host, b.port,
        b.reachable and "reachable" or ("unreachable: " .. tostring(b.reason)), b.leader_for or 0)
      if not b.reachable then down[#down + 1] = b.id end
    end
    return { down = down }
  end,
}

step "Describe" {
  description = "kafka-topics.sh --describe: each partition's leader, replicas, ISR and offsets, and the topic's configuration",
  needs = { "List the topics", "Check the brokers" },
  run = function(ctx)
    local down = {}
    for _, id in ipairs(ctx.outputs["Check the brokers"].down) do down[id] = true end
    local problems = {}
    local topics = ctx.params.topic ~= "" and { ctx.params.topic } or ctx.outputs["List the topics"].topics
    for _, name in ipairs(topics) do
      local t = kafka.describe_topic(name)
      local ok, configs = pcall(kafka.describe_configs, name, { timeout = ctx.params.config_timeout })
      log.info("Topic: %s  PartitionCount: %d  Configs: %s", name, #t.partitions,
        ok and json.encode(configs) or ("unavailable (" .. tostring(configs) .. ")"))
      for _, p in ipairs(t.partitions) do
        log.info("  Partition: %d  Leader: %s  Replicas: %s  Isr: %s  Offsets: %d-%d", p.partition, tostring(p.leader),
          table.concat(p.replicas, ","), table.concat(p.isr, ","), p.low, p.high)
        local where = ("%s[%d]"):format(name, p.partition)
        if not p.leader or p.leader < 0 then
          problems[#problems + 1] = where .. " has no leader"
        elseif down[p.leader] then
          problems[#problems + 1] = ("%s is led by broker %d, which does not answer"):format(where, p.leader)
        end
        if p.under_replicated then problems[#problems + 1] = where .. " is under-replicated" end
      end
    end
    return { problems = problems }
  end,
}

step "Verdict" {
  description = "Fails naming every unreachable broker and unhealthy partition",
  needs = { "Check the brokers", "Describe" },
  run = function(ctx)
    local problems = {}
    for _, id in ipairs(ctx.outputs["Check the brokers"].down) do problems[#problems + 1] = ("broker %d does not answer"):format(id) end
    for _, p in ipairs(ctx.outputs["Describe"].problems) do problems[#problems + 1] = p end
    if #problems > 0 then error(table.concat(problems, "; "), 0) end
    log.info("every broker answers; every partition has a leader and a full ISR")
  end,
}
