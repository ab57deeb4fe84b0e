#!/usr/bin/env bash
# runbook serve, measured in one run (issue 25): webhook intake of 10,000
# alerts in 100 Alertmanager payloads over one keep-alive connection (300
# label sets, so the rest are deduplicated), then the same again (all
# deduplicated), as alerts per second; latency
# from an alert to its run started (the response comes once the child is
# spawned), p50 and p99 over 100 alerts of new label sets; the resident
# memory of an idle serve. The rule's runbook is a dry run of one step.
set -euo pipefail
cd "$(dirname "$0")/../.."
tmp=$(mktemp -d)
export RUNBOOK_STATE_DIR="$tmp/state"
token=bench-token-0123456789
echo "$token" >"$tmp/token"
cat >"$tmp/noop.lua" <<'LUA'
name = "noop" description = "does nothing"
param "group" {}
step "nothing" { run = function() end }
LUA
cat >"$tmp/rules.yml" <<YAML
rules:
  - name: bench
    match: {alertname: BenchAlert}
    runbook: $tmp/noop.lua
    mode: dry-run
    params: {group: "{{ labels.group }}"}
YAML
./runbook serve --rules "$tmp/rules.yml" --listen 127.0.0.1:0 --token-file "$tmp/token" --max-runs 200 \
  >"$tmp/out" 2>"$tmp/err" &
serve=$!
trap 'kill $serve; rm -rf "$tmp"' EXIT
i=0; until grep -q listening "$tmp/out" || [ $i -ge 200 ]; do sleep 0.05; i=$((i+1)); done
port=$(sed -n 's/.*127\.0\.0\.1:\([0-9]*\).*/\1/p' "$tmp/out")
sleep 1
echo "idle serve: $(awk '/VmRSS/ {printf "%.1f MB", $2 / 1024}' /proc/$serve/status) resident"
python3 - "$port" "$token" <<'PY'
import http.client, json, sys, time
port, token = int(sys.argv[1]), sys.argv[2]
headers = {"Authorization": "Bearer " + token, "Content-Type": "application/json"}
def payload(alerts):
    return json.dumps({"version": "4", "status": "firing", "receiver": "runbook", "groupKey": "{}:{}",
        "alerts": [{"status": "firing", "labels": {"alertname": "BenchAlert", "group": g}, "annotations": {}}
                   for g in alerts]})
c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
def post(body):
    c.request("POST", "/v1/alertmanager", body, headers)
    r = c.getresponse(); r.read()
    assert r.status == 200, r.status
lat = []
for i in range(100):
    t0 = time.perf_counter(); post(payload(["new-%d" % i])); lat.append(time.perf_counter() - t0)
lat.sort()
print("alert to run start: p50 %.1f ms, p99 %.1f ms" % (lat[49] * 1000, lat[98] * 1000))
bodies = [payload(["g%d" % ((b * 100 + a) % 300) for a in range(100)]) for b in range(100)]
t0 = time.perf_counter()
for body in bodies: post(body)
dt = time.perf_counter() - t0
print("intake: 10000 alerts (300 new label sets, a run started for each) in %.2f s: %.0f alerts/s" % (dt, 10000 / dt))
t0 = time.perf_counter()
for body in bodies: post(body)
dt = time.perf_counter() - t0
print("intake: the same 10000 alerts again (all deduplicated) in %.2f s: %.0f alerts/s" % (dt, 10000 / dt))
PY
curl -s "http://127.0.0.1:$port/metrics" | grep -E '^runbook_(alerts|serve)' || true
