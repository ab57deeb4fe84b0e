#!/usr/bin/env bash
# `runbook history` and `runbook report` over a state directory of 100, 1000
# and 10,000 runs (SIZES): a year of cron runs, each a copy of one real run's
# journal (3 steps, 4 effects, a log line) under its own id, one run in 500
# unreadable (a malformed line), the newest one among them; the oldest run is
# the only one of runbook "rare". Timed with hyperfine (RUNS each, default 20),
# side by side with `ls | sort | head`, the least any listing costs; peak RSS
# from /usr/bin/time. Prints a table; not part of the test suite.
set -euo pipefail
cd "$(dirname "$0")/../.."
SIZES=${SIZES:-"100 1000 10000"} RUNS=${RUNS:-20}
mkdir -p build
tmp=$(mktemp -d -p "$PWD/build" bench-history.XXXXXX)
trap 'rm -rf "$tmp"' EXIT

# One real journal to copy.
cat >"$tmp/cron.lua" <<LUA
name = "nightly" description = "a cron run"
step "check" { run = function() log.info("checking") return { ok = true } end }
step "write" { run = function() for i = 1, 4 do fs.write("$tmp/out" .. i, "x") end end }
step "verify" { run = function() return { n = 4 } end }
LUA
RUNBOOK_STATE_DIR="$tmp/seed" ./runbook run "$tmp/cron.lua" --yes >/dev/null
template=$(ls "$tmp"/seed/runs/*.jsonl)

populate() { # populate N DIR
  python3 - "$template" "$1" "$2/runs" <<'PY'
import json, os, sys, datetime
template, n, runs = sys.argv[1], int(sys.argv[2]), sys.argv[3]
os.makedirs(runs, exist_ok=True)
lines = open(template).read().splitlines()
old_id = json.loads(lines[0])["run_id"]
newest = datetime.datetime(2026, 12, 6, 3, 0, 0)
for i in range(n):
    t = newest - datetime.timedelta(minutes=53 * i)
    rid = t.strftime("%Y%m%dT%H%M%SZ") + "-%08x" % i
    out = []
    for k, l in enumerate(lines):
        l = l.replace(old_id, rid)
        if i == n - 1: l = l.replace('"nightly"', '"rare"')
        if i % 500 == 0 and k == 2: l = l.replace('"step":"check"', '"step":{"bad":1}')
        out.append(l)
    with open(os.path.join(runs, rid + ".jsonl"), "w") as f: f.write("\n".join(out) + "\n")
PY
}

echo "each: median wall time (mean CPU time, user + system); load average $(cut -d' ' -f1 /proc/loadavg)"
printf '| runs | history | history --runbook rare | report (newest readable) | ls \\| sort \\| head | peak RSS history |\n'
printf '|---|---|---|---|---|---|\n'
for n in $SIZES; do
  state="$tmp/state-$n"
  populate "$n" "$state"
  readable=$(ls "$state/runs" | sort -r | sed -n 2p); readable=${readable%.jsonl}
  export RUNBOOK_STATE_DIR="$state"
  hyperfine -N --warmup 2 --runs "$RUNS" --export-json "$tmp/h$n.json" \
    "./runbook history" "./runbook history --runbook rare" "./runbook report $readable" \
    "sh -c 'ls $state/runs | sort -r | head -n 20'" >/dev/null 2>&1
  peak=$(/usr/bin/time -f %M ./runbook history 2>&1 >/dev/null | tail -n 1)
  python3 - "$tmp/h$n.json" "$n" "$peak" <<'PY'
import json, sys
r = [f'{x["median"] * 1000:.1f} ms ({(x["user"] + x["system"]) * 1000:.1f})' for x in json.load(open(sys.argv[1]))["results"]]
print(f"| {int(sys.argv[2]):,} | {' | '.join(r)} | {int(sys.argv[3]) / 1024:.1f} MB |")
PY
done
