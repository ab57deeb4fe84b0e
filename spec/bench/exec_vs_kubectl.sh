#!/usr/bin/env bash
# 100 commands in a pod against the sandbox's API stand-in: one runbook run
# through k8s.exec (one WebSocket session each, over one TLS setup) vs 100
# `kubectl exec` invocations (kubectl 1.32 called directly, with a warm
# discovery cache), side by side in one hyperfine run. Both pay the stand-in's
# cost of starting the command (unshare, sh); prints both medians and the ratio.
. "$(dirname "$0")/lib.sh"
with_sandbox
NS=todo-chatbot
private_dir state shm
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
medians "$tmp/h.json" mod kc <<'PY'
print(f"100 k8s.exec in one runbook run: median {mod:.0f} ms ({mod / 100:.1f} ms per exec, start-up included)")
print(f"100 kubectl exec invocations:    median {kc:.0f} ms ({kc / 100:.1f} ms per exec)")
print(f"ratio: {kc / mod:.1f}x faster")
PY
