#!/usr/bin/env bash
# k8s.namespace_health over a namespace of N deployments (x5 Running pods), as
# the daily-health-check's first step runs it, against what a user would type
# for the same check: `kubectl get deploy,pods -o json` (kubectl 1.32, warm
# discovery cache). Both against the sandbox's API stand-in, populated with
# `ctl k8s populate`. For each size: medians (hyperfine), the runbook's own CPU
# time (the rest of its wall time is the stand-in's), peak RSS, and the API
# requests each made (counted by the stand-in: lists, and discovery).
# SIZES="10 100 1000" RUNS=3 by default.
. "$(dirname "$0")/lib.sh"
with_sandbox
NS=scale
private_dir state shm
ctl() { examples/sandbox/ctl k8s "$@"; }
at_exit 'ctl depopulate $NS >/dev/null 2>&1'

cat >"$tmp/health.lua" <<EOF
name = "scale-namespace-health"
description = "k8s.namespace_health of one namespace"
step "health" { run = function()
  local h = k8s.namespace_health("$NS")
  if #h.problems > 0 then error(#h.problems .. " problems: " .. h.problems[1]) end
  log.info("%d deployments healthy", #h.deployments)
end }
EOF
rb="env RUNBOOK_STATE_DIR=$state ./runbook run $tmp/health.lua --yes --output json"
kc="$KUBECTL --cache-dir=$tmp/cache get deploy,pods -n $NS -o json"

# requests CMD -> "TOTAL LISTS": what one run of CMD asked the stand-in
requests() {
  ctl requests reset >/dev/null
  $1 >/dev/null
  ctl requests reset | python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["total"], sum(v for k, v in r.items() if k.startswith("list ")))'
}
# peak CMD -> "PEAK_RSS_MB CPU_S"
peak() {
  /usr/bin/time -f "%M %U %S" -o "$tmp/time" $1 >/dev/null
  awk '{printf "%.1f %.2f\n", $1 / 1024, $2 + $3}' "$tmp/time"
}

printf '%-6s %-6s | %-10s %-8s %-8s %-10s | %-10s %-8s %-10s | %s\n' deploys pods "runbook s" "cpu s" "RSS MB" "requests" "kubectl s" "RSS MB" "requests" "kubectl/runbook"
for n in ${SIZES:-10 100 1000}; do
  ctl populate $NS "$n" >/dev/null
  $kc >/dev/null   # warms kubectl's discovery cache
  hyperfine -N --warmup 1 --runs "${RUNS:-3}" --export-json "$tmp/h.json" "$rb" "$kc" >/dev/null 2>"$tmp/err" ||
    { cat "$tmp/err" >&2; exit 1; }
  read -r t_rb t_kc < <(python3 -c 'import json,sys; r=json.load(open(sys.argv[1]))["results"]; print(*(x["median"] for x in r))' "$tmp/h.json")
  read -r rss_rb cpu_rb <<<"$(peak "$rb")"
  read -r rss_kc _ <<<"$(peak "$kc")"
  read -r req_rb list_rb <<<"$(requests "$rb")"
  read -r req_kc list_kc <<<"$(requests "$kc")"
  printf '%-7s %-6s | %-10.2f %-8s %-8s %-10s | %-10.2f %-8s %-10s | %.1fx\n' "$n" $((n * 5)) "$t_rb" "$cpu_rb" "$rss_rb" \
    "$req_rb ($list_rb lists)" "$t_kc" "$rss_kc" "$req_kc ($list_kc lists)" "$(python3 -c "print($t_kc / $t_rb)")"
done
