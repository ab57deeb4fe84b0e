#!/usr/bin/env bash
# pg.dump of a large database (default ~1.1 GB) against pg_dump alone, both
# --format=custom to a file on the checkout's filesystem, RUNS each (default
# 3), alternating, with CPU time and peak memory. pg.dump adds a verification (pg_restore
# --list), the dump's sha256 and the manifest's exact row counts.
# Needs the sandbox (make sandbox). The database rb_dump_large is built with
# generate_series in the sandbox's PostgreSQL and dropped at the end (KEEP=1
# keeps it for a re-run). Not part of the test suite.
. "$(dirname "$0")/lib.sh"
. examples/sandbox/.state/env
DUMP_MB=${DUMP_MB:-1100} RUNS=${RUNS:-3}
private_dir tmp build
export RUNBOOK_STATE_DIR="$tmp/state"

bench_database rb_dump_large "$DUMP_MB"
if [ "${KEEP:-0}" != 1 ]; then at_exit 'psql -X -q "$su_url" -c "DROP DATABASE IF EXISTS rb_dump_large"'; fi
psql -X -q "$db_url" -v ON_ERROR_STOP=1 <<SQL
CREATE TABLE IF NOT EXISTS tags (id int PRIMARY KEY, name text NOT NULL);
INSERT INTO tags SELECT g, 'tag-' || g FROM generate_series(1, 1000) g ON CONFLICT DO NOTHING;
VACUUM ANALYZE tags;
SQL
size=$(psql -X -A -t "$db_url" -c "SELECT pg_size_pretty(pg_database_size('rb_dump_large'))")

cat >"$tmp/dump.lua" <<LUA
name = "dump" description = "dump rb_dump_large"
step "dump" { run = function() pg.dump { url = "$db_url", file = "$tmp/rb.dump", format = "custom" } end }
LUA
echo "env $(pg_env "$db_url") pg_dump --format=c --file=$tmp/pg.dump" >"$tmp/pg_dump.sh"
# Alternating runs (pg.dump, pg_dump, pg.dump...), so a change in the machine's load falls on both;
# wall time, and the CPU time of the processes on this side (the server's is not counted).
python3 - "$RUNS" "$tmp" "$size" <<'PY'
import os, resource, statistics, subprocess, sys, time
runs, tmp, size = int(sys.argv[1]), sys.argv[2], sys.argv[3]
cmds = {"pg.dump": ["./runbook", "run", f"{tmp}/dump.lua", "--yes", "--output", "json"],
        "pg_dump": ["bash", f"{tmp}/pg_dump.sh"]}
wall, cpu, rss = {k: [] for k in cmds}, {k: [] for k in cmds}, {k: 0 for k in cmds}
for _ in range(runs):
    for name, cmd in cmds.items():
        for f in ("rb.dump", "pg.dump"):
            if os.path.exists(f"{tmp}/{f}"): os.remove(f"{tmp}/{f}")
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        wall[name].append(time.monotonic() - t0)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu[name].append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
        rss[name] = max(rss[name], after.ru_maxrss)
dump = os.path.getsize(f"{tmp}/pg.dump")
a, b = statistics.median(wall["pg.dump"]), statistics.median(wall["pg_dump"])
ca, cb = statistics.median(cpu["pg.dump"]), statistics.median(cpu["pg_dump"])
print(f"load average {open('/proc/loadavg').read().split()[0]} at the end; {runs} runs each, alternating")
print("| database | dump | pg.dump (median) | pg_dump (median) | ratio | CPU here pg.dump / pg_dump | peak RSS |")
print("|---|---|---|---|---|---|---|")
print(f"| {size} | {dump / 2**20:.0f} MB | {a:.2f} s | {b:.2f} s | {a / b:.3f} | {ca:.2f} s / {cb:.2f} s "
      f"| {rss['pg.dump'] / 1024:.1f} MB (the largest process) |")
PY
