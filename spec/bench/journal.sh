#!/usr/bin/env bash
# Per-step cost with the journal: a 200-step no-op runbook vs a 1-step one,
# side by side in one hyperfine run; (median200 - median1) / 199 is what one
# step costs: the engine, the events, and the journal's two fsync'd lines.
# The state dir is on the checkout's filesystem (not tmpfs), so fsync is real.
set -euo pipefail
cd "$(dirname "$0")/../.."
tmp=$(mktemp -d)
state=$(mktemp -d -p "$PWD/build" bench-state.XXXXXX 2>/dev/null || { mkdir -p build; mktemp -d -p "$PWD/build"; })
trap 'rm -rf "$tmp" "$state"' EXIT
gen() { # gen N FILE
  { printf 'name = "noop%s"\ndescription = "no-op steps"\n' "$1"
    for i in $(seq "$1"); do printf 'step "s%d" { run = function() end }\n' "$i"; done; } >"$2"
}
gen 1 "$tmp/one.lua"
gen 200 "$tmp/many.lua"
export RUNBOOK_STATE_DIR="$state"
hyperfine -N --warmup 3 --runs "${RUNS:-30}" --export-json "$tmp/h.json" \
  "./runbook run $tmp/one.lua --yes --output json" "./runbook run $tmp/many.lua --yes --output json" >/dev/null
python3 - "$tmp/h.json" "$(df -T "$state" | awk 'NR==2 {print $2}')" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))["results"]
one, many = r[0]["median"] * 1000, r[1]["median"] * 1000
print(f"1 step: median {one:.2f} ms; 200 steps: median {many:.2f} ms; "
      f"per step: {(many - one) / 199 * 1000:.0f} us (journal on {sys.argv[2]}, fsync at each step end)")
PY
