#!/usr/bin/env bash
# http.check_all at 200 and 2000 targets (concurrency 50) against the local
# fixture server: all answer at once but 10, which answer after 1 s, spread
# through the list. For each size: the median total time and its ratio to the
# slowest target (the goal: within 1.1x), the median latency of the fast
# targets (what the fixture server gives: `rounds x fast` is the floor of
# the total once n / concurrency rounds are many), the runbook's CPU time,
# the peak of open fds and the peak RSS of the runbook process (both should
# stay flat: bounded by concurrency), and the same check by curl itself,
# `curl -Z --parallel-max 50` (one process, parallel transfers), timed alike.
# SIZES="200 2000" RUNS=3 by default.
. "$(dirname "$0")/lib.sh"
http_fixture
export RUNBOOK_STATE_DIR="$tmp/state"

# measure OUT CMD...: runs CMD with its stdout in OUT, sampling its open fds
# every 2 ms; prints "PEAK_FDS PEAK_RSS_MB CPU_S"
measure() {
  python3 - "$@" <<'PY'
import os, resource, subprocess, sys, time
with open(sys.argv[1], "w") as out:
    p = subprocess.Popen(sys.argv[2:], stdout=out, stderr=subprocess.DEVNULL)
    fds = 0
    while p.poll() is None:
        try:
            fds = max(fds, len(os.listdir("/proc/%d/fd" % p.pid)))
        except OSError:
            pass
        time.sleep(0.002)
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print(fds, "%.1f" % (ru.ru_maxrss / 1024), "%.2f" % (ru.ru_utime + ru.ru_stime))
PY
}

printf '%-7s | %-11s %-9s %-6s %-9s %-6s %-8s %-6s | %s\n' targets "check_all s" "slowest s" ratio "fast ms" "cpu s" "peak fds" "RSS MB" "curl -Z s"
for n in ${SIZES:-200 2000}; do
  for i in $(seq 1 "$n"); do
    if [ $((i % (n / 10))) = 0 ]; then echo "$base/slow?ms=1000&i=$i"; else echo "$base/status/200?i=$i"; fi
  done >"$tmp/urls"
  sed 's/.*/url = "&"\noutput = "\/dev\/null"/' "$tmp/urls" >"$tmp/curl.conf"
  cat >"$tmp/check.lua" <<LUA
name = "check$n" description = "$n health checks at once"
step "check" { run = function()
  local urls = {}
  for url in io.lines("$tmp/urls") do urls[#urls + 1] = url end
  local res = http.check_all{ urls = urls, concurrency = 50 }
  if not res.ok then error(res.failed .. " targets failed") end
  local fast = {}
  for _, r in ipairs(res.results) do if not r.url:find("/slow", 1, true) then fast[#fast + 1] = r.latency end end
  table.sort(fast)
  return { slowest = res.slowest, duration = res.duration, fast = fast[#fast // 2 + 1] }
end }
LUA
  : >"$tmp/runs"
  for r in $(seq 0 "${RUNS:-3}"); do   # run 0 warms up
    read -r fds rss cpu <<<"$(measure "$tmp/out" ./runbook run "$tmp/check.lua" --yes --output json)"
    [ "$r" = 0 ] || python3 -c 'import json,sys
for l in open(sys.argv[1]):
    e = json.loads(l)
    if e.get("event") == "step_end":
        o = e["outputs"]
        print(o["slowest"], o["duration"], o["fast"], sys.argv[2], sys.argv[3], sys.argv[4])' "$tmp/out" "$fds" "$rss" "$cpu" >>"$tmp/runs"
  done
  hyperfine -N --warmup 1 --runs "${RUNS:-3}" --export-json "$tmp/h.json" \
    "curl -sf -Z --parallel-max 50 -m 10 -K $tmp/curl.conf" >/dev/null 2>"$tmp/err" || { cat "$tmp/err" >&2; exit 1; }
  t_x=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["results"][0]["median"])' "$tmp/h.json")
  python3 - "$tmp/runs" "$n" "$t_x" <<'PY'
import statistics as st, sys
rows = [[float(x) for x in l.split()] for l in open(sys.argv[1])]
slowest, total, fast, cpu = (st.median(r[i] for r in rows) for i in (0, 1, 2, 5))
fds, rss = max(r[3] for r in rows), max(r[4] for r in rows)
print("%-7s | %-11.3f %-9.3f %-6.2f %-9.1f %-6.2f %-8d %-6.1f | %.3f" % (
    sys.argv[2], total, slowest, total / slowest, fast * 1000, cpu, fds, rss, float(sys.argv[3])))
PY
done
echo "check_all s: median of http.check_all's own duration; slowest s: median of the slowest target's latency;"
echo "ratio: of those medians; fast ms: median latency of the fast targets; cpu s: the runbook process's user+sys"
echo "(median); peak fds and RSS: the most over the runs. curl -Z s: median wall time of curl (hyperfine)."
