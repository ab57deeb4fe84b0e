# Shared by up, down and ctl: where things live and how each part starts and stops.
# Sourced, not run. Every function assumes SANDBOX_DIR and STATE_DIR are set.

SANDBOX_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# SANDBOX_STATE picks another state directory, i.e. a second, independent
# sandbox from the same checkout (the lifecycle spec uses one).
STATE_DIR=${SANDBOX_STATE:-$SANDBOX_DIR/.state}
case $STATE_DIR in /*) ;; *) STATE_DIR=$PWD/$STATE_DIR ;; esac
PG_BIN=${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}
# Built once per checkout, also for sandboxes with another SANDBOX_STATE.
KAFKA_TOOL=$SANDBOX_DIR/.state/bin/kafka-sandbox
DEPLOYMENTS="backend frontend websocket recurring-task notification"

say() { printf 'sandbox: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

# Ports the kernel considers free right now, one per name given, written to
# .state/ports/NAME (one Python start for all: each costs a fraction of a
# second on a loaded machine). The small race with other programs is
# acceptable for a sandbox; it is what lets two checkouts coexist.
free_ports() {
    python3 - "$STATE_DIR/ports" "$@" <<'PY'
import os, socket, sys
socks = []
for name in sys.argv[2:]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
    with open(os.path.join(sys.argv[1], name), "w") as f:
        f.write("%d\n" % s.getsockname()[1])
PY
}

# A secret made once per checkout and kept, so a reused database keeps working.
secret() {
    local f=$STATE_DIR/secrets/$1
    if [ ! -s "$f" ]; then
        mkdir -p "$STATE_DIR/secrets" && chmod 700 "$STATE_DIR/secrets"
        openssl rand -hex 12 >"$f"
    fi
    cat "$f"
}

# `read`, not `cat`: `up` checks every part this way, and a fork costs on a loaded machine.
pid_alive() { local pid; [ -s "$1" ] && read -r pid <"$1" && kill -0 "$pid" 2>/dev/null; }

# wait_for PART SECONDS COMMAND...: polls until COMMAND succeeds; gives up at
# once when PART's process (.state/pids/PART) has exited, pointing at its log.
wait_for() {
    local part=$1 deadline=$((SECONDS + $2))
    shift 2
    until "$@" >/dev/null 2>&1; do
        pid_alive "$STATE_DIR/pids/$part" || die "$part exited during start (see $STATE_DIR/logs/$part.log)"
        [ $SECONDS -lt $deadline ] || die "$part did not become ready (see $STATE_DIR/logs/$part.log)"
        sleep 0.05
    done
}

# Starts a long-running process detached from the caller's session (so make
# returns and a terminal's Ctrl-C does not reach it) and records its pid.
spawn() {
    local name=$1
    shift
    setsid "$@" </dev/null >>"$STATE_DIR/logs/$name.log" 2>&1 &
    echo $! >"$STATE_DIR/pids/$name"
}

# Stops the process recorded in a pid file: TERM, up to 5 s grace, then KILL.
stop_pidfile() {
    local f=$1 pid i
    pid=$(cat "$f" 2>/dev/null) || return 0
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null
        for i in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
    fi
    rm -f "$f"
}

# ---- PostgreSQL ----

# PostgreSQL refuses to run as root; as root it runs as the postgres user,
# from / since it may not enter the checkout (every path given is absolute).
as_pg() {
    if [ "$(id -u)" = 0 ]; then (cd / && runuser -u postgres -- "$@"); else "$@"; fi
}

# .state/postgres may be a symlink to /tmp (see pg_dir in up); the postgres
# user may not be able to walk through .state, so it gets the real path.
pg_home() { readlink -f "$STATE_DIR/postgres"; }
pg_data() { echo "$(pg_home)/data"; }

pg_running() { as_pg "$PG_BIN/pg_ctl" -D "$(pg_data)" status >/dev/null 2>&1; }

# pg_stat_statements is loaded at start (not in postgresql.conf), so clusters
# made before it was added get it too; pg_seed creates the extension.
pg_start() {
    local port
    port=$(cat "$STATE_DIR/ports/postgres")
    as_pg "$PG_BIN/pg_ctl" -D "$(pg_data)" -l "$(pg_home)/server.log" \
        -o "-p $port -c shared_preload_libraries=pg_stat_statements" -w -t 30 start >/dev/null || die "PostgreSQL did not start (see $(pg_home)/server.log)"
}

pg_stop() {
    pg_running || return 0
    as_pg "$PG_BIN/pg_ctl" -D "$(pg_data)" -m fast -w -t 30 stop >/dev/null
}

# ---- Redis ----

# A throwaway CA and a server certificate for 127.0.0.1 and localhost, for
# Redis's TLS port (rediss://); clients verify it with REDIS_CA_FILE.
redis_tls_certs() {
    local d=$STATE_DIR/redis/tls
    [ -f "$d/server.crt" ] && return 0
    mkdir -p "$d"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=sandbox-redis-ca" \
        -keyout "$d/ca.key" -out "$d/ca.crt" 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n' >"$d/server.ext"
    openssl req -newkey rsa:2048 -nodes -subj "/CN=sandbox-redis" -keyout "$d/server.key" -out "$d/server.csr" 2>/dev/null
    openssl x509 -req -in "$d/server.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial -days 3650 \
        -extfile "$d/server.ext" -out "$d/server.crt" 2>/dev/null
    rm -f "$d/server.csr" "$d/server.ext"
}

redis_start() {
    local port tls=$STATE_DIR/redis/tls
    port=$(cat "$STATE_DIR/ports/redis")
    mkdir -p "$STATE_DIR/redis"
    redis_tls_certs
    # No periodic saves; `ctl redis stop` saves on shutdown (see ctl).
    # 127.0.0.2 (loopback too) is not in the certificate: specs check the name check with it.
    spawn redis redis-server --bind 127.0.0.1 127.0.0.2 --port "$port" --requirepass "$(secret redis)" \
        --tls-port "$(cat "$STATE_DIR/ports/redis-tls")" --tls-cert-file "$tls/server.crt" \
        --tls-key-file "$tls/server.key" --tls-ca-cert-file "$tls/ca.crt" --tls-auth-clients no \
        --save '' --appendonly no --dir "$STATE_DIR/redis" --daemonize no --protected-mode yes
}

redis_cli() {
    redis-cli --no-auth-warning -h 127.0.0.1 -p "$(cat "$STATE_DIR/ports/redis")" -a "$(secret redis)" "$@"
}

# ---- Prometheus, Alertmanager, Pushgateway ----

# Prometheus scrapes the pods and exporters the Kubernetes stand-in lists in
# .state/prometheus/targets/ (file_sd: it follows the files as pods come and go),
# the `runbook serve` processes a spec lists in targets/serve.json,
# and the Pushgateway (the metrics runs push when they end, their labels kept),
# every second and evaluates prometheus/rules.yml every second.
prometheus_config() {
    local d=$STATE_DIR/prometheus
    cat >"$d/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files: ['$SANDBOX_DIR/prometheus/rules.yml']
alerting:
  alertmanagers:
    - static_configs: [{targets: ['127.0.0.1:$(cat "$STATE_DIR/ports/alertmanager")']}]
scrape_configs:
  - job_name: todo-chatbot
    file_sd_configs: [{files: ['$d/targets/pods.json']}]
  - job_name: exporters
    file_sd_configs: [{files: ['$d/targets/exporters.json']}]
  - job_name: prometheus
    static_configs: [{targets: ['127.0.0.1:$(cat "$STATE_DIR/ports/prometheus")']}]
  - job_name: runbook-serve
    file_sd_configs: [{files: ['$d/targets/serve.json']}]
  - job_name: pushgateway
    honor_labels: true
    static_configs: [{targets: ['127.0.0.1:$(cat "$STATE_DIR/ports/pushgateway")']}]
EOF
}

# Alertmanager keeps the alerts (GET /api/v2/alerts) and groups them quickly. Given a
# webhook URL and a file with its bearer token (`ctl alertmanager webhook`), it also
# sends them there, e.g. to a `runbook serve`; without one, nowhere.
alertmanager_config() {
    local url=${1:-} token_file=${2:-} webhook=""
    if [ -n "$url" ]; then
        webhook="    webhook_configs: [{url: '$url', http_config: {authorization: {credentials_file: '$token_file'}}}]"
    fi
    cat >"$STATE_DIR/alertmanager.yml.tmp" <<EOF
route:
  receiver: sandbox
  group_by: [alertname, service]
  group_wait: 1s
  group_interval: 5s
  repeat_interval: 1h
receivers:
  - name: sandbox
$webhook
EOF
    mv "$STATE_DIR/alertmanager.yml.tmp" "$STATE_DIR/alertmanager.yml"
}

# Each starts from empty storage, as every sandbox starts from the seeded state.
start_monitoring() {
    local d=$STATE_DIR/prometheus
    rm -rf "$d/data" "$STATE_DIR/alertmanager"
    mkdir -p "$d/targets" "$STATE_DIR/alertmanager"
    echo '[]' >"$d/targets/serve.json"
    prometheus_config
    alertmanager_config
    spawn prometheus prometheus --config.file="$d/prometheus.yml" --storage.tsdb.path="$d/data" \
        --storage.tsdb.retention.time=1d --web.listen-address="127.0.0.1:$(cat "$STATE_DIR/ports/prometheus")" \
        --log.level=warn
    spawn alertmanager prometheus-alertmanager --config.file="$STATE_DIR/alertmanager.yml" \
        --storage.path="$STATE_DIR/alertmanager" --cluster.listen-address= \
        --web.listen-address="127.0.0.1:$(cat "$STATE_DIR/ports/alertmanager")" --log.level=warn
    spawn pushgateway prometheus-pushgateway --web.listen-address="127.0.0.1:$(cat "$STATE_DIR/ports/pushgateway")" \
        --log.level=warn
}

monitoring_ready() {
    local part
    for part in prometheus alertmanager pushgateway; do
        wait_for "$part" 20 curl -sf -o /dev/null "http://127.0.0.1:$(cat "$STATE_DIR/ports/$part")/-/ready"
    done
}

# ---- Kafka ----

# One request to the Kafka program's control socket; prints its one-line
# reply ("ok ..."), or the error on stderr and fails.
kafka_control() {
    local port reply
    port=$(cat "$STATE_DIR/kafka/control.port" 2>/dev/null) || die "Kafka is not running"
    exec 3<>"/dev/tcp/127.0.0.1/$port" || die "Kafka's control socket is not answering"
    printf '%s\n' "$*" >&3
    IFS= read -r -t 60 reply <&3 || reply="error no reply from Kafka's control socket within 60 s"
    exec 3<&-
    [ "${reply%% *}" = ok ] || die "kafka: ${reply#error }"
    echo "$reply"
}
