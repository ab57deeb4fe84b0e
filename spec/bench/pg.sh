#!/usr/bin/env bash
# PostgreSQL through the pg module vs the tools it replaces, each pair side by
# side in one hyperfine run, reported as ratios of medians:
#   1. QUERIES (default 10000) small queries: one runbook on one connection
#      vs as many `psql -c` invocations;
#   2. a dump of a ~DUMP_MB (default 1024) MB database: pg.dump (pg_dump plus
#      verification, checksum and the manifest's row counts) vs pg_dump
#      directly, both --format=custom.
# Needs the sandbox (examples/sandbox/up). The bench database rb_bench is made
# once with the sandbox's superuser and kept for re-runs; DROP=1 drops it.
. "$(dirname "$0")/lib.sh"
. examples/sandbox/.state/env
QUERIES=${QUERIES:-10000} DUMP_MB=${DUMP_MB:-1024} RUNS=${RUNS:-2} QUERY_RUNS=${QUERY_RUNS:-1}
export RUNBOOK_STATE_DIR="$tmp/state"

ratio() { # hyperfine json, label, the other tool's name
  python3 - "$@" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))["results"]
a, b = r[0]["median"], r[1]["median"]
print(f"{sys.argv[2]}: runbook median {a:.2f} s; {sys.argv[3]} median {b:.2f} s; runbook/{sys.argv[3]} = {a/b:.3f}")
PY
}

# ---- 1. small queries ----
cat >"$tmp/queries.lua" <<LUA
name = "queries" description = "$QUERIES small queries"
step "query" { run = function()
  local db <close> = pg.connect()
  for i = 1, $QUERIES do assert(db:value("SELECT \$1::int + 1", i) == i + 1) end
end }
LUA
cat >"$tmp/psql.sh" <<SH
for i in \$(seq $QUERIES); do psql -X -q -A -t "\$DATABASE_URL" -c "SELECT \$i::int + 1" >/dev/null; done
SH
hyperfine --runs "$QUERY_RUNS" --export-json "$tmp/q.json" \
  "./runbook run $tmp/queries.lua --yes --output json" "bash $tmp/psql.sh" >/dev/null
ratio "$tmp/q.json" "$QUERIES queries" "psql -c"

# ---- 2. dump of a large database ----
bench_database rb_bench "$DUMP_MB"
echo "bench database: $(psql -X -A -t "$db_url" -c "SELECT pg_size_pretty(pg_database_size('rb_bench'))")"
cat >"$tmp/dump.lua" <<LUA
name = "dump" description = "dump rb_bench"
step "dump" { run = function() pg.dump { url = "$db_url", file = "$tmp/rb.dump", format = "custom" } end }
LUA
echo "env $(pg_env "$db_url") pg_dump --format=c --file=$tmp/pg.dump" >"$tmp/pg_dump.sh"
hyperfine --runs "$RUNS" --export-json "$tmp/d.json" --prepare "rm -f $tmp/rb.dump $tmp/pg.dump" \
  "./runbook run $tmp/dump.lua --yes --output json" "bash $tmp/pg_dump.sh" >/dev/null
ratio "$tmp/d.json" "dump of rb_bench (custom format)" "pg_dump"
ls -l "$tmp"/*.dump 2>/dev/null | awk '{print "  " $5 " bytes " $9}'

if [ "${DROP:-0}" = 1 ]; then psql -X -q "$su_url" -c "DROP DATABASE rb_bench"; fi
