#!/usr/bin/env bash
# Startup cost: a one-step no-op runbook through ./runbook vs the bare lua5.4
# interpreter running an empty file, side by side in one hyperfine run (each
# through env, so both pay the same exec), and the runbook's peak memory.
# Prints medians and the ratios.
. "$(dirname "$0")/lib.sh"
printf 'name = "noop"\ndescription = "does nothing"\nstep "nothing" { run = function() end }\n' >"$tmp/noop.lua"
: >"$tmp/empty.lua"
# The journal is fsync'd at the step's and the run's end: timed with the state
# dir on the checkout's filesystem (real fsync) and on tmpfs (none to speak of).
private_dir disk build
private_dir shm shm

hyperfine -N --warmup 20 --runs "${RUNS:-300}" --export-json "$tmp/h.json" \
  "env RUNBOOK_PUSHGATEWAY= RUNBOOK_STATE_DIR=$disk ./runbook run $tmp/noop.lua --yes --output json" \
  "env RUNBOOK_PUSHGATEWAY= RUNBOOK_STATE_DIR=$shm ./runbook run $tmp/noop.lua --yes --output json" \
  "env lua5.4 $tmp/empty.lua" >/dev/null
medians "$tmp/h.json" disk shm lua <<'PY'
print(f"no-op runbook, journal on disk: median {disk:.2f} ms ({disk/lua:.2f}x lua5.4)")
print(f"no-op runbook, journal on tmpfs: median {shm:.2f} ms ({shm/lua:.2f}x lua5.4)")
print(f"lua5.4 empty file: median {lua:.2f} ms")
PY
export RUNBOOK_STATE_DIR="$shm" RUNBOOK_PUSHGATEWAY=
peak=$(/usr/bin/time -f %M ./runbook run "$tmp/noop.lua" --yes 2>&1 >/dev/null | tail -n 1)
echo "no-op runbook peak RSS: $((peak / 1024)).$(( (peak % 1024) * 10 / 1024 )) MB"
