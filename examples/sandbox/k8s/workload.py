"""What the pods 'do': their logs, their metrics, and the app health endpoints behind proxy."""
import hashlib
import http.client
import json
import os
import random
import time

from store import now_iso, parse_iso

LINE_EVERY = 5.0     # seconds between synthetic log lines
MAX_LINES = 2000

APP_MESSAGES = [("INFO", "GET /health 200", "uvicorn.access"), ("INFO", "GET /api/tasks 200", "uvicorn.access"),
                ("INFO", "POST /api/tasks 201", "uvicorn.access"), ("INFO", "published event to task-events", "app.events"),
                ("INFO", "state saved to statestore", "app.state"), ("DEBUG", "cache hit for user session", "app.cache"),
                ("WARNING", "slow query on tasks table (412ms)", "app.db"), ("INFO", "PATCH /api/tasks 200", "uvicorn.access"),
                ("ERROR", "publish to task-updates failed: retrying", "app.events"),
                ("INFO", "websocket client connected", "app.ws")]
# seed 002's structured-log fields: every app line names its user, event lines their event type
EVENT_TYPES = ["task.created", "task.updated", "task.completed", "task.deleted"]
CRASH = ("ERROR", "unhandled exception in request handler", "app.handlers")
# The log-errors fault: (namespace, app) -> (since, message, logger, share). From
# `since` on, that share of the app's log lines are ERROR lines with the fault's message.
LOG_ERRORS = {}
# The dapr-stuck fault: pod uid -> since. From `since` on, that control-plane pod logs its
# component's errors (and the injector's stops injecting: controller.admit).
DAPR_STUCK = {}
DAPR_VERSION = "1.14.4"
# The control plane's own lines, by component (label app.kubernetes.io/component): what
# each logs at work, and what it logs when stuck.
CONTROL_PLANE = {
    "operator": ([("info", "Sending component kafka-pubsub (pubsub.kafka) to sidecar todo-chatbot/backend", "dapr.operator.api"),
                  ("info", "Reconciled component todo-chatbot/statestore", "dapr.operator"),
                  ("debug", "Renewed lease dapr-system/operator.dapr.io", "dapr.operator")],
                 ("error", "Error sending component update to sidecar todo-chatbot/backend: rpc error: code = Unavailable "
                           "desc = connection error: transport: authentication handshake failed: x509: certificate signed "
                           "by unknown authority", "dapr.operator.api")),
    "injector": ([("info", "Sidecar injector succeeded injection for app 'backend'", "dapr.injector.service"),
                  ("debug", "Admission request for pod todo-chatbot/backend: dapr.io/enabled=true", "dapr.injector.service"),
                  ("info", "Healthz check passed", "dapr.injector")],
                 ("error", "Sidecar injector failed to inject for app 'backend'. Error: failed to get the trust bundle "
                           "from dapr-sentry: context deadline exceeded", "dapr.injector.service")),
    "sentry": ([("info", "Successfully signed certificate for todo-chatbot/backend", "dapr.sentry"),
                ("info", "Validated token of todo-chatbot/websocket", "dapr.sentry.identity"),
                ("debug", "Trust bundle dapr-trust-bundle is current", "dapr.sentry")],
               ("error", "Failed to sign certificate for todo-chatbot/backend: issuer certificate has expired", "dapr.sentry")),
    "placement": ([("info", "Placement tables updated, version: 42", "dapr.placement"),
                   ("debug", "Heartbeat from todo-chatbot/recurring-task", "dapr.placement"),
                   ("info", "Raft leader is dapr-placement-server-0", "dapr.placement.raft")],
                  ("error", "Failed to disseminate placement tables: raft: no leader elected (lost quorum)", "dapr.placement.raft")),
    "dashboard": ([("info", "GET /api/overview 200", "dapr.dashboard")], None),
}
DAPR_MESSAGES = [("info", "HTTP API Called", "dapr.runtime.http-info"),
                 ("info", "Publishing message to topic", "dapr.runtime.pubsub"),
                 ("info", "component loaded", "dapr.runtime"),
                 ("debug", "sending heartbeat to placement", "dapr.runtime.actor")]


def _rng(*parts):
    return random.Random(hashlib.sha1("|".join(map(str, parts)).encode()).hexdigest())


def log_line(pod, container, app, t, seq):
    r = _rng(pod, container, seq)
    ts = now_iso(t)
    if app in CONTROL_PLANE:
        level, msg, scope = r.choice(CONTROL_PLANE[app][0])
        return dapr_line(ts, level, msg, pod, scope)
    if container == "daprd":
        level, msg, scope = r.choice(DAPR_MESSAGES)
        return dapr_line(ts, level, msg, pod, scope, app)
    level, msg, logger = APP_MESSAGES[r.randrange(len(APP_MESSAGES))] if r.random() < 0.97 else CRASH
    rec = {"timestamp": ts, "level": level, "service": app, "logger": logger, "message": msg,
           "correlation_id": "%08x" % r.getrandbits(32), "pod": pod, "user_id": "user-%d" % r.randint(1, 20)}
    if logger == "app.events":
        rec["event_type"] = r.choice(EVENT_TYPES)
    return json.dumps(rec)


def dapr_line(ts, level, msg, pod, scope, app=None):
    """A line as Dapr's binaries log it (logfmt)."""
    return 'time="%s" level=%s msg="%s"%s instance=%s scope=%s type=log ver=%s' % (
        ts, level, msg.replace('"', '\\"'), " app_id=" + app if app else "", pod, scope, DAPR_VERSION)


def stuck_line(pod, app, t, seq, since):
    """Two lines in three of a stuck control-plane pod from `since` on: its component's error."""
    if since is None or t < since or _rng(pod, "stuck", seq).random() >= 0.67:
        return None
    level, msg, scope = CONTROL_PLANE[app][1]
    return dapr_line(now_iso(t), level, msg, pod, scope)


def crash_tail(app, t):
    return [json.dumps({"timestamp": now_iso(t), "level": "ERROR", "service": app, "logger": "app.main",
                        "message": "startup failed: could not connect to dependency", "correlation_id": "startup"}),
            "Traceback (most recent call last):",
            '  File "/app/main.py", line 42, in <module>',
            "ConnectionRefusedError: [Errno 111] Connection refused"]


def container_logs(pod, cname, previous, now):
    """(timestamp, line) pairs for one container instance, oldest first."""
    cs = next((c for c in pod.get("status", {}).get("containerStatuses", []) if c["name"] == cname), None)
    if cs is None:
        return None
    app = pod["metadata"].get("labels", {}).get("app.kubernetes.io/component") or cname
    if previous:
        term = cs.get("lastState", {}).get("terminated")
        if not term:
            return None
        start, end, crashed = parse_iso(term["startedAt"]), parse_iso(term["finishedAt"]), True
        oom = term.get("reason") == "OOMKilled"
    else:
        run = cs.get("state", {}).get("running")
        if not run:
            term = cs.get("lastState", {}).get("terminated")
            return [] if not term else container_logs_window(pod, cname, app, parse_iso(term["startedAt"]),
                                                             parse_iso(term["finishedAt"]), cs, True, False)
        start, end, crashed, oom = parse_iso(run["startedAt"]), now, False, False
    return container_logs_window(pod, cname, app, start, end, cs, crashed, oom)


def fault_line(pod, app, t, seq, fault):
    """An ERROR line of the log-errors fault, or None for a line it leaves alone."""
    since, message, logger, share = fault
    if t < since or _rng(pod, "log-errors", seq).random() >= share:
        return None
    return json.dumps({"timestamp": now_iso(t), "level": "ERROR", "service": app, "logger": logger, "message": message,
                       "correlation_id": "%08x" % _rng(pod, "log-errors-id", seq).getrandbits(32), "pod": pod})


def container_logs_window(pod, cname, app, start, end, cs, crashed, oom):
    name = pod["metadata"]["name"]
    fault = LOG_ERRORS.get((pod["metadata"]["namespace"], app)) if cname != "daprd" else None
    control = pod["metadata"]["namespace"] == "dapr-system" and app in CONTROL_PLANE
    if not control:
        app = app if app not in CONTROL_PLANE else cname
    since = DAPR_STUCK.get(pod["metadata"].get("uid")) if control and CONTROL_PLANE[app][1] else None
    first = max(0, int((end - start) / LINE_EVERY) - MAX_LINES)
    out = [(start, dapr_line(now_iso(start), "info", "Starting Dapr %s -- version %s" % (app, DAPR_VERSION), name,
                             "dapr." + app) if control else
            json.dumps({"timestamp": now_iso(start), "level": "INFO", "service": app, "logger": "app.main",
                        "message": "starting %s (restart %d)" % (app, cs.get("restartCount", 0))}))]
    seq = first
    while start + (seq + 1) * LINE_EVERY <= end:
        t = start + (seq + 1) * LINE_EVERY
        key = "%d-%d" % (start, seq)
        line = stuck_line(name, app, t, key, since) if control else fault and fault_line(name, app, t, key, fault)
        out.append((t, line or log_line(name, cname, app, t, key)))
        seq += 1
    if crashed and control:
        out.append((end, dapr_line(now_iso(end), "fatal", "Failed to start Dapr %s: exiting" % app, name, "dapr." + app)))
    elif crashed and cname != "daprd":
        out += [(end, l) for l in (["Killed (out of memory)"] if oom else crash_tail(app, end))]
    return out


def quantity(n, unit):
    return "%d%s" % (n, unit)


def pod_usage(pod, cname):
    r = _rng(pod["metadata"]["name"], cname)
    if cname == "daprd":
        return r.randint(2, 9), r.randint(18, 40)
    return r.randint(5, 120), r.randint(60, 220)


def pod_metrics(pod, api_version):
    md = pod["metadata"]
    running = [c for c in pod.get("status", {}).get("containerStatuses", []) if "running" in c.get("state", {})]
    return {"kind": "PodMetrics", "apiVersion": api_version,
            "metadata": {"name": md["name"], "namespace": md["namespace"], "labels": md.get("labels", {}),
                         "creationTimestamp": now_iso()},
            "timestamp": now_iso(time.time() - 10), "window": "15s",
            "containers": [{"name": c["name"], "usage": {"cpu": quantity(pod_usage(pod, c["name"])[0] * 1000000, "n"),
                                                           "memory": quantity(pod_usage(pod, c["name"])[1] * 1024, "Ki")}}
                           for c in running]}


def node_metrics(node, pods, api_version):
    cpu, mem = 180, 900
    for p in pods:
        if p["spec"].get("nodeName") == node["metadata"]["name"]:
            for c in p.get("status", {}).get("containerStatuses", []):
                if "running" in c.get("state", {}):
                    u = pod_usage(p, c["name"])
                    cpu, mem = cpu + u[0], mem + u[1]
    return {"kind": "NodeMetrics", "apiVersion": api_version,
            "metadata": {"name": node["metadata"]["name"], "labels": node["metadata"].get("labels", {}),
                         "creationTimestamp": now_iso()},
            "timestamp": now_iso(time.time() - 10), "window": "20s",
            "usage": {"cpu": quantity(cpu * 1000000, "n"), "memory": quantity(mem * 1024, "Ki")}}


def app_port(state_dir, app):
    path = os.path.join(state_dir or "", "apps.json")
    try:
        with open(path) as f:
            return json.load(f).get(app, {}).get("port")
    except (OSError, ValueError):
        return None


def forward(port, method, path, body, headers):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path, body=body or None,
                     headers={k: v for k, v in headers.items() if k.lower() in ("content-type", "accept")})
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type", "text/plain"), resp.read()
    finally:
        conn.close()
