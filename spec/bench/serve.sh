#!/usr/bin/env bash
# runbook serve, measured in one run (issue 25). The rule's runbook is a dry
# run of one step; every figure comes from this one serve:
# - idle: the resident memory of serve, and of its zygote and waiting run;
# - the machine's own latency: GET /healthz, 100 times, p50 and p99;
# - alert to run start, over 100 alerts of new label sets sent one after
#   another: the response (the run's process exists: forked) and the run's
#   run_start in its journal (its first event), p50 and p99;
# - intake of 10,000 alerts in 100 Alertmanager payloads over one keep-alive
#   connection (300 label sets, so the rest are deduplicated), as alerts/s,
#   with serve's own CPU time; then the same again, all deduplicated;
# - CPU per run: the 400 runs' CPU time (serve's reaped children) and the
#   zygote's (its own and its intermediates', which fork the runs), over their
#   number. Serve's own CPU against the runs' is where the time goes.
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
./runbook serve --rules "$tmp/rules.yml" --listen 127.0.0.1:0 --token-file "$tmp/token" --max-runs 400 \
  >"$tmp/out" 2>"$tmp/err" &
serve=$!
trap 'kill $serve; rm -rf "$tmp"' EXIT
i=0; until grep -q listening "$tmp/out" || [ $i -ge 200 ]; do sleep 0.05; i=$((i+1)); done
port=$(sed -n 's/.*127\.0\.0\.1:\([0-9]*\).*/\1/p' "$tmp/out")
sleep 1
mem() { awk '/^Rss:/ {r += $2} /^Pss:/ {p += $2} END {printf "%.1f MB resident (%.1f MB proportional)", r / 1024, p / 1024}' \
  $(printf '/proc/%s/smaps_rollup ' "$@"); }
echo "idle serve: $(mem $serve); its children (the zygote, the next run waiting): $(mem $(pgrep -P $serve))"
python3 - "$port" "$token" "$tmp" "$serve" <<'PY'
import http.client, json, os, sys, time
port, token, tmp, serve = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
headers = {"Authorization": "Bearer " + token, "Content-Type": "application/json"}
tick = os.sysconf("SC_CLK_TCK")
def cpu(pid, children=False):   # seconds: the process's own, or its reaped children's
    f = open("/proc/%s/stat" % pid).read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12]) if not children else int(f[13]) + int(f[14])) / tick
def zygote():   # serve's zygote (host/zygote.c): its CPU and its reaped children's, in seconds; 0 without one
    for p in os.listdir("/proc"):
        try:
            if p.isdigit() and open("/proc/%s/cmdline" % p, "rb").read().endswith(b"\0serve\0--zygote\0") \
                    and open("/proc/%s/stat" % p).read().rsplit(")", 1)[1].split()[1] == serve:
                return cpu(p) + cpu(p, children=True)
        except OSError:
            pass
    return 0
def payload(alerts):
    return json.dumps({"version": "4", "status": "firing", "receiver": "runbook", "groupKey": "{}:{}",
        "alerts": [{"status": "firing", "labels": {"alertname": "BenchAlert", "group": g}, "annotations": {}}
                   for g in alerts]})
c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
def request(method, path, body=None):
    c.request(method, path, body, headers)
    r = c.getresponse(); data = r.read()
    assert r.status == 200, r.status
    return data
def pct(xs, p): xs = sorted(xs); return xs[min(len(xs) - 1, int(len(xs) * p))] * 1000
lat = []
for i in range(100):
    t0 = time.perf_counter(); request("GET", "/healthz"); lat.append(time.perf_counter() - t0)
print("GET /healthz (the machine's own latency): p50 %.1f ms, p99 %.1f ms" % (pct(lat, .5), pct(lat, .99)))
lat, sent = [], {}
for i in range(100):
    t0, wall = time.perf_counter(), time.time()
    done = json.loads(request("POST", "/v1/alertmanager", payload(["new-%d" % i])))
    lat.append(time.perf_counter() - t0)
    sent[done["started"][0]["run_id"]] = wall
def run_start(run_id):
    try:
        first = json.loads(open("%s/state/runs/%s.jsonl" % (tmp, run_id)).readline())
    except (OSError, ValueError):
        return None
    t = time.strptime(first["time"][:19], "%Y-%m-%dT%H:%M:%S")
    return time.mktime(t) - time.timezone + float("0." + first["time"][20:23])
deadline, starts = time.time() + 120, {}
while len(starts) < len(sent) and time.time() < deadline:
    for run_id in sent:
        if run_id not in starts:
            t = run_start(run_id)
            if t is not None: starts[run_id] = t
    time.sleep(0.1)
journaled = [starts[r] - sent[r] for r in starts]
print("alert to run start, 100 alerts: the run spawned (the response) p50 %.1f ms, p99 %.1f ms; "
      "its run_start journaled p50 %.1f ms, p99 %.1f ms (%d of 100 started)"
      % (pct(lat, .5), pct(lat, .99), pct(journaled, .5), pct(journaled, .99), len(starts)))
bodies = [payload(["g%d" % ((b * 100 + a) % 300) for a in range(100)]) for b in range(100)]
cpu0, t0 = cpu(serve), time.perf_counter()
for body in bodies: request("POST", "/v1/alertmanager", body)
dt, used = time.perf_counter() - t0, cpu(serve) - cpu0
print("intake: 10000 alerts (300 new label sets, a run started for each) in %.2f s: %.0f alerts/s; "
      "serve's CPU %.2f s (%.0f alerts per CPU second)" % (dt, 10000 / dt, used, 10000 / max(used, 0.01)))
cpu0, t0 = cpu(serve), time.perf_counter()
for body in bodies: request("POST", "/v1/alertmanager", body)
dt, used = time.perf_counter() - t0, cpu(serve) - cpu0
print("intake: the same 10000 alerts again (all deduplicated) in %.2f s: %.0f alerts/s; serve's CPU %.2f s"
      % (dt, 10000 / dt, used))
# The runs are counted once serve reaped them: wait until all 400 ended.
deadline = time.time() + 180
while time.time() < deadline and b"400" not in request("GET", "/metrics").split(b"runbook_serve_started_total")[-1]:
    time.sleep(0.5)
while time.time() < deadline and len([f for f in os.listdir(tmp + "/state/runs")]) < 400:
    time.sleep(0.5)
time.sleep(3)
forks = zygote()
print("CPU per run (a one-step dry run): %.1f ms (the zygote's forks %.1f ms of it); serve's own CPU in all: %.2f s"
      % ((cpu(serve, children=True) + forks) / 400 * 1000, forks / 400 * 1000, cpu(serve)))
PY
curl -s "http://127.0.0.1:$port/metrics" | grep -E '^runbook_(alerts|serve)' || true
