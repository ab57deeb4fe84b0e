# The set-up the benchmarks share; each starts with
#   . "$(dirname "$0")/lib.sh"
# which stops at the first error, works from the repository's root, and gives:
#   $tmp                        a directory removed on exit
#   at_exit CMD                 CMD (evaluated) runs on exit, before what was given earlier
#   private_dir VAR [build|shm] a new directory in $VAR, removed on exit: in $tmp, or in
#                               build/ (room for large files) or /dev/shm (a journal in memory)
#   with_sandbox                the sandbox up and its env (DATABASE_URL, KUBECONFIG ...) set, and
#                               $KUBECTL, the kubectl the Kubernetes benchmarks compare with
#   http_fixture                spec/fixtures/http_server.py on a free port at $base, stopped on exit
#   medians FILE NAME... <<PY   the Python on stdin run with each command's median of hyperfine's
#                               --export-json FILE, in milliseconds, as NAME (in order)
#   bench_database NAME MB      the sandbox's database NAME at $db_url ($su_url: as its superuser),
#                               made the first time with a table events of about MB megabytes (rows
#                               of ~250 bytes, half of it incompressible: compression has real work)
#   pg_env URL                  URL as libpq's variables (PGHOST=... PGDATABASE=...), for env
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

bench_exits=()
at_exit() { bench_exits=("$1" ${bench_exits[@]+"${bench_exits[@]}"}); }
trap 'for c in ${bench_exits[@]+"${bench_exits[@]}"}; do eval "$c" || true; done' EXIT
tmp=$(mktemp -d)
at_exit "rm -rf '$tmp'"

private_dir() {
  local d
  case "${2:-}" in
    build) mkdir -p build; d=$(mktemp -d -p "$PWD/build" bench.XXXXXX) ;;
    shm) d=$(mktemp -d -p /dev/shm 2>/dev/null || mktemp -d) ;;
    *) d=$(mktemp -d -p "$tmp") ;;
  esac
  at_exit "rm -rf '$d'"
  printf -v "$1" %s "$d"
}

with_sandbox() {
  examples/sandbox/up >/dev/null
  . examples/sandbox/.state/env
  KUBECTL=${KUBECTL:-/usr/lib/google-cloud-sdk/bin/kubectl.1.32}
}

http_fixture() {
  python3 spec/fixtures/http_server.py "$tmp/port" >/dev/null 2>&1 &
  at_exit "kill $!"
  local i=0
  while [ ! -s "$tmp/port" ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i + 1)); done
  base="http://127.0.0.1:$(cat "$tmp/port")"
}

medians() {
  python3 -c '
import json, sys
r = json.load(open(sys.argv[1]))["results"]
exec(sys.stdin.read(), dict(zip(sys.argv[2:], (x["median"] * 1000 for x in r))))' "$@"
}

bench_database() {
  su_url=$(echo "$DATABASE_URL" | sed "s|//todo:[^@]*@|//postgres:$(cat examples/sandbox/.state/secrets/postgres)@|; s|/todo\$|/postgres|")
  db_url=$(echo "$DATABASE_URL" | sed "s|/todo\$|/$1|")
  [ "$(psql -X -A -t "$su_url" -c "SELECT count(*) FROM pg_database WHERE datname = '$1'")" = 0 ] || return 0
  psql -X -q "$su_url" -c "CREATE DATABASE $1 OWNER todo"
  psql -X -q "$db_url" -v ON_ERROR_STOP=1 <<SQL
CREATE TABLE events (id bigint PRIMARY KEY, at timestamptz NOT NULL, kind text NOT NULL, payload text NOT NULL);
INSERT INTO events SELECT g, now() - g * interval '1 second', 'task.' || (g % 7),
  md5(g::text) || md5((g * 31)::text) || md5((g * 17)::text) || repeat('x', 80)
FROM generate_series(1, ($2::bigint * 1024 * 1024 / 250)) g;
VACUUM ANALYZE events;
SQL
}

pg_env() {
  python3 -c 'import sys,urllib.parse as u; p=u.urlparse(sys.argv[1]); print(f"PGHOST={p.hostname} PGPORT={p.port} PGUSER={p.username} PGPASSWORD={u.unquote(p.password)} PGDATABASE={p.path[1:]}")' "$1"
}
