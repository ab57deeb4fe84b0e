"""Seed 000's world: the todo-chatbot namespace on a three-node DOKS-like cluster.

The first rollout is played two days in the past, so at start every pod is
Running and Ready and the history has a few revisions to roll back to.
"""
import base64
import copy
import os
import re
import time
from urllib.parse import urlparse

import helmrelease
from api import apply_defaults
from controller import REV, owner_ref, template_hash
from resources import crd_of, custom_resources, lookup
from store import now_iso
from workload import DAPR_VERSION

NS = "todo-chatbot"
REGISTRY = "registry.digitalocean.com/todo-chatbot"
NODES = ["pool-todo-chatbot-r7k2x", "pool-todo-chatbot-r7k2m", "pool-todo-chatbot-r7k2q"]
# name, port, replicas, image history (oldest first; the last is current), Dapr app id
APPS = [
    ("backend", 8000, 2, ["v1.3.0", "v1.3.1", "v1.4.0"]),
    ("frontend", 3000, 2, ["v1.3.0", "v1.4.0"]),
    ("websocket", 8001, 2, ["v1.3.0", "v1.4.0"]),
    ("recurring-task", 8002, 1, ["v1.3.0", "v1.4.0"]),
    ("notification", 8003, 1, ["v1.3.0", "v1.4.0"]),
]
DAPR_SYSTEM = [("dapr-operator", 6500, "operator"), ("dapr-sentry", 50001, "sentry"),
               ("dapr-placement-server", 50005, "placement"), ("dapr-sidecar-injector", 4000, "injector"),
               ("dapr-dashboard", 8080, "dashboard")]
DAY = 86400


def read_env(state_dir):
    """The sandbox's connection strings: from .state/env when it exists, else
    from the secrets and ports the sandbox chose before starting us."""
    env = {}
    path = os.path.join(state_dir or "", "env")
    if state_dir and os.path.exists(path):
        for line in open(path):
            m = re.match(r'^\s*(?:export\s+)?([A-Z_][A-Z0-9_]*)=(.*)$', line.strip())
            if m:
                env[m.group(1)] = m.group(2).strip().strip("'\"")
    part = lambda *p: _read(os.path.join(state_dir or "", *p))
    if "DATABASE_URL" not in env and part("secrets", "todo") and part("ports", "postgres"):
        env["DATABASE_URL"] = "postgresql://todo:%s@127.0.0.1:%s/todo" % (part("secrets", "todo"), part("ports", "postgres"))
    if "REDIS_URL" not in env and part("secrets", "redis") and part("ports", "redis"):
        env["REDIS_URL"] = "redis://default:%s@127.0.0.1:%s/0" % (part("secrets", "redis"), part("ports", "redis"))
    if "KAFKA_BROKERS" not in env and part("kafka", "bootstrap"):
        env["KAFKA_BROKERS"] = part("kafka", "bootstrap")
    return env


def _read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


class Seeder:
    def __init__(self, store, controller, state_dir, next_ip):
        self.store, self.ctl, self.next_ip = store, controller, next_ip
        self.env = read_env(state_dir)
        self.t0 = time.time() - 12 * DAY

    def put(self, group, version, resource, obj, age_days):
        res = lookup(group, version, resource)
        obj["kind"], obj["apiVersion"] = res.kind, res.api_version()
        obj["metadata"]["creationTimestamp"] = now_iso(time.time() - age_days * DAY)
        if res.generation:
            obj["metadata"].setdefault("generation", 1)
        apply_defaults(res, obj)
        if resource == "services":
            obj["spec"].setdefault("clusterIP", self.next_ip())
            obj["spec"]["clusterIPs"] = [obj["spec"]["clusterIP"]]
        return self.store.put(res.key, obj)

    def run(self):
        for ns in ["default", "kube-system", "kube-public", "kube-node-lease", NS, "dapr-system"]:
            self.put("", "v1", "namespaces", {"metadata": {"name": ns, "labels": {
                "kubernetes.io/metadata.name": ns}}}, 30 if ns.startswith("kube") or ns == "default" else 12)
            self.put("", "v1", "serviceaccounts", {"metadata": {"name": "default", "namespace": ns}}, 12)
        for i, n in enumerate(NODES):
            self.put("", "v1", "nodes", node(n, i), 30)
        self.put("", "v1", "services", {"metadata": {"name": "kubernetes", "namespace": "default",
                                                     "labels": {"component": "apiserver", "provider": "kubernetes"}},
                                        "spec": {"clusterIP": "10.96.0.1", "ports": [{"name": "https", "port": 443, "targetPort": 6443}]}}, 30)
        for name, port, comp in DAPR_SYSTEM:
            self.dapr_system(name, port, comp)
        self.settle(time.time() - 2 * DAY - 60)   # the sidecar injector runs before the apps' pods are made
        for name, port, replicas, images in APPS:
            self.app(name, port, replicas, images)
        self.config()
        self.helm_release()
        self.dapr_resources()
        self.extras()
        self.settle(time.time() - 2 * DAY)

    def settle(self, start):
        for i in range(8):
            self.ctl.tick(start + i * 2)

    # apps ----------------------------------------------------------------------
    def app(self, name, port, replicas, images):
        full = "todo-chatbot-" + name
        labels = app_labels(name)
        tmpl = lambda tag: pod_template(name, port, labels, "%s/%s:%s" % (REGISTRY, name, tag))
        d = chart_deployment(name, port, replicas, images[-1])
        d["metadata"].update(namespace=NS, generation=len(images), annotations={
            "meta.helm.sh/release-name": "todo-chatbot", "meta.helm.sh/release-namespace": NS})
        d["status"] = {}
        d = self.put("apps", "v1", "deployments", d, 10)
        for rev, tag in enumerate(images[:-1], 1):
            t = tmpl(tag)
            apply_defaults(lookup("apps", "v1", "replicasets"), {"metadata": {}, "spec": {"template": t}})
            h = template_hash(t)
            t["metadata"]["labels"]["pod-template-hash"] = h
            self.put("apps", "v1", "replicasets", {
                "metadata": {"name": "%s-%s" % (full, h), "namespace": NS, "labels": t["metadata"]["labels"],
                             "annotations": {REV: str(rev), "deployment.kubernetes.io/desired-replicas": str(replicas),
                                             "deployment.kubernetes.io/max-replicas": str(replicas + 1),
                                             "kubernetes.io/change-cause": "helm upgrade todo-chatbot --set %s.image.tag=%s" % (name, tag)},
                             "ownerReferences": [owner_ref(d)]},
                "spec": {"replicas": 0, "selector": {"matchLabels": dict(labels, **{"pod-template-hash": h})},
                         "template": t}, "status": {"replicas": 0, "observedGeneration": 1}}, 10 - 3 * rev)
        svc_labels = {k: v for k, v in labels.items()}
        self.put("", "v1", "services", {"metadata": {"name": full, "namespace": NS, "labels": svc_labels},
                                        "spec": {"selector": labels, "ports": [{"name": "http", "port": port, "targetPort": "http"}]}}, 10)
        self.put("", "v1", "services", {"metadata": {"name": name + "-dapr", "namespace": NS,
                                                     "labels": {"dapr.io/enabled": "true"}},
                                        "spec": {"clusterIP": "None", "selector": dict(labels),
                                                 "ports": [{"name": "dapr-http", "port": 80, "targetPort": 3500},
                                                           {"name": "dapr-grpc", "port": 50001, "targetPort": 50001}]}}, 10)

    def dapr_system(self, name, port, comp):
        """One workload of the Dapr control plane as its Helm chart installs it: a Deployment,
        but the placement server, a StatefulSet behind a headless Service."""
        labels = {"app": name, "app.kubernetes.io/name": "dapr", "app.kubernetes.io/part-of": "dapr",
                  "app.kubernetes.io/component": comp, "app.kubernetes.io/version": DAPR_VERSION}
        image = "docker.io/daprio/%s:%s" % ("dashboard" if comp == "dashboard" else "dapr", DAPR_VERSION if comp != "dashboard" else "0.15.0")
        tmpl = {"metadata": {"labels": dict(labels)},
                "spec": {"serviceAccountName": name, "containers": [
                    {"name": name, "image": image, "ports": [{"name": "http", "containerPort": port}],
                     "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080}, "periodSeconds": 3},
                     "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}}}]}}
        spec = {"replicas": 1, "selector": {"matchLabels": {"app": name}}, "template": tmpl}
        meta = {"name": name, "namespace": "dapr-system", "labels": dict(labels)}
        svc = {"selector": {"app": name}, "ports": [{"name": "http", "port": port, "targetPort": port}]}
        if comp == "placement":
            svc = dict(svc, clusterIP="None", publishNotReadyAddresses=True)
            self.put("apps", "v1", "statefulsets", {"metadata": meta, "spec": dict(spec, serviceName=name)}, 12)
        else:
            self.put("apps", "v1", "deployments", {"metadata": meta, "spec": spec}, 12)
        self.put("", "v1", "serviceaccounts", {"metadata": {"name": name, "namespace": "dapr-system"}}, 12)
        self.put("", "v1", "services", {"metadata": {"name": name, "namespace": "dapr-system", "labels": dict(labels)},
                                        "spec": svc}, 12)

    def config(self):
        db = self.env.get("DATABASE_URL", "postgresql://todo:todo-sandbox-pw@127.0.0.1:5432/todo")
        redis = self.env.get("REDIS_URL", "redis://:redis-sandbox-pw@127.0.0.1:6379/0")
        data = {"DATABASE_URL": db, "REDIS_URL": redis,
                "POSTGRES_PASSWORD": urlparse(db).password or "", "REDIS_PASSWORD": urlparse(redis).password or "",
                "BETTER_AUTH_SECRET": "sandbox-better-auth-secret", "JWT_SECRET": "sandbox-better-auth-secret"}
        self.put("", "v1", "secrets", {"metadata": {"name": "todo-chatbot-secrets", "namespace": NS,
                                                    "labels": {"app.kubernetes.io/name": "todo-chatbot"}},
                                       "type": "Opaque", "data": {k: b64(v) for k, v in data.items()}}, 10)
        self.put("", "v1", "configmaps", {"metadata": {"name": "todo-chatbot-config", "namespace": NS},
                                          "data": {"LOG_LEVEL": "INFO", "DAPR_HTTP_PORT": "3500",
                                                   "BACKEND_URL": "http://todo-chatbot-backend:8000",
                                                   "PUBSUB_NAME": "kafka-pubsub", "STATESTORE_NAME": "statestore",
                                                   "WEBSOCKET_MAX_CONNECTIONS": "500"}}, 10)
        self.put("", "v1", "configmaps", {"metadata": {"name": "kube-root-ca.crt", "namespace": NS},
                                          "data": {"ca.crt": "-----BEGIN CERTIFICATE-----\n(sandbox)\n-----END CERTIFICATE-----\n"}}, 12)
        for name, *_ in APPS:
            self.put("", "v1", "serviceaccounts", {"metadata": {"name": "todo-chatbot-" + name, "namespace": NS}}, 10)

    def helm_release(self):
        """Release todo-chatbot as `helm install` and two `helm upgrade`s left it: revision 1
        installed every app at v1.3.0, 2 moved the backend to v1.3.1, 3 (deployed) all to v1.4.0."""
        now = time.time()
        revisions = [(10, "Install complete", {}), (4, "Upgrade complete", {"backend": "v1.3.1"}),
                     (2, "Upgrade complete", {a[0]: a[3][-1] for a in APPS})]
        for rev, (days, description, tags) in enumerate(revisions, 1):
            rel = chart_release(rev, "deployed" if rev == len(revisions) else "superseded", description,
                                dict({a[0]: "v1.3.0" for a in APPS}, **tags), now - 10 * DAY, now - days * DAY)
            self.put("", "v1", "secrets", helmrelease.secret(rel), days)

    def dapr_resources(self):
        for r in custom_resources():
            crd = crd_of(r)
            for c in crd["status"]["conditions"]:
                c["lastTransitionTime"] = now_iso(time.time() - 12 * DAY)
            self.put("apiextensions.k8s.io", "v1", "customresourcedefinitions", crd, 12)
        brokers = self.env.get("KAFKA_BROKERS", "127.0.0.1:9092")
        redis = urlparse(self.env.get("REDIS_URL", "redis://:redis-sandbox-pw@127.0.0.1:6379/0"))
        comp = lambda name, typ, meta: {"metadata": {"name": name, "namespace": NS},
                                        "spec": {"type": typ, "version": "v1", "metadata": meta}, "scopes": [a[0] for a in APPS]}
        self.put("dapr.io", "v1alpha1", "components", comp("kafka-pubsub", "pubsub.kafka", [
            {"name": "brokers", "value": brokers}, {"name": "authType", "value": "none"},
            {"name": "consumerGroup", "value": "{appID}-service"}]), 10)
        self.put("dapr.io", "v1alpha1", "components", comp("statestore", "state.redis", [
            {"name": "redisHost", "value": "%s:%s" % (redis.hostname, redis.port or 6379)},
            {"name": "redisPassword", "secretKeyRef": {"name": "todo-chatbot-secrets", "key": "REDIS_PASSWORD"}},
            {"name": "actorStateStore", "value": "false"}]), 10)
        self.put("dapr.io", "v1alpha1", "components", comp("kubernetes-secrets", "secretstores.kubernetes", []), 10)
        # As the Dapr stand-in's sidecars declare them: same pub/sub name, routes and dead letters.
        for topic, apps in [("task-events", ["recurring-task", "websocket"]), ("task-updates", ["websocket"]),
                            ("reminders", ["notification"])]:
            route = "/events/" + topic
            self.put("dapr.io", "v2alpha1", "subscriptions", {
                "metadata": {"name": topic + "-subscription", "namespace": NS},
                "spec": {"pubsubname": "kafka-pubsub", "topic": topic, "routes": {"default": route},
                         "deadLetterTopic": "reminders-dlq" if topic == "reminders" else ""},
                "scopes": apps}, 10)

    def extras(self):
        self.put("autoscaling", "v2", "horizontalpodautoscalers", {
            "metadata": {"name": "recurring-task-service-hpa", "namespace": NS},
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "todo-chatbot-recurring-task"},
                     "minReplicas": 1, "maxReplicas": 4,
                     "metrics": [{"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}}]},
            "status": {"currentMetrics": [{"type": "Resource", "resource": {"name": "cpu", "current": {"averageUtilization": 23, "averageValue": "23m"}}}],
                       "conditions": [{"type": "AbleToScale", "status": "True", "reason": "ReadyForNewScale",
                                       "lastTransitionTime": now_iso(time.time() - 9 * DAY)}]}}, 9)
        self.put("networking.k8s.io", "v1", "ingresses", {
            "metadata": {"name": "todo-chatbot", "namespace": NS, "annotations": {"cert-manager.io/cluster-issuer": "letsencrypt"}},
            "spec": {"ingressClassName": "nginx", "tls": [{"hosts": ["todo.example.com"], "secretName": "todo-chatbot-tls"}],
                     "rules": [{"host": "todo.example.com", "http": {"paths": [
                         {"path": p, "pathType": "Prefix", "backend": {"service": {"name": "todo-chatbot-" + s, "port": {"number": port}}}}
                         for p, s, port in [("/api", "backend", 8000), ("/ws", "websocket", 8001), ("/", "frontend", 3000)]]}}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.10"}]}}}, 10)
        self.put("cert-manager.io", "v1", "clusterissuers", {
            "metadata": {"name": "letsencrypt"},
            "spec": {"acme": {"server": "https://acme-v02.api.letsencrypt.org/directory", "email": "ops@example.com",
                              "privateKeySecretRef": {"name": "letsencrypt-account-key"},
                              "solvers": [{"http01": {"ingress": {"ingressClassName": "nginx"}}}]}},
            "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "ACMEAccountRegistered",
                                       "message": "The ACME account was registered with the ACME server",
                                       "lastTransitionTime": now_iso(time.time() - 12 * DAY)}]}}, 12)
        self.put("networking.k8s.io", "v1", "networkpolicies", {
            "metadata": {"name": "allow-same-namespace", "namespace": NS},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{"from": [{"podSelector": {}}]}]}}, 10)
        lease_time = now_iso(time.time() - 2 * DAY).replace("Z", ".000000Z")
        self.put("coordination.k8s.io", "v1", "leases", {
            "metadata": {"name": "recurring-task-scheduler", "namespace": NS},
            "spec": {"holderIdentity": "", "leaseDurationSeconds": 15, "leaseTransitions": 3,
                     "acquireTime": lease_time, "renewTime": lease_time}}, 10)


def app_labels(name):
    return {"app.kubernetes.io/name": "todo-chatbot", "app.kubernetes.io/instance": "todo-chatbot",
            "app.kubernetes.io/component": name}


def chart_deployment(name, port, replicas, tag):
    """An app's Deployment as the todo-chatbot chart renders it."""
    labels = app_labels(name)
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "todo-chatbot-" + name,
                         "labels": dict(labels, **{"app.kubernetes.io/managed-by": "Helm", "helm.sh/chart": "todo-chatbot-0.5.0"})},
            "spec": {"replicas": replicas, "selector": {"matchLabels": dict(labels)},
                     "template": pod_template(name, port, labels, "%s/%s:%s" % (REGISTRY, name, tag)),
                     "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}}}}


def chart_release(revision, status, description, tags, first, last):
    """Revision `revision` of release todo-chatbot with each app's image tag from `tags`
    (the user's values, as `--set APP.image.tag=TAG` gives them)."""
    defaults = {"global": {"registry": REGISTRY}}
    for name, port, replicas, _ in APPS:
        defaults[name] = {"replicaCount": replicas, "image": {"tag": "latest"}, "service": {"port": port},
                          "resources": {"limits": {"cpu": "500m", "memory": "256Mi"}}}
    config = {name: {"image": {"tag": tags[name]}} for name, *_ in APPS}
    docs = [("%s-deployment.yaml" % name, chart_deployment(name, port, replicas, tags[name]))
            for name, port, replicas, _ in APPS]
    return helmrelease.release("todo-chatbot", NS, revision, status, description, config, docs, first, last, defaults)


def pod_template(name, port, labels, image):
    return {"metadata": {"labels": dict(labels), "annotations": {
                "dapr.io/enabled": "true", "dapr.io/app-id": name, "dapr.io/app-port": str(port),
                "dapr.io/enable-api-logging": "true", "kubectl.kubernetes.io/default-container": name}},
            "spec": {"serviceAccountName": "todo-chatbot-" + name, "containers": [
                {"name": name, "image": image, "ports": [{"name": "http", "containerPort": port}],
                 "envFrom": [{"configMapRef": {"name": "todo-chatbot-config"}}, {"secretRef": {"name": "todo-chatbot-secrets"}}],
                 "env": [{"name": "DAPR_HTTP_PORT", "value": "3500"}, {"name": "APP_NAME", "value": name}],
                 "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"cpu": "500m", "memory": "256Mi"}},
                 "readinessProbe": {"httpGet": {"path": "/health", "port": port}, "periodSeconds": 10},
                 "livenessProbe": {"httpGet": {"path": "/health", "port": port}, "periodSeconds": 20}},
                {"name": "daprd", "image": "docker.io/daprio/daprd:" + DAPR_VERSION,
                 "args": ["./daprd", "--app-id", name, "--app-port", str(port), "--dapr-http-port", "3500"],
                 "ports": [{"name": "dapr-http", "containerPort": 3500}, {"name": "dapr-grpc", "containerPort": 50001}],
                 "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}}}]}}


def node(name, i):
    return {"metadata": {"name": name, "labels": {
                "kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                "doks.digitalocean.com/node-pool": "pool-todo-chatbot", "node.kubernetes.io/instance-type": "s-2vcpu-4gb",
                "topology.kubernetes.io/region": "nyc1"}},
            "spec": {"providerID": "digitalocean://4%08d" % (1234567 + i)},
            "status": {"capacity": {"cpu": "2", "memory": "4025836Ki", "pods": "110", "ephemeral-storage": "82517860Ki"},
                       "allocatable": {"cpu": "1900m", "memory": "3273Mi", "pods": "110", "ephemeral-storage": "76048791922"},
                       "conditions": [cond(t, "False", r, m) for t, r, m in [
                           ("MemoryPressure", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
                           ("DiskPressure", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
                           ("PIDPressure", "KubeletHasSufficientPID", "kubelet has sufficient PID available")]]
                       + [cond("Ready", "True", "KubeletReady", "kubelet is posting ready status")],
                       "addresses": [{"type": "InternalIP", "address": "10.116.0.%d" % (2 + i)},
                                     {"type": "Hostname", "address": name}],
                       "nodeInfo": {"kubeletVersion": "v1.32.0", "kubeProxyVersion": "v1.32.0", "osImage": "Debian GNU/Linux 12 (bookworm)",
                                    "kernelVersion": "6.1.0-27-amd64", "containerRuntimeVersion": "containerd://1.7.22",
                                    "operatingSystem": "linux", "architecture": "amd64"}}}


def cond(t, s, r, m):
    ts = now_iso(time.time() - 30 * DAY)
    return {"type": t, "status": s, "reason": r, "message": m, "lastHeartbeatTime": ts, "lastTransitionTime": ts}


def b64(s):
    return base64.b64encode(s.encode()).decode()
