"""The pods' /metrics: simulated HTTP traffic routed as the Services and the Ingress say, in the
Prometheus exposition format, and the file_sd target lists that Prometheus discovers them through.

Every second the traffic of each app is split: an Ingress path with nginx canary Ingresses beside it
(annotations nginx.ingress.kubernetes.io/canary and canary-weight) sends each canary its weight's share,
the rest to the stable Service; a Service spreads its share evenly over its ready endpoints. Each pod
counts its requests (method, status), their latencies in a histogram, and its app's own gauges. Faults
(`ctl metrics ...`) raise the 5xx share or the latency of a deployment or of one image version, grow
memory, or make scrapes fail.

Served on one loopback port (STATE_DIR/ports/metrics):
  /pods/NAMESPACE/POD/metrics   one pod's metrics (namespace, service, pod, version and deployment come
                                from the target labels in STATE_DIR/prometheus/targets/pods.json)
  /kube-state-metrics/metrics   restarts, memory limits and working sets of every pod (as
                                kube-state-metrics and cAdvisor publish them)
  /kafka-exporter/metrics       kafka_consumergroup_lag per group, topic and partition, as the Kafka
                                program writes it after each tick (STATE_DIR/kafka/lag.prom)
"""
import json
import math
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from api import labels_match
from controller import memory_limit
from store import parse_iso
from workload import pod_usage

NS = "todo-chatbot"
TICK = 1.0
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
SIGMA = 0.5                      # spread of the log-normal latency
# app -> requests per second, base 5xx share, median latency (s)
APPS = {"backend": (30.0, 0.002, 0.040), "frontend": (20.0, 0.001, 0.020), "websocket": (8.0, 0.002, 0.015),
        "recurring-task": (4.0, 0.002, 0.060), "notification": (3.0, 0.002, 0.030)}
CANARY = "nginx.ingress.kubernetes.io/canary"
WEIGHT = "nginx.ingress.kubernetes.io/canary-weight"
WEIGHT_TOTAL = "nginx.ingress.kubernetes.io/canary-weight-total"
MIB = 1024 * 1024
POOL_SIZE = 20
REMINDERS_PER_S = 2.0


class MetricFaults:
    """What `ctl metrics` set: per target, where a target is ("deployment", ns, name) or ("version", app, tag)."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.errors, self.latency, self.pool, self.scrape_fail = {}, {}, {}, set()
        self.capacity = {}           # target -> requests per second one pod serves before it slows down
        self.memory = {}             # target -> (MiB per second, since)
        self.rate_limit = {}         # target -> requests per second an upstream provider allows per API key
        self.reminder_failures = None

    def describe(self):
        name = lambda t: t[2] if t[0] == "deployment" else "%s:%s" % t[1:]
        return {"errors": {name(t): v for t, v in self.errors.items()},
                "latency": {name(t): v for t, v in self.latency.items()},
                "memory_growth_mib_per_s": {name(t): v[0] for t, v in self.memory.items()},
                "pool_usage": {name(t): v for t, v in self.pool.items()},
                "capacity_rps_per_pod": {name(t): v for t, v in self.capacity.items()},
                "rate_limit_rps_per_key": {name(t): v for t, v in self.rate_limit.items()},
                "scrape_fail": sorted(name(t) for t in self.scrape_fail),
                "reminder_failures": self.reminder_failures}


def lognormal_cdf(x, median):
    return 0.5 * (1 + math.erf(math.log(x / median) / (SIGMA * math.sqrt(2))))


class Pod:
    def __init__(self, uid):
        self.uid = uid
        self.requests = {}           # (method, status) -> count (float; exposed whole)
        self.buckets = [0.0] * len(BUCKETS)
        self.count = self.sum = 0.0
        self.reminders = {"success": 0.0, "failure": 0.0}
        self.rps = 0.0
        self.info = {}
        self.api_keys = 1            # the API keys its env held when it started (at least 1)


class Metrics:
    def __init__(self, cluster):
        self.cluster, self.store = cluster, cluster.store
        self.state_dir = cluster.state_dir
        self.faults = MetricFaults()
        self.pods = {}               # uid -> Pod
        self.lock = threading.Lock()
        self.written = None
        self.port = None

    # what runs where ---------------------------------------------------------------
    def snapshot(self):
        """(pod infos, rps per service name, endpoints) read under the store lock."""
        with self.store.lock:
            pods = [p for p in self.store.list("pods", NS, shared=True) if p.get("status", {}).get("podIP")]
            services = self.store.list("services", NS, shared=True)
            ingresses = self.store.list("ingresses.networking.k8s.io", NS, shared=True)
            deployment_of = {p["metadata"]["uid"]: self.cluster.controller.deployment_of(p) for p in pods}
        return pods, services, ingresses, deployment_of

    @staticmethod
    def service_rps(services, ingresses):
        """Requests per second per Service: an app's traffic enters through the Ingress paths that
        send to a Service of its pods (after a blue-green switch, the new color's), else through
        its todo-chatbot-APP Service; canary Ingresses take their weight's share of a path."""
        app_of = {s["metadata"]["name"]: s["spec"].get("selector", {}).get("app.kubernetes.io/component")
                  for s in services}
        rps, stable, exposed = {}, {}, set()
        for ing in ingresses:
            if ing["metadata"].get("annotations", {}).get(CANARY) != "true":
                for host, path, svc in ingress_paths(ing):
                    if app_of.get(svc) in APPS:
                        stable[(host, path)] = svc
                        rps[svc] = rps.get(svc, 0.0) + APPS[app_of[svc]][0]
                        exposed.add(app_of[svc])
        for app, spec in APPS.items():
            if app not in exposed and app_of.get("todo-chatbot-" + app) == app:
                rps["todo-chatbot-" + app] = spec[0]
        for ing in ingresses:
            ann = ing["metadata"].get("annotations", {})
            if ann.get(CANARY) != "true":
                continue
            try:
                share = float(ann.get(WEIGHT, "0")) / float(ann.get(WEIGHT_TOTAL, "100"))
            except ValueError:
                continue
            share = min(max(share, 0.0), 1.0)
            for host, path, svc in ingress_paths(ing):
                main = stable.get((host, path))
                if main in rps and main != svc:
                    moved = rps[main] * share
                    rps[main] -= moved
                    rps[svc] = rps.get(svc, 0.0) + moved
        return rps

    def tick(self, dt, now):
        pods, services, ingresses, deployment_of = self.snapshot()
        rps = self.service_rps(services, ingresses)
        share = {}                   # pod uid -> rps
        for s in services:
            sel = s["spec"].get("selector")
            if not sel or s["metadata"]["name"] not in rps:
                continue
            reqs = [(k, "=", v) for k, v in sel.items()]
            ready = [p for p in pods if labels_match(reqs, p["metadata"].get("labels")) and is_ready(p)]
            for p in ready:
                share[p["metadata"]["uid"]] = share.get(p["metadata"]["uid"], 0.0) + rps[s["metadata"]["name"]] / len(ready)
        total = {}                   # deployment -> rps of all its pods
        for p in pods:
            d = deployment_of.get(p["metadata"]["uid"])
            total[d] = total.get(d, 0.0) + share.get(p["metadata"]["uid"], 0.0)
        with self.lock:
            seen = {}
            for p in pods:
                uid = p["metadata"]["uid"]
                st = self.pods.get(uid)
                if st is None:
                    st = Pod(uid)
                    st.api_keys = self.api_keys(p)
                st.info = pod_info(p, deployment_of.get(uid))
                st.rps = share.get(uid, 0.0)
                self.advance(st, dt, now, total.get(deployment_of.get(uid)) or st.rps)
                seen[uid] = st
            self.pods = seen
        self.write_targets()

    def api_keys(self, p):
        """The keys with API_KEY in their name of the Secrets the pod's containers read (envFrom, env)."""
        keys = set()
        for c in p["spec"].get("containers", []):
            for ef in c.get("envFrom") or []:
                ref = ef.get("secretRef")
                s = ref and self.store.get("secrets", p["metadata"]["namespace"], ref.get("name"))
                keys.update(k for k in ((s or {}).get("data") or {}) if "API_KEY" in k)
            for e in c.get("env") or []:
                ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                if ref and "API_KEY" in ref.get("key", ""):
                    keys.add(ref["key"])
        return max(1, len(keys))

    def fault(self, table, info, default=None):
        """The value a fault table holds for a pod: its version's, else its deployment's."""
        for key in (("version", info["service"], info["version"]), ("deployment", info["namespace"], info["deployment"])):
            if key in table:
                return table[key]
        return default

    def advance(self, st, dt, now, total):
        info = st.info
        app = APPS.get(info["service"])
        if not app or st.rps <= 0:
            return
        n = st.rps * dt
        err = self.fault(self.faults.errors, info, app[1])
        median = self.fault(self.faults.latency, info, app[2])
        capacity = self.fault(self.faults.capacity, info)
        if capacity and st.rps > capacity:   # a saturated pod queues: latency grows with the square of the overload
            median *= (st.rps / capacity) ** 2
        quota = self.fault(self.faults.rate_limit, info)   # the provider's, per API key, over the deployment
        throttled = max(0.0, 1 - quota * st.api_keys / total) if quota else 0.0
        for method, part in (("GET", 0.75), ("POST", 0.25)):
            ok = "200" if method == "GET" else "201"
            for status, k in ((ok, (1 - throttled) * (1 - err)), ("500", (1 - throttled) * err), ("429", throttled)):
                if k > 0 or status != "429":
                    st.requests[(method, status)] = st.requests.get((method, status), 0.0) + n * part * k
        for i, le in enumerate(BUCKETS):
            st.buckets[i] += n * lognormal_cdf(le, median)
        st.count += n
        st.sum += n * median * math.exp(SIGMA * SIGMA / 2)
        if info["service"] == "notification":
            fail = self.faults.reminder_failures if self.faults.reminder_failures is not None else 0.01
            st.reminders["failure"] += REMINDERS_PER_S * dt * fail
            st.reminders["success"] += REMINDERS_PER_S * dt * (1 - fail)

    def memory(self, info, now):
        base = info["memory_base"]
        grow = self.fault(self.faults.memory, info)
        if grow:
            base += grow[0] * MIB * max(0.0, now - max(grow[1], info["started"]))
        return int(base)

    # exposition ---------------------------------------------------------------------
    def pod_text(self, namespace, name):
        now = time.time()
        with self.lock:
            st = next((s for s in self.pods.values()
                       if s.info["pod"] == name and s.info["namespace"] == namespace), None)
            if st is None:
                return 404, "no such pod\n"
            info = st.info
            if self.fault({t: True for t in self.faults.scrape_fail}, info):
                return 503, "metrics endpoint failing (sandbox fault)\n"
            out = ["# HELP http_requests_total HTTP requests served, by method and status.",
                   "# TYPE http_requests_total counter"]
            for (method, status), v in sorted(st.requests.items()):
                out.append('http_requests_total{method="%s",status="%s"} %d' % (method, status, v))
            out += ["# HELP http_request_duration_seconds Time to serve an HTTP request.",
                    "# TYPE http_request_duration_seconds histogram"]
            for le, v in zip(BUCKETS, st.buckets):
                out.append('http_request_duration_seconds_bucket{le="%s"} %d' % (le, v))
            out += ['http_request_duration_seconds_bucket{le="+Inf"} %d' % st.count,
                    "http_request_duration_seconds_sum %.3f" % st.sum,
                    "http_request_duration_seconds_count %d" % st.count,
                    "# HELP process_resident_memory_bytes Resident memory size in bytes.",
                    "# TYPE process_resident_memory_bytes gauge",
                    "process_resident_memory_bytes %d" % self.memory(info, now),
                    "# TYPE process_start_time_seconds gauge",
                    "process_start_time_seconds %d" % info["started"]]
            if info["service"] == "websocket":
                out += ["# HELP websocket_connections Open WebSocket connections.", "# TYPE websocket_connections gauge",
                        "websocket_connections %d" % round(st.rps * 25)]
            if info["service"] == "backend":
                usage = self.fault(self.faults.pool, info, min(0.9, 0.15 + st.rps * 0.01))
                out += ["# HELP db_pool_connections_in_use Database pool connections checked out.",
                        "# TYPE db_pool_connections_in_use gauge",
                        "db_pool_connections_in_use %d" % round(usage * POOL_SIZE),
                        "# HELP db_pool_connections_max The database pool's size.", "# TYPE db_pool_connections_max gauge",
                        "db_pool_connections_max %d" % POOL_SIZE]
            if info["service"] == "notification":
                out += ["# HELP reminder_deliveries_total Reminders sent, by result.",
                        "# TYPE reminder_deliveries_total counter"]
                out += ['reminder_deliveries_total{result="%s"} %d' % kv for kv in sorted(st.reminders.items())]
        return 200, "\n".join(out) + "\n"

    def cluster_text(self):
        now = time.time()
        with self.lock:
            infos = [s.info for s in self.pods.values()]
        out = ["# HELP kube_pod_container_status_restarts_total Restarts of a container.",
               "# TYPE kube_pod_container_status_restarts_total counter"]
        for i in infos:
            out.append('kube_pod_container_status_restarts_total{namespace="%s",pod="%s",container="%s"} %d' % (
                i["namespace"], i["pod"], i["service"], i["restarts"]))
        out += ["# TYPE kube_pod_container_resource_limits gauge"]
        for i in infos:
            if i["memory_limit"]:
                out.append('kube_pod_container_resource_limits{namespace="%s",pod="%s",container="%s",resource="memory",unit="byte"} %d' % (
                    i["namespace"], i["pod"], i["service"], i["memory_limit"]))
        out += ["# TYPE container_memory_working_set_bytes gauge"]
        for i in infos:
            out.append('container_memory_working_set_bytes{namespace="%s",pod="%s",container="%s"} %d' % (
                i["namespace"], i["pod"], i["service"], self.memory(i, now)))
        return "\n".join(out) + "\n"

    def lag_text(self):
        try:
            with open(os.path.join(self.state_dir, "kafka", "lag.prom")) as f:
                return f.read()
        except OSError:
            return ""

    # file_sd ------------------------------------------------------------------------
    def write_targets(self):
        addr = "127.0.0.1:%d" % self.port
        with self.lock:
            groups = [{"targets": [addr], "labels": {
                "__metrics_path__": "/pods/%s/%s/metrics" % (s.info["namespace"], s.info["pod"]),
                "namespace": s.info["namespace"], "pod": s.info["pod"], "service": s.info["service"],
                "version": s.info["version"], "deployment": s.info["deployment"] or ""}}
                for s in self.pods.values() if s.info["service"] in APPS]
        groups.sort(key=lambda g: g["labels"]["pod"])
        if groups != self.written:
            write_json(os.path.join(self.state_dir, "prometheus", "targets", "pods.json"), groups)
            self.written = groups

    def run(self):
        last = time.time()
        while True:
            time.sleep(TICK)
            now = time.time()
            try:
                self.tick(now - last, now)
            except Exception:  # keep counting; the log shows what broke
                import traceback
                traceback.print_exc()
            last = now

    def start(self):
        metrics = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt, *args):
                pass

            def do_GET(self):
                parts = self.path.split("?")[0].strip("/").split("/")
                if parts[:1] == ["pods"] and len(parts) == 4 and parts[3] == "metrics":
                    code, text = metrics.pod_text(parts[1], parts[2])
                elif parts == ["kube-state-metrics", "metrics"]:
                    code, text = 200, metrics.cluster_text()
                elif parts == ["kafka-exporter", "metrics"]:
                    code, text = 200, metrics.lag_text()
                else:
                    code, text = 404, "not found\n"
                data = text.encode()
                self.send_response(code)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        httpd.daemon_threads = True
        self.port = httpd.server_address[1]
        addr = "127.0.0.1:%d" % self.port
        write_json(os.path.join(self.state_dir, "prometheus", "targets", "exporters.json"), [
            {"targets": [addr], "labels": {"job": "kube-state-metrics", "__metrics_path__": "/kube-state-metrics/metrics"}},
            {"targets": [addr], "labels": {"job": "kafka-exporter", "__metrics_path__": "/kafka-exporter/metrics"}}])
        self.tick(0, time.time())
        with open(os.path.join(self.state_dir, "ports", "metrics"), "w") as f:
            f.write("%d\n" % self.port)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        threading.Thread(target=self.run, daemon=True).start()


def ingress_paths(ing):
    for rule in ing["spec"].get("rules", []):
        for p in rule.get("http", {}).get("paths", []):
            svc = p.get("backend", {}).get("service", {}).get("name")
            if svc:
                yield rule.get("host", ""), p.get("path", "/"), svc


def is_ready(p):
    return not p["metadata"].get("deletionTimestamp") and any(
        c["type"] == "Ready" and c["status"] == "True" for c in p.get("status", {}).get("conditions", []))


def pod_info(p, deployment):
    c = p["spec"]["containers"][0]
    cs = next((s for s in p["status"].get("containerStatuses", []) if s["name"] == c["name"]), {})
    running = cs.get("state", {}).get("running", {})
    return {"namespace": p["metadata"]["namespace"], "pod": p["metadata"]["name"], "service": c["name"],
            "version": c.get("image", "").rsplit(":", 1)[-1], "deployment": deployment,
            "restarts": cs.get("restartCount", 0), "memory_limit": memory_limit(c),
            "memory_base": pod_usage(p, c["name"])[1] * MIB,
            "started": parse_iso(running.get("startedAt")) or parse_iso(p["status"].get("startTime")) or time.time()}


def write_json(path, doc):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp")
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.rename(tmp, path)
