"""Many settled deployments at once, for measuring how clients scale
(`ctl k8s populate NAMESPACE N [PODS]`, `ctl k8s depopulate NAMESPACE`).

The objects are written as the controllers would leave them after a finished
rollout (a Deployment, its ReplicaSet, PODS Running and Ready pods), straight
into the store: a thousand deployments take a second or two rather than the
minutes thousands of API calls and controller passes would.
"""
import time
import uuid

from api import apply_defaults
from controller import REV, pod_for, replicaset_for
from resources import lookup
from store import now_iso

PREFIX = "load-"
IMAGE = "registry.example.com/load/app:1.0.0"


def deployment(ns, name, replicas, now):
    labels = {"app": name, "app.kubernetes.io/part-of": "load"}
    d = {"kind": "Deployment", "apiVersion": "apps/v1",
         "metadata": {"name": name, "namespace": ns, "uid": str(uuid.uuid4()), "generation": 1,
                      "labels": dict(labels), "annotations": {REV: "1"}, "creationTimestamp": now_iso(now)},
         "spec": {"replicas": replicas, "selector": {"matchLabels": dict(labels)},
                  "template": {"metadata": {"labels": dict(labels)}, "spec": {"containers": [
                      {"name": "app", "image": IMAGE, "ports": [{"name": "http", "containerPort": 8080}],
                       "resources": {"requests": {"cpu": "10m", "memory": "32Mi"},
                                     "limits": {"cpu": "100m", "memory": "64Mi"}}}]}}}}
    apply_defaults(lookup("apps", "v1", "deployments"), d)
    return d


def populate(cluster, args):
    """Adds the missing deployments load-00000 .. load-(N-1) to NAMESPACE (made when missing)."""
    ns, n = args[0], int(args[1])
    per = int(args[2]) if len(args) > 2 else 5
    if n < 0 or per < 0:
        raise ValueError("populate NAMESPACE N [PODS]: N and PODS are counts")
    store, ctl = cluster.store, cluster.controller
    now = time.time() - 3600     # rolled out an hour ago
    if store.get("namespaces", "", ns) is None:
        store.put("namespaces", {"kind": "Namespace", "apiVersion": "v1",
                                 "metadata": {"name": ns, "labels": {"kubernetes.io/metadata.name": ns}},
                                 "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}})
    nodes = [nd for nd in store.list("nodes", shared=True)]
    made = 0
    for i in range(n):
        name = "%s%05d" % (PREFIX, i)
        if store.objects["deployments.apps"].get((ns, name)) is not None:
            continue
        d = deployment(ns, name, per, now)
        rs = replicaset_for(d, 1, now)
        rs["metadata"]["uid"] = str(uuid.uuid4())
        rs["spec"]["replicas"] = per
        pods = []
        for j in range(per):
            p = pod_for(rs, "%s-%05d%c" % (rs["metadata"]["name"], i, 97 + j % 26), now)
            node = nodes[(i * per + j) % len(nodes)]
            p["metadata"]["uid"] = str(uuid.uuid4())
            p["spec"]["nodeName"] = node["metadata"]["name"]
            ip = "10.%d.%d.%d" % (100 + (i * per + j) // 65536, (i * per + j) // 256 % 256, (i * per + j) % 256)
            p["status"].update({"hostIP": node["status"]["addresses"][0]["address"], "podIP": ip,
                                "podIPs": [{"ip": ip}], "startTime": now_iso(now),
                                "containerStatuses": [ctl.running(p, c, 0, now, True) for c in p["spec"]["containers"]]})
            ctl.pod_conditions(p, now)
            pods.append(p)
        rs["status"] = ctl.replicaset_status_of(rs, pods)
        for p in pods:
            store.put("pods", p, give=True)
        store.put("replicasets.apps", rs, give=True)
        d["status"] = ctl.deployment_status_of(d, now, [rs])
        store.put("deployments.apps", d, give=True)
        made += 1
    return "namespace %s: %d deployments made (%d pods each), %d there already" % (ns, made, per, n - made)


def depopulate(cluster, args):
    """Removes NAMESPACE and everything in it at once (no graceful termination)."""
    ns = args[0]
    store = cluster.store
    if store.get("namespaces", "", ns) is None:
        raise LookupError('namespace "%s" not found' % ns)
    gone = 0
    for key, n, name in store.keys():
        if n == ns:
            store.remove(key, n, name)
            gone += 1
    store.remove("namespaces", "", ns)
    return "namespace %s removed with its %d objects" % (ns, gone)
