#!/usr/bin/env bash
# 100 metric-gate evaluations of 10 PromQL queries each against the sandbox's
# Prometheus: one runbook run calling prom.verify (hold 0: one evaluation of
# its 10 conditions) 100 times, vs a Python `requests` loop (one Session, so
# keep-alive as well) doing the same 1000 queries and threshold checks; side
# by side in one hyperfine run. Prints both medians, the ratio, and the CPU
# (user + system) per evaluation of each.
set -euo pipefail
cd "$(dirname "$0")/../.."
examples/sandbox/up >/dev/null
. examples/sandbox/.state/env
tmp=$(mktemp -d)
state=$(mktemp -d -p /dev/shm 2>/dev/null || mktemp -d)
trap 'rm -rf "$tmp" "$state"' EXIT

# The 10 queries of one evaluation: a canary's and each service's error rate and p95.
cat >"$tmp/queries.txt" <<'EOF'
sum(rate(http_requests_total{namespace="todo-chatbot",service="backend",status=~"5.."}[1m])) / sum(rate(http_requests_total{namespace="todo-chatbot",service="backend"}[1m]))
histogram_quantile(0.95, sum by (le) (rate(http_request_duration_seconds_bucket{namespace="todo-chatbot",service="backend"}[1m])))
sum(rate(http_requests_total{namespace="todo-chatbot",service="frontend",status=~"5.."}[1m])) / sum(rate(http_requests_total{namespace="todo-chatbot",service="frontend"}[1m]))
histogram_quantile(0.95, sum by (le) (rate(http_request_duration_seconds_bucket{namespace="todo-chatbot",service="frontend"}[1m])))
sum(rate(http_requests_total{namespace="todo-chatbot",service="websocket",status=~"5.."}[1m])) / sum(rate(http_requests_total{namespace="todo-chatbot",service="websocket"}[1m]))
histogram_quantile(0.95, sum by (le) (rate(http_request_duration_seconds_bucket{namespace="todo-chatbot",service="websocket"}[1m])))
sum(service:http_errors:ratio_rate30s{service="recurring-task"})
sum(service:http_request_duration_seconds:p95_30s{service="notification"})
max(consumergroup:kafka_consumergroup_lag:sum)
max(service:db_pool_usage:ratio)
EOF

# The runbook side: 100 prom.verify calls of 10 conditions, one evaluation each.
lua5.4 - "$tmp/queries.txt" >"$tmp/bench.lua" <<'LUA'
local qs = {}
for line in io.lines(arg[1]) do qs[#qs + 1] = ("{ query = %q, below = 1e12 }"):format(line) end
print(([[name = "prom-gate-bench"
description = "100 gate evaluations of 10 queries"
step "gates" {
  timeout = "10m",
  run = function()
    local conditions = { %s, hold = 0, every = "1s" }
    for _ = 1, 100 do prom.verify(conditions) end
  end,
}]]):format(table.concat(qs, ",\n      ")))
LUA

cat >"$tmp/bench.py" <<'PY'
import sys
import requests
url = sys.argv[1] + "/api/v1/query"
queries = [l.rstrip("\n") for l in open(sys.argv[2]) if l.strip()]
s = requests.Session()
for _ in range(100):
    for q in queries:
        r = s.get(url, params={"query": q}, timeout=30)
        r.raise_for_status()
        doc = r.json()
        if doc["status"] != "success" or not doc["data"]["result"]:
            sys.exit("no data for " + q)
        if not float(doc["data"]["result"][0]["value"][1]) < 1e12:
            sys.exit("gate failed: " + q)
PY

RUNBOOK_STATE_DIR=$state ./runbook run "$tmp/bench.lua" --yes --output json >/dev/null   # checks it passes
python3 "$tmp/bench.py" "$PROMETHEUS_URL" "$tmp/queries.txt"

hyperfine -N --warmup 1 --runs "${RUNS:-5}" --export-json "$tmp/h.json" \
  "env RUNBOOK_STATE_DIR=$state ./runbook run $tmp/bench.lua --yes --output json" \
  "python3 $tmp/bench.py $PROMETHEUS_URL $tmp/queries.txt" >/dev/null
python3 - "$tmp/h.json" <<'PY'
import json, sys
rb, py = json.load(open(sys.argv[1]))["results"]
for name, r in (("runbook (prom.verify)", rb), ("python3 requests loop", py)):
    cpu = (r["user"] + r["system"]) / 100 * 1000
    print(f"{name:22} median {r['median'] * 1000:6.0f} ms for 100 evaluations of 10 queries "
          f"({r['median'] * 10:.2f} ms per evaluation), CPU {cpu:.2f} ms per evaluation")
print(f"ratio of medians: python / runbook = {py['median'] / rb['median']:.2f}; "
      f"CPU: python / runbook = {(py['user'] + py['system']) / (rb['user'] + rb['system']):.2f}")
PY
