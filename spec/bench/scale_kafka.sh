#!/usr/bin/env bash
# Kafka at scale (issue 27), against the sandbox's brokers:
#  - consumer lag of 50, 200 and 1000 groups x 12 partitions (scale-events,
#    groups made by `ctl kafka groups N`): a runbook calling
#    kafka.lag{groups = ...} against the same calculation with Debian's
#    python3-confluent-kafka (the topic's watermarks once, then each group's
#    committed offsets), both printing the total, which must agree;
#  - the low and high watermarks of one topic (scale-events): a runbook
#    calling kafka.watermarks against `kcat -Q` asking the high ones (kcat
#    cannot ask both of one partition in one call: it answers the later
#    for both), so kcat does half the work.
# The two commands of a row run alternately, RUNS times each after a warm-up
# (this machine's load changes from second to second: hyperfine's runs of one
# command, then of the other, met different loads); the table gives the
# medians, their ratio, peak RSS (GNU time) and the Kafka requests each sends
# (debug=protocol lines, by type; the runbook logs its own wire requests so).
# SIZES="50 200 1000" RUNS=7 by default. No Pushgateway: a run would push its
# metrics at its end, which the peers do not.
set -euo pipefail
cd "$(dirname "$0")/../.."
examples/sandbox/up >/dev/null 2>&1
. examples/sandbox/.state/env
sizes=${SIZES:-50 200 1000}
runs=${RUNS:-7}
unset RUNBOOK_PUSHGATEWAY
tmp=$(mktemp -d)
state=$(mktemp -d)
trap 'rm -rf "$tmp" "$state"' EXIT
export RUNBOOK_STATE_DIR=$state

largest=$(printf '%s\n' $sizes | sort -n | tail -1)
examples/sandbox/ctl kafka groups "$largest" >/dev/null

cat >"$tmp/lag.lua" <<'LUA'
name = "bench-lag"
description = "total lag of scale-group-1..GROUPS_N"
step "lag" {
  run = function()
    local groups = {}
    for g = 1, tonumber(os.getenv("GROUPS_N")) do groups[g] = "scale-group-" .. g end
    local k = kafka.connect { brokers = os.getenv("KAFKA_BROKERS"), debug = os.getenv("KAFKA_DEBUG") }
    print(k:lag { groups = groups, topics = "scale-events" }.total)
  end,
}
LUA
cat >"$tmp/lag.py" <<'PY'
import os
from confluent_kafka import Consumer, TopicPartition
b, dbg, topic = os.environ["KAFKA_BROKERS"], os.environ.get("KAFKA_DEBUG"), "scale-events"
conf = {"bootstrap.servers": b, "enable.auto.commit": False, **({"debug": dbg} if dbg else {})}
probe = Consumer({**conf, "group.id": "bench-probe"})
parts = sorted(probe.list_topics(topic, timeout=10).topics[topic].partitions)
high = {p: probe.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts}
probe.close()
total = 0
for g in range(1, int(os.environ["GROUPS_N"]) + 1):
    c = Consumer({**conf, "group.id": f"scale-group-{g}"})
    for tp in c.committed([TopicPartition(topic, p) for p in parts], timeout=10):
        if tp.offset >= 0:
            total += max(high[tp.partition] - tp.offset, 0)
    c.close()
print(total)
PY
cat >"$tmp/marks.lua" <<'LUA'
name = "bench-watermarks"
description = "watermarks of scale-events"
step "watermarks" {
  run = function()
    local k = kafka.connect { brokers = os.getenv("KAFKA_BROKERS"), debug = os.getenv("KAFKA_DEBUG") }
    local n = 0
    for _, m in pairs(k:watermarks("scale-events")) do n = n + m.high end
    print(n)
  end,
}
LUA
kcat_q=(kcat -b "$KAFKA_BROKERS" -Q)
for p in $(seq 0 11); do kcat_q+=(-t "scale-events:$p:-1"); done

rb_lag=(./runbook run "$tmp/lag.lua" --yes)
py_lag=(/usr/bin/python3 "$tmp/lag.py")
rb_marks=(./runbook run "$tmp/marks.lua" --yes)

requests() {   # the Kafka requests a command sends: "total (n Type, ...)"
  KAFKA_DEBUG=protocol "$@" 2>&1 >/dev/null | grep -o 'Sent [A-Za-z]*Request' | sed 's/Request$//' |
    sort | uniq -c | awk '{n += $1; s = s sprintf("%s %s, ", $1, $3)} END {sub(/, $/, "", s); printf "%d (%s)", n, s}'
}
peak_mb() {    # peak RSS of one run, in MB
  /usr/bin/time -f %M -o "$tmp/rss" "$@" >/dev/null 2>&1
  awk '{printf "%.1f", $1 / 1024}' "$tmp/rss"
}
cat >"$tmp/alternate.py" <<'PY'
import statistics, subprocess, sys, time
runs, cmds = int(sys.argv[1]), [c.split() for c in sys.argv[2:]]
def once(c):
    t = time.monotonic()
    subprocess.run(c, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return (time.monotonic() - t) * 1000
for c in cmds:
    once(c)
times = [[] for _ in cmds]
for _ in range(runs):
    for i, c in enumerate(cmds):
        times[i].append(once(c))
print(" ".join("%.1f" % statistics.median(t) for t in times))
PY
medians() {    # medians in ms of commands run alternately: medians RUNS "CMD A" "CMD B"
  python3 "$tmp/alternate.py" "$@"
}

echo "| groups x 12 partitions | runbook | python3-confluent-kafka | ratio | peak RSS runbook / python | requests runbook | requests python |"
echo "|---|---|---|---|---|---|---|"
for n in $sizes; do
  export GROUPS_N=$n
  a=$("${rb_lag[@]}" | sed -n 's/^ *| \([0-9]*\)$/\1/p') b=$("${py_lag[@]}")
  [ "$a" = "$b" ] || { echo "lag of $n groups: runbook says $a, python $b" >&2; exit 1; }
  read -r r p < <(medians "$runs" "${rb_lag[*]}" "${py_lag[*]}")
  printf '| %d | %s ms | %s ms | %sx faster | %s / %s MB | %s | %s |\n' "$n" "$r" "$p" \
    "$(python3 -c "print('%.1f' % ($p / $r))")" "$(peak_mb "${rb_lag[@]}")" "$(peak_mb "${py_lag[@]}")" \
    "$(requests "${rb_lag[@]}")" "$(requests "${py_lag[@]}")"
done

echo
echo "| watermarks of scale-events (12 partitions) | runbook (low and high) | kcat -Q (high) | ratio runbook/kcat | peak RSS runbook / kcat | requests runbook | requests kcat |"
echo "|---|---|---|---|---|---|---|"
read -r r k < <(medians "$((runs * 4))" "${rb_marks[*]}" "${kcat_q[*]}")
printf '| 1 topic | %s ms | %s ms | %s | %s / %s MB | %s | %s |\n' "$r" "$k" "$(python3 -c "print('%.2f' % ($r / $k))")" \
  "$(peak_mb "${rb_marks[@]}")" "$(peak_mb "${kcat_q[@]}")" "$(requests "${rb_marks[@]}")" \
  "$(requests "${kcat_q[@]}" -X debug=protocol)"
