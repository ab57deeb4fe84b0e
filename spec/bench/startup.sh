#!/usr/bin/env bash
# Startup cost: a one-step no-op runbook through ./runbook vs the bare lua5.4
# interpreter running an empty file, side by side in one hyperfine run, and
# the runbook's peak memory. Prints medians and the ratio.
set -euo pipefail
cd "$(dirname "$0")/../.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
printf 'name = "noop"\ndescription = "does nothing"\nstep "nothing" { run = function() end }\n' >"$tmp/noop.lua"
: >"$tmp/empty.lua"
export RUNBOOK_STATE_DIR="$tmp/state"

hyperfine -N --warmup 20 --runs "${RUNS:-300}" --export-json "$tmp/h.json" \
  "./runbook run $tmp/noop.lua --yes --output json" "lua5.4 $tmp/empty.lua" >/dev/null
python3 - "$tmp/h.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))["results"]
rb, lua = r[0]["median"] * 1000, r[1]["median"] * 1000
print(f"no-op runbook: median {rb:.2f} ms; lua5.4 empty file: median {lua:.2f} ms; ratio {rb/lua:.2f}x")
PY
peak=$(/usr/bin/time -f %M ./runbook run "$tmp/noop.lua" --yes 2>&1 >/dev/null | tail -n 1)
echo "no-op runbook peak RSS: $((peak / 1024)).$(( (peak % 1024) * 10 / 1024 )) MB"
