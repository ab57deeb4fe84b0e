#!/usr/bin/env bash
# Consumer lag for 50 groups x 12 partitions (task-events) against the sandbox
# brokers: a runbook calling kafka.lag{groups = ...} vs the same calculation
# with Debian's python3-confluent-kafka (committed offsets per group, the
# topic's watermarks once), side by side in one hyperfine run; then the
# watermarks of task-events: kafka.watermarks vs kcat -Q. Prints medians, the
# ratios, and the Kafka requests each sent (librdkafka debug=protocol lines).
set -euo pipefail
cd "$(dirname "$0")/../.."
examples/sandbox/up >/dev/null
. examples/sandbox/.state/env
tmp=$(mktemp -d)
state=$(mktemp -d)
trap 'rm -rf "$tmp" "$state"' EXIT
export RUNBOOK_STATE_DIR=$state GROUPS_N=${GROUPS_N:-50}

# 50 groups with committed offsets on all 12 partitions, committed the way
# the sandbox consumers do (explicit offsets, no JoinGroup).
/usr/bin/python3 - <<'PY'
import os
from confluent_kafka import Consumer, TopicPartition
b = os.environ["KAFKA_BROKERS"]
for g in range(1, int(os.environ["GROUPS_N"]) + 1):
    c = Consumer({"bootstrap.servers": b, "group.id": f"bench-lag-{g}", "enable.auto.commit": False})
    c.commit(offsets=[TopicPartition("task-events", p, 10 * g + p) for p in range(12)], asynchronous=False)
    c.close()
PY

cat >"$tmp/lag.lua" <<'LUA'
name = "bench-lag"
description = "lag of the bench groups"
step "lag" {
  run = function()
    local groups = {}
    for g = 1, tonumber(os.getenv("GROUPS_N")) do groups[g] = "bench-lag-" .. g end
    local k = kafka.connect { brokers = os.getenv("KAFKA_BROKERS"), debug = os.getenv("KAFKA_DEBUG") }
    print(k:lag { groups = groups, topics = "task-events" }.total)
  end,
}
LUA
cat >"$tmp/lag.py" <<'PY'
import os
from confluent_kafka import Consumer, TopicPartition
b, dbg = os.environ["KAFKA_BROKERS"], os.environ.get("KAFKA_DEBUG")
conf = {"bootstrap.servers": b, "enable.auto.commit": False, **({"debug": dbg} if dbg else {})}
probe = Consumer({**conf, "group.id": "bench-probe"})
parts = sorted(probe.list_topics("task-events", timeout=10).topics["task-events"].partitions)
high = {p: probe.get_watermark_offsets(TopicPartition("task-events", p), timeout=10)[1] for p in parts}
probe.close()
total = 0
for g in range(1, int(os.environ["GROUPS_N"]) + 1):
    c = Consumer({**conf, "group.id": f"bench-lag-{g}"})
    for tp in c.committed([TopicPartition("task-events", p) for p in parts], timeout=10):
        if tp.offset >= 0:
            total += max(high[tp.partition] - tp.offset, 0)
    c.close()
print(total)
PY
cat >"$tmp/marks.lua" <<'LUA'
name = "bench-watermarks"
description = "watermarks of task-events"
step "watermarks" {
  run = function()
    local k = kafka.connect { brokers = os.getenv("KAFKA_BROKERS"), debug = os.getenv("KAFKA_DEBUG") }
    local n = 0
    for _, m in pairs(k:watermarks("task-events")) do n = n + m.high end
    print(n)
  end,
}
LUA
kcat_q="kcat -b $KAFKA_BROKERS -Q"
for p in $(seq 0 11); do kcat_q="$kcat_q -t task-events:$p:-2 -t task-events:$p:-1"; done

echo "== lag of $GROUPS_N groups x 12 partitions"
hyperfine -N --warmup 2 --runs "${RUNS:-10}" --export-json "$tmp/lag.json" \
  "./runbook run $tmp/lag.lua --yes" "/usr/bin/python3 $tmp/lag.py" >/dev/null
echo "== low and high watermarks of task-events (12 partitions)"
hyperfine -N --warmup 2 --runs "${RUNS:-10}" --export-json "$tmp/marks.json" \
  "./runbook run $tmp/marks.lua --yes" "$kcat_q" >/dev/null

requests() {   # the Kafka requests a command sends, by type
  KAFKA_DEBUG=protocol "$@" 2>&1 >/dev/null | grep -o 'Sent [A-Za-z]*Request' | sort | uniq -c |
    awk '{n += $1; s = s sprintf("%s %s, ", $1, $3)} END {sub(/, $/, "", s); printf "%d (%s)\n", n, s}'
}
python3 - "$tmp/lag.json" "$tmp/marks.json" <<'PY'
import json, sys
lag = [r["median"] * 1000 for r in json.load(open(sys.argv[1]))["results"]]
marks = [r["median"] * 1000 for r in json.load(open(sys.argv[2]))["results"]]
print(f"lag: runbook median {lag[0]:.1f} ms, python3-confluent-kafka {lag[1]:.1f} ms: "
      f"runbook is {lag[1] / lag[0]:.2f}x faster")
print(f"watermarks: runbook median {marks[0]:.1f} ms, kcat -Q {marks[1]:.1f} ms: ratio runbook/kcat {marks[0] / marks[1]:.2f}")
PY
echo "requests, runbook lag:    $(requests ./runbook run "$tmp/lag.lua" --yes)"
echo "requests, python lag:     $(requests /usr/bin/python3 "$tmp/lag.py")"
echo "requests, runbook marks:  $(requests ./runbook run "$tmp/marks.lua" --yes)"
echo "requests, kcat -Q:        $(KAFKA_DEBUG=protocol; requests $kcat_q -X debug=protocol)"
