#!/usr/bin/env bash
# 200 health checks: one runbook step with http.check_all against what the
# seeds do (a shell loop of `curl -f`, one target after another) and the
# usual parallel shell (`xargs -P 50 curl`), side by side in one hyperfine
# run against the same local fixture server: 190 fast targets and 10 that
# answer after 200 ms. Prints medians and the ratios.
. "$(dirname "$0")/lib.sh"
http_fixture
for i in $(seq 1 190); do echo "$base/status/200?i=$i"; done >"$tmp/urls"
for i in $(seq 1 10); do echo "$base/slow?ms=200&i=$i"; done >>"$tmp/urls"

cat >"$tmp/check.lua" <<LUA
name = "check200" description = "200 health checks at once"
step "check" { run = function()
  local urls = {}
  for url in io.lines("$tmp/urls") do urls[#urls + 1] = url end
  local res = http.check_all{ urls = urls, concurrency = 50 }
  if not res.ok then error(res.failed .. " targets failed") end
end }
LUA
cat >"$tmp/loop.sh" <<'SH'
while read -r url; do curl -sf -o /dev/null -m 10 "$url" || exit 1; done <"$1"
SH

export RUNBOOK_STATE_DIR="$tmp/state"
hyperfine -N --warmup 1 --runs "${RUNS:-5}" --export-json "$tmp/h.json" \
  "./runbook run $tmp/check.lua --yes --output json" \
  "bash $tmp/loop.sh $tmp/urls" \
  "xargs -a $tmp/urls -P 50 -n 1 curl -sf -o /dev/null -m 10" >/dev/null
medians "$tmp/h.json" rb loop xargs <<'PY'
print(f"runbook http.check_all, 200 targets: median {rb:.0f} ms")
print(f"curl -f in a shell loop:             median {loop:.0f} ms ({loop/rb:.1f}x the runbook)")
print(f"xargs -P 50 curl:                    median {xargs:.0f} ms ({xargs/rb:.1f}x the runbook)")
PY
