#!/usr/bin/env bash
# A step of many small writes, each one a journaled effect (an intent fsync'd
# before it, its outcome after), at 1k, 10k and 100k effects (SIZES), against
# the same writes made by the stock tools on one connection:
#   redis pipelined: r:pipeline of 1000 SETs at a time  vs  redis-cli --pipe
#   pg transaction:  db:exec INSERT each, in one db:transaction  vs  psql -f (BEGIN; the INSERTs; COMMIT)
#   redis one by one: r:command("SET") each  vs  redis-cli reading the commands one at a time
#                    (SEQ_SIZES, default 1000 10000: one fsync per write, 100k would take minutes)
# The state dir is on the checkout's filesystem, so every fsync is real. For
# each: median wall time of RUNS (default 3), per-effect overhead
# ((runbook - peer) / N), peak RSS, journal bytes per effect; and for the
# largest run, `runbook report`'s time and lines. Needs the sandbox
# (make sandbox); not part of the test suite.
set -euo pipefail
cd "$(dirname "$0")/../.."
. examples/sandbox/.state/env
SIZES=${SIZES:-"1000 10000 100000"} SEQ_SIZES=${SEQ_SIZES:-"1000 10000"} RUNS=${RUNS:-3}
mkdir -p build
tmp=$(mktemp -d -p "$PWD/build" bench-journal.XXXXXX)
trap 'rm -rf "$tmp"; psql -X -q "$DATABASE_URL" -c "DROP TABLE IF EXISTS bench_journal" >/dev/null 2>&1 || true' EXIT
export RUNBOOK_STATE_DIR="$tmp/state"
psql -X -q "$DATABASE_URL" -c "DROP TABLE IF EXISTS bench_journal; CREATE TABLE bench_journal (id int, v text)"
redis_args=$(python3 -c 'import sys,urllib.parse as u; p=u.urlparse(sys.argv[1]); print(f"-h {p.hostname} -p {p.port} --user {p.username} --pass {u.unquote(p.password)} --no-auth-warning")' "$REDIS_URL")

cat >"$tmp/pipelined.lua" <<'LUA'
name = "pipelined" description = "N SETs in pipelines of 1000"
param "n" { type = "number" }
step "write" { run = function(ctx)
  local r <close> = redis.connect()
  for from = 1, ctx.params.n, 1000 do
    r:pipeline(function(p)
      for i = from, math.min(from + 999, ctx.params.n) do p:command("SET", "bench:journal:" .. i, "v") end
    end)
  end
end }
LUA
cat >"$tmp/transaction.lua" <<'LUA'
name = "transaction" description = "N INSERTs in one transaction"
param "n" { type = "number" }
step "write" { run = function(ctx)
  local db <close> = pg.connect()
  db:transaction(function(tx)
    for i = 1, ctx.params.n do tx:exec("INSERT INTO bench_journal VALUES ($1, 'v')", i) end
  end)
end }
LUA
cat >"$tmp/sequential.lua" <<'LUA'
name = "sequential" description = "N SETs one by one"
param "n" { type = "number" }
step "write" { run = function(ctx)
  local r <close> = redis.connect()
  for i = 1, ctx.params.n do r:command("SET", "bench:journal:" .. i, "v") end
end }
LUA

peak() { /usr/bin/time -f %M "$@" 2>&1 >/dev/null | tail -n 1; }
row() { # row KIND N RUNBOOK_CMD PEER_CMD PEER_NAME
  local kind=$1 n=$2
  rm -rf "$RUNBOOK_STATE_DIR"
  hyperfine --runs "$RUNS" --export-json "$tmp/h.json" --prepare \
    "psql -X -q '$DATABASE_URL' -c 'TRUNCATE bench_journal'" "$3" "$4" >/dev/null 2>&1
  local journal_bytes=$(( $(cat "$RUNBOOK_STATE_DIR"/runs/*.jsonl | wc -c) / RUNS ))
  local rss=$(peak $3)
  python3 - "$tmp/h.json" "$kind" "$n" "$journal_bytes" "$rss" "$5" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))["results"]
a, b = r[0]["median"], r[1]["median"]
kind, n, jb, rss, peer = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
print(f"| {kind} | {n:,} | {a:.2f} s | {b:.2f} s ({peer}) | {a / b:.1f}x | {(a - b) / n * 1e6:.0f} us "
      f"| {rss / 1024:.1f} MB | {jb / n:.0f} B |")
PY
}

echo "load average $(cut -d' ' -f1 /proc/loadavg); journal on $(df -T "$tmp" | awk 'NR==2 {print $2}')"
echo "| step | effects | runbook | peer | ratio | overhead per effect | peak RSS | journal per effect |"
echo "|---|---|---|---|---|---|---|---|"
for n in $SIZES; do
  python3 -c "
import sys
n = int(sys.argv[1])
with open('$tmp/redis.proto', 'w') as f:
    for i in range(1, n + 1):
        k = f'bench:journal:{i}'
        f.write(f'*3\r\n\$3\r\nSET\r\n\${len(k)}\r\n{k}\r\n\$1\r\nv\r\n')
with open('$tmp/redis.txt', 'w') as f:
    for i in range(1, n + 1): f.write(f'SET bench:journal:{i} v\n')
with open('$tmp/insert.sql', 'w') as f:
    f.write('BEGIN;\n')
    for i in range(1, n + 1): f.write(f\"INSERT INTO bench_journal VALUES ({i}, 'v');\n\")
    f.write('COMMIT;\n')
" "$n"
  row "redis pipelined" "$n" "./runbook run $tmp/pipelined.lua --yes -q -p n=$n" \
    "sh -c 'redis-cli $redis_args --pipe < $tmp/redis.proto'" "redis-cli --pipe"
  row "pg transaction" "$n" "./runbook run $tmp/transaction.lua --yes -q -p n=$n" \
    "psql -X -q $DATABASE_URL -f $tmp/insert.sql" "psql -f"
  if [[ " $SEQ_SIZES " == *" $n "* ]]; then
    row "redis one by one" "$n" "./runbook run $tmp/sequential.lua --yes -q -p n=$n" \
      "sh -c 'redis-cli $redis_args < $tmp/redis.txt'" "redis-cli"
  fi
done
# The report of the largest run: a summary, not a line per effect.
id=$(ls "$RUNBOOK_STATE_DIR/runs" | sort | tail -n 1); id=${id%.jsonl}
start=$(date +%s.%N)
lines=$(./runbook report "$id" | wc -l)
echo "report of the last run ($(du -h "$RUNBOOK_STATE_DIR/runs/$id.jsonl" | cut -f1) journal): $lines lines in $(python3 -c "import time; print(f'{time.time() - $start:.2f}')") s"
redis-cli $redis_args --scan --pattern 'bench:journal:*' | xargs -r -n 1000 redis-cli $redis_args DEL >/dev/null
