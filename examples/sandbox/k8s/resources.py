"""The resource registry: drives routing, discovery, Table columns and OpenAPI."""
import time

from store import parse_iso

RW = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
RO = ["get", "list"]
RO_WATCH = ["get", "list", "watch"]


class Res:
    def __init__(self, group, version, name, kind, short=(), namespaced=True, verbs=RW,
                 subs=(), columns=None, cats=(), virtual=False, generation=False,
                 custom=False, versions=None):
        self.group, self.version, self.name, self.kind = group, version, name, kind
        self.versions = versions or [version]
        self.short, self.namespaced, self.verbs = list(short), namespaced, verbs
        self.subs, self.cats, self.virtual = subs, list(cats), virtual
        self.generation, self.custom = generation, custom
        self.columns = columns or []
        self.singular = kind.lower()
        self.key = name + ("." + group if group else "")
        self.qualified = self.key

    def api_version(self, version=None):
        v = version or self.version
        return (self.group + "/" + v) if self.group else v


def age(seconds):
    """kubectl's HumanDuration, good enough for AGE columns."""
    s = int(max(seconds, 0))
    if s < 120:
        return "%ds" % s
    m = s // 60
    if m < 10:
        return "%dm%ds" % (m, s % 60) if s % 60 else "%dm" % m
    if m < 180:
        return "%dm" % m
    h = m // 60
    if h < 8:
        return "%dh%dm" % (h, m % 60) if m % 60 else "%dh" % h
    if h < 48:
        return "%dh" % h
    d = h // 24
    if d < 8:
        return "%dd%dh" % (d, h % 24) if h % 24 else "%dd" % d
    return "%dd" % d if d < 365 * 2 else "%dy" % (d // 365)


def obj_age(o):
    t = parse_iso(o["metadata"].get("creationTimestamp"))
    return age(time.time() - t) if t else "<unknown>"


def col(name, fn, typ="string", priority=0, desc=""):
    return (name, typ, priority, fn, desc)


NAME = col("Name", lambda o: o["metadata"]["name"], desc="Name must be unique within a namespace.")
AGE = col("Age", obj_age, desc="CreationTimestamp is a timestamp representing the server time when this object was created.")


def pod_ready(o):
    cs = o.get("status", {}).get("containerStatuses", [])
    return "%d/%d" % (sum(1 for c in cs if c.get("ready")), len(o["spec"].get("containers", [])))


def pod_status(o):
    if o["metadata"].get("deletionTimestamp"):
        return "Terminating"
    st = o.get("status", {})
    reason = st.get("reason") or st.get("phase", "Pending")
    for c in st.get("containerStatuses", []):
        s = c.get("state", {})
        if s.get("waiting", {}).get("reason"):
            return s["waiting"]["reason"]
        if s.get("terminated"):
            t = s["terminated"]
            return t.get("reason") or "ExitCode:%d" % t.get("exitCode", 0)
    if reason == "Running" and not all(c.get("ready") for c in st.get("containerStatuses", [])):
        return "Running"
    return reason


def pod_restarts(o):
    cs = o.get("status", {}).get("containerStatuses", [])
    n = sum(c.get("restartCount", 0) for c in cs)
    last = [parse_iso(c.get("lastState", {}).get("terminated", {}).get("finishedAt"))
            for c in cs]
    last = [t for t in last if t]
    if n and last:
        return "%d (%s ago)" % (n, age(time.time() - max(last)))
    return str(n)


def selector_str(sel):
    return ",".join("%s=%s" % kv for kv in sorted((sel or {}).get("matchLabels", {}).items()))


def containers(o, field):
    spec = o["spec"]["template"]["spec"] if "template" in o.get("spec", {}) else o["spec"]
    return ",".join(c.get(field, "") for c in spec.get("containers", []))


def dep_ready(o):
    st = o.get("status", {})
    return "%d/%d" % (st.get("readyReplicas", 0), o["spec"].get("replicas", 1))


def svc_ports(o):
    out = []
    for p in o["spec"].get("ports", []):
        s = "%d" % p["port"]
        if p.get("nodePort"):
            s += ":%d" % p["nodePort"]
        out.append(s + "/" + p.get("protocol", "TCP"))
    return ",".join(out) or "<none>"


def node_status(o):
    ready = [c for c in o.get("status", {}).get("conditions", []) if c["type"] == "Ready"]
    s = "Ready" if ready and ready[0]["status"] == "True" else "NotReady"
    if o["spec"].get("unschedulable"):
        s += ",SchedulingDisabled"
    return s


def node_roles(o):
    roles = [k.split("/", 1)[1] for k in o["metadata"].get("labels", {})
             if k.startswith("node-role.kubernetes.io/")]
    return ",".join(roles) or "<none>"


def ev_last_seen(o):
    t = parse_iso(o.get("lastTimestamp") or o.get("eventTime") or o["metadata"].get("creationTimestamp"))
    return age(time.time() - t) if t else "<unknown>"


def ev_object(o):
    io = o.get("involvedObject", {})
    return "%s/%s" % (io.get("kind", "").lower(), io.get("name", ""))


def endpoints_str(o):
    out = []
    for s in o.get("subsets", []) or []:
        for a in s.get("addresses", []):
            for p in s.get("ports", []):
                out.append("%s:%d" % (a["ip"], p["port"]))
    return ",".join(out[:3]) + (" + %d more..." % (len(out) - 3) if len(out) > 3 else "") or "<none>"


def condition(o, ctype, field="status"):
    return next((c.get(field, "") for c in (o.get("status") or {}).get("conditions", []) if c["type"] == ctype), "")


def hpa_targets(o):
    out = []
    cur = {m.get("resource", {}).get("name"): m for m in o.get("status", {}).get("currentMetrics", []) or []}
    for m in o["spec"].get("metrics", []):
        r = m.get("resource", {})
        want = r.get("target", {}).get("averageUtilization")
        have = cur.get(r.get("name"), {}).get("resource", {}).get("current", {}).get("averageUtilization")
        out.append("%s: %s/%s%%" % (r.get("name"), "<unknown>" if have is None else "%d%%" % have, want))
    return ", ".join(out) or "<none>"


COLUMNS = {
    "persistentvolumeclaims": [NAME, col("Status", lambda o: o.get("status", {}).get("phase", "")),
                               col("Volume", lambda o: o["spec"].get("volumeName", "")),
                               col("Capacity", lambda o: o.get("status", {}).get("capacity", {}).get("storage", "")),
                               col("StorageClass", lambda o: o["spec"].get("storageClassName", "")), AGE],
    "pods": [NAME, col("Ready", pod_ready), col("Status", pod_status),
             col("Restarts", pod_restarts), AGE,
             col("IP", lambda o: o.get("status", {}).get("podIP", "<none>"), priority=1),
             col("Node", lambda o: o["spec"].get("nodeName", "<none>"), priority=1),
             col("Nominated Node", lambda o: "<none>", priority=1),
             col("Readiness Gates", lambda o: "<none>", priority=1)],
    "deployments": [NAME, col("Ready", dep_ready),
                    col("Up-to-date", lambda o: o.get("status", {}).get("updatedReplicas", 0), "integer"),
                    col("Available", lambda o: o.get("status", {}).get("availableReplicas", 0), "integer"),
                    AGE, col("Containers", lambda o: containers(o, "name"), priority=1),
                    col("Images", lambda o: containers(o, "image"), priority=1),
                    col("Selector", lambda o: selector_str(o["spec"].get("selector")), priority=1)],
    "replicasets": [NAME, col("Desired", lambda o: o["spec"].get("replicas", 1), "integer"),
                    col("Current", lambda o: o.get("status", {}).get("replicas", 0), "integer"),
                    col("Ready", lambda o: o.get("status", {}).get("readyReplicas", 0), "integer"),
                    AGE, col("Containers", lambda o: containers(o, "name"), priority=1),
                    col("Images", lambda o: containers(o, "image"), priority=1),
                    col("Selector", lambda o: selector_str(o["spec"].get("selector")), priority=1)],
    "statefulsets": [NAME, col("Ready", lambda o: "%d/%d" % (o.get("status", {}).get("readyReplicas", 0),
                                                             o["spec"].get("replicas", 1))),
                     AGE, col("Containers", lambda o: containers(o, "name"), priority=1),
                     col("Images", lambda o: containers(o, "image"), priority=1)],
    "services": [NAME, col("Type", lambda o: o["spec"].get("type", "ClusterIP")),
                 col("Cluster-IP", lambda o: o["spec"].get("clusterIP", "<none>")),
                 col("External-IP", lambda o: "<none>"), col("Port(s)", svc_ports), AGE,
                 col("Selector", lambda o: ",".join("%s=%s" % kv for kv in sorted(o["spec"].get("selector", {}).items())) or "<none>", priority=1)],
    "nodes": [NAME, col("Status", node_status), col("Roles", node_roles), AGE,
              col("Version", lambda o: o.get("status", {}).get("nodeInfo", {}).get("kubeletVersion", "")),
              col("Internal-IP", lambda o: next((a["address"] for a in o.get("status", {}).get("addresses", []) if a["type"] == "InternalIP"), "<none>"), priority=1),
              col("OS-Image", lambda o: o.get("status", {}).get("nodeInfo", {}).get("osImage", ""), priority=1)],
    "namespaces": [NAME, col("Status", lambda o: o.get("status", {}).get("phase", "Active")), AGE],
    "events": [col("Last Seen", ev_last_seen), col("Type", lambda o: o.get("type", "")),
               col("Reason", lambda o: o.get("reason", "")), col("Object", ev_object),
               col("Message", lambda o: o.get("message", "")),
               col("Count", lambda o: o.get("count", 1), "integer", priority=1)],
    "configmaps": [NAME, col("Data", lambda o: len(o.get("data", {}) or {}) + len(o.get("binaryData", {}) or {}), "integer"), AGE],
    "secrets": [NAME, col("Type", lambda o: o.get("type", "Opaque")),
                col("Data", lambda o: len(o.get("data", {}) or {}), "integer"), AGE],
    "serviceaccounts": [NAME, col("Secrets", lambda o: len(o.get("secrets", []) or []), "integer"), AGE],
    "endpoints": [NAME, col("Endpoints", endpoints_str), AGE],
    "leases": [NAME, col("Holder", lambda o: o.get("spec", {}).get("holderIdentity", "")), AGE],
    "horizontalpodautoscalers": [
        NAME, col("Reference", lambda o: "%s/%s" % (o["spec"]["scaleTargetRef"]["kind"], o["spec"]["scaleTargetRef"]["name"])),
        col("Targets", hpa_targets), col("MinPods", lambda o: o["spec"].get("minReplicas", 1), "integer"),
        col("MaxPods", lambda o: o["spec"].get("maxReplicas"), "integer"),
        col("Replicas", lambda o: o.get("status", {}).get("currentReplicas", 0), "integer"), AGE],
    "ingresses": [NAME, col("Class", lambda o: o["spec"].get("ingressClassName", "<none>")),
                  col("Hosts", lambda o: ",".join(r.get("host", "*") for r in o["spec"].get("rules", [])) or "*"),
                  col("Address", lambda o: ",".join(i.get("ip", "") for i in o.get("status", {}).get("loadBalancer", {}).get("ingress", []) or [])),
                  col("Ports", lambda o: "80, 443" if o["spec"].get("tls") else "80"), AGE],
    "networkpolicies": [NAME, col("Pod-Selector", lambda o: selector_str(o["spec"].get("podSelector")) or "<none>"), AGE],
    # as cert-manager's CRDs print them (additionalPrinterColumns)
    "certificates": [NAME, col("Ready", lambda o: condition(o, "Ready")), col("Secret", lambda o: o["spec"].get("secretName", "")),
                     col("Issuer", lambda o: (o["spec"].get("issuerRef") or {}).get("name", ""), priority=1),
                     col("Status", lambda o: condition(o, "Ready", "message"), priority=1), AGE],
    "clusterissuers": [NAME, col("Ready", lambda o: condition(o, "Ready")), AGE],
    "customresourcedefinitions": [NAME, col("Created At", lambda o: o["metadata"].get("creationTimestamp"), "date")],
}

# The Table of a Scale subresource (kubectl get deploy X --subresource=scale).
SCALE_COLUMNS = [NAME, col("Desired", lambda o: o["spec"].get("replicas", 0), "integer"),
                 col("Available", lambda o: o.get("status", {}).get("replicas", 0), "integer")]

ALL = ["all"]
REGISTRY = [
    Res("", "v1", "namespaces", "Namespace", ["ns"], False, subs=("status", "finalize")),
    Res("", "v1", "nodes", "Node", ["no"], False, subs=("status", "proxy")),
    Res("", "v1", "pods", "Pod", ["po"], subs=("status", "log", "proxy", "eviction", "exec"), cats=ALL),
    Res("", "v1", "services", "Service", ["svc"], subs=("status", "proxy"), cats=ALL),
    Res("", "v1", "endpoints", "Endpoints", ["ep"]),
    Res("", "v1", "events", "Event", ["ev"]),
    Res("", "v1", "configmaps", "ConfigMap", ["cm"]),
    Res("", "v1", "secrets", "Secret"),
    Res("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim", ["pvc"], subs=("status",)),
    Res("", "v1", "serviceaccounts", "ServiceAccount", ["sa"], subs=("token",)),
    Res("apps", "v1", "deployments", "Deployment", ["deploy"], subs=("status", "scale"), cats=ALL, generation=True),
    Res("apps", "v1", "replicasets", "ReplicaSet", ["rs"], subs=("status", "scale"), cats=ALL, generation=True),
    Res("apps", "v1", "statefulsets", "StatefulSet", ["sts"], subs=("status", "scale"), cats=ALL, generation=True),
    Res("coordination.k8s.io", "v1", "leases", "Lease"),
    Res("rbac.authorization.k8s.io", "v1", "roles", "Role"),
    Res("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding"),
    Res("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", namespaced=False),
    Res("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding", namespaced=False),
    Res("autoscaling", "v2", "horizontalpodautoscalers", "HorizontalPodAutoscaler", ["hpa"],
        subs=("status",), cats=ALL, generation=True),
    Res("networking.k8s.io", "v1", "ingresses", "Ingress", ["ing"], subs=("status",), generation=True),
    Res("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", ["netpol"], generation=True),
    # The definitions of the custom resources below, read-only: a new one would not be served.
    Res("apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition", ["crd", "crds"],
        False, verbs=RO_WATCH, subs=("status",), generation=True),
    Res("dapr.io", "v1alpha1", "components", "Component", generation=True, custom=True),
    Res("dapr.io", "v2alpha1", "subscriptions", "Subscription", generation=True, custom=True,
        versions=["v2alpha1", "v1alpha1"]),
    # cert-manager's (certmanager.py issues the Certificates)
    Res("cert-manager.io", "v1", "certificates", "Certificate", ["cert", "certs"], subs=("status",),
        generation=True, custom=True),
    Res("cert-manager.io", "v1", "clusterissuers", "ClusterIssuer", namespaced=False, subs=("status",),
        generation=True, custom=True),
    Res("metrics.k8s.io", "v1beta1", "pods", "PodMetrics", verbs=RO, virtual=True),
    Res("metrics.k8s.io", "v1beta1", "nodes", "NodeMetrics", namespaced=False, verbs=RO, virtual=True),
    Res("authentication.k8s.io", "v1", "selfsubjectreviews", "SelfSubjectReview", namespaced=False,
        verbs=["create"], virtual=True),
    Res("authorization.k8s.io", "v1", "selfsubjectaccessreviews", "SelfSubjectAccessReview",
        namespaced=False, verbs=["create"], virtual=True),
]
for r in REGISTRY:
    r.columns = COLUMNS.get(r.name, [NAME, AGE]) if r.group != "metrics.k8s.io" else [NAME, AGE]

# Groups in discovery order with their versions, preferred first.
GROUPS = []
for r in REGISTRY:
    if r.group and r.group not in [g for g, _ in GROUPS]:
        GROUPS.append((r.group, []))
    for v in (r.versions if r.group else []):
        vs = dict(GROUPS)[r.group]
        if v not in vs:
            vs.append(v)


def version_priority(v):
    """Kubernetes' version order: GA before beta before alpha, higher numbers first."""
    import re
    m = re.match(r'^v(\d+)(?:(alpha|beta)(\d+))?$', v)
    if not m:
        return (3, 0, 0, v)
    stage = {None: 0, "beta": 1, "alpha": 2}[m.group(2)]
    return (stage, -int(m.group(1)), -int(m.group(3) or 0), v)


for _, vs in GROUPS:
    vs.sort(key=version_priority)


def crd_of(r):
    """The CustomResourceDefinition that would make r served, as the Dapr or cert-manager chart installs it."""
    versions = sorted(r.versions, key=version_priority)
    part_of = "cert-manager" if r.group == "cert-manager.io" else "dapr"
    return {"metadata": {"name": r.key, "labels": {"app.kubernetes.io/part-of": part_of}},
            "spec": {"group": r.group, "scope": "Namespaced" if r.namespaced else "Cluster",
                     "names": {"plural": r.name, "singular": r.singular, "kind": r.kind, "listKind": r.kind + "List"},
                     "conversion": {"strategy": "None"},
                     "versions": [{"name": v, "served": True, "storage": v == r.version,
                                   "schema": {"openAPIV3Schema": {"type": "object",
                                                                  "x-kubernetes-preserve-unknown-fields": True}}}
                                  for v in versions]},
            "status": {"acceptedNames": {"plural": r.name, "singular": r.singular, "kind": r.kind,
                                         "listKind": r.kind + "List"},
                       "storedVersions": [r.version],
                       "conditions": [{"type": t, "status": "True", "reason": reason, "message": msg}
                                      for t, reason, msg in [("NamesAccepted", "NoConflicts", "no conflicts found"),
                                                             ("Established", "InitialNamesAccepted",
                                                              "the initial names have been accepted")]]}}


def custom_resources():
    return [r for r in REGISTRY if r.custom]


def lookup(group, version, name):
    for r in REGISTRY:
        if r.group == group and r.name == name and version in r.versions:
            return r
    return None


def api_resource_list(group, version):
    out = []
    for r in REGISTRY:
        if r.group != group or version not in r.versions:
            continue
        e = {"name": r.name, "singularName": r.singular, "namespaced": r.namespaced,
             "kind": r.kind, "verbs": r.verbs}
        if r.short:
            e["shortNames"] = r.short
        if r.cats:
            e["categories"] = r.cats
        out.append(e)
        for s in r.subs:
            out.append(sub_entry(r, s))
    gv = group + "/" + version if group else version
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": out}


def sub_entry(r, s):
    e = {"name": r.name + "/" + s, "singularName": "", "namespaced": r.namespaced,
         "kind": r.kind, "verbs": ["get", "patch", "update"]}
    if s == "scale":
        e.update(group="autoscaling", version="v1", kind="Scale")
    elif s in ("log", "proxy"):
        e.update(kind={"log": "Pod", "proxy": r.kind + "ProxyOptions"}[s],
                 verbs=["get"] if s == "log" else ["create", "delete", "get", "patch", "update"])
    elif s == "eviction":
        e.update(group="policy", version="v1", kind="Eviction", verbs=["create"])
    elif s == "exec":
        e.update(kind="PodExecOptions", verbs=["create", "get"])
    elif s == "finalize":
        e.update(verbs=["update"])
    return e


def group_list():
    groups = []
    for g, vs in GROUPS:
        versions = [{"groupVersion": g + "/" + v, "version": v} for v in vs]
        groups.append({"name": g, "versions": versions, "preferredVersion": versions[0]})
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}


def openapi_index():
    paths = {"api/v1": {"serverRelativeURL": "/openapi/v3/api/v1?hash=SANDBOX1"}}
    for g, vs in GROUPS:
        for v in vs:
            paths["apis/%s/%s" % (g, v)] = {"serverRelativeURL": "/openapi/v3/apis/%s/%s?hash=SANDBOX1" % (g, v)}
    return {"paths": paths}


def openapi_group(group, version):
    """Just enough for kubectl to see that the server validates fields itself."""
    paths = {}
    param = [{"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": True}}]
    for r in REGISTRY:
        if r.group != group or version not in r.versions or r.virtual:
            continue
        base = "/api/v1" if not group else "/apis/%s/%s" % (group, version)
        p = base + ("/namespaces/{namespace}/" if r.namespaced else "/") + r.name + "/{name}"
        gvk = {"group": group, "version": version, "kind": r.kind}
        op = {"x-kubernetes-group-version-kind": gvk, "parameters": param}
        paths[p] = {"patch": op, "put": op}
        paths[p.rsplit("/", 1)[0]] = {"post": op}
    return {"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": "v1.32.0"},
            "paths": paths, "components": {"schemas": {}}}
