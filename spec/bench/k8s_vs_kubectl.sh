#!/usr/bin/env bash
# 200 mixed Kubernetes operations (50 each of get, list, scale, patch) against
# the sandbox's API stand-in: one runbook run through the k8s module vs the
# same 200 done as kubectl invocations (kubectl 1.32 called directly, with a
# warm discovery cache, as an operator's shell would), side by side in one
# hyperfine run. Prints both medians, the ratio, and the module's per-op median.
. "$(dirname "$0")/lib.sh"
with_sandbox
NS=bench
private_dir state shm
kc() { $KUBECTL --cache-dir="$tmp/cache" "$@"; }
at_exit 'kc delete ns $NS --wait=false >/dev/null 2>&1'

kc create ns $NS >/dev/null 2>&1 || true
kc create deployment bench-web -n $NS --image=nginx:1.25 --replicas=1 >/dev/null 2>&1 || true
kc rollout status deploy/bench-web -n $NS --timeout=60s >/dev/null

# The kubectl side: 200 invocations.
{
  echo "set -e"
  for i in $(seq 1 50); do
    echo "$KUBECTL --cache-dir=$tmp/cache get deploy bench-web -n $NS -o json >/dev/null"
    echo "$KUBECTL --cache-dir=$tmp/cache get pods -n $NS -o json >/dev/null"
    echo "$KUBECTL --cache-dir=$tmp/cache scale deploy/bench-web --replicas=$((i % 2 + 1)) -n $NS >/dev/null"
    echo "$KUBECTL --cache-dir=$tmp/cache patch deploy bench-web -n $NS -p '{\"metadata\":{\"annotations\":{\"bench\":\"$i\"}}}' >/dev/null"
  done
} >"$tmp/kubectl.sh"

# The module side: the same 200 in one runbook, each op timed.
cat >"$tmp/bench.lua" <<EOF
name = "k8s-bench"
description = "200 mixed operations through the k8s module"
step "ops" {
  timeout = "10m",
  run = function()
    local o, times = { namespace = "$NS" }, {}
    local function timed(f, ...)
      local t = time.monotonic()
      f(...)
      times[#times + 1] = time.monotonic() - t
    end
    for i = 1, 50 do
      timed(k8s.get, "deploy/bench-web", o)
      timed(k8s.list, "pods", o)
      timed(k8s.scale, "deploy/bench-web", i % 2 + 1, o)
      timed(k8s.patch, "deploy/bench-web", { metadata = { annotations = { bench = tostring(i) } } }, o)
    end
    table.sort(times)
    log.info("per-op median %.3f ms over %d ops", times[#times // 2 + 1] * 1000, #times)
  end,
}
EOF

sh "$tmp/kubectl.sh"   # warms kubectl's discovery cache
RUNBOOK_STATE_DIR=$state ./runbook run "$tmp/bench.lua" --yes 2>&1 | grep -o 'per-op median.*' | sed 's/^/module /'

hyperfine -N --warmup 1 --runs "${RUNS:-3}" --export-json "$tmp/h.json" \
  "env RUNBOOK_STATE_DIR=$state ./runbook run $tmp/bench.lua --yes --output json" \
  "sh $tmp/kubectl.sh" >/dev/null
medians "$tmp/h.json" mod kc <<'PY'
print(f"200 ops via the k8s module (one runbook run): median {mod:.0f} ms ({mod / 200:.2f} ms per op, start-up and discovery included)")
print(f"200 ops via kubectl invocations:              median {kc:.0f} ms ({kc / 200:.1f} ms per op)")
print(f"ratio: {kc / mod:.1f}x faster")
PY
