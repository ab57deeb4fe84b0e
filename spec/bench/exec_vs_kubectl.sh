#!/usr/bin/env bash
# 100 commands in a pod against the sandbox's API stand-in: one runbook run
# through k8s.exec (one WebSocket session each, over one TLS setup) vs 100
# `kubectl exec` invocations (kubectl 1.32 called directly, with a warm
# discovery cache), side by side in one hyperfine run. Both pay the stand-in's
# cost of starting the command (unshare, sh); prints both medians and the ratio.
set -euo pipefail
cd "$(dirname "$0")/../.."
examples/sandbox/up >/dev/null
. examples/sandbox/.state/env
KUBECTL=${KUBECTL:-/usr/lib/google-cloud-sdk/bin/kubectl.1.32}
NS=todo-chatbot
tmp=$(mktemp -d)
state=$(mktemp -d -p /dev/shm 2>/dev/null || mktemp -d)
trap 'rm -rf "$tmp" "$state"' EXIT
pod=pod/$($KUBECTL --cache-dir="$tmp/cache" get pods -n $NS -l app.kubernetes.io/component=backend --field-selector=status.phase=Running -o jsonpath="{.items[0].metadata.name}")

for i in $(seq 1 100); do
  echo "$KUBECTL --cache-dir=$tmp/cache exec -n $NS $pod -c backend -- echo $i >/dev/null"
done >"$tmp/kubectl.sh"

cat >"$tmp/bench.lua" <<EOF
name = "exec-bench"
description = "100 commands in a pod through k8s.exec"
step "exec" {
  timeout = "10m",
  run = function()
    for i = 1, 100 do
      local r = k8s.exec("$pod", { "echo", tostring(i) }, { namespace = "$NS", container = "backend", read = true })
      assert(r.stdout == i .. "\n")
    end
  end,
}
EOF

sh "$tmp/kubectl.sh"   # warms kubectl's discovery cache
hyperfine -N --warmup 1 --runs "${RUNS:-3}" --export-json "$tmp/h.json" \
  "env RUNBOOK_STATE_DIR=$state ./runbook run $tmp/bench.lua --yes --output json" \
  "sh $tmp/kubectl.sh" >/dev/null
python3 - "$tmp/h.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))["results"]
mod, kc = (x["median"] for x in r)
print(f"100 k8s.exec in one runbook run: median {mod * 1000:.0f} ms ({mod * 10:.1f} ms per exec, start-up included)")
print(f"100 kubectl exec invocations:    median {kc * 1000:.0f} ms ({kc * 10:.1f} ms per exec)")
print(f"ratio: {kc / mod:.1f}x faster")
PY
