"""The control loop: deployments -> replicasets -> pods -> kubelet-like status.

Every sync computes the wanted object and writes only when it differs, so a
cluster at rest keeps its resourceVersions. Time comes in as `now` so the seed
can play the first rollout two days in the past.
"""
import base64
import copy
import hashlib
import json
import os
import random
import re
import threading
import time

import workload
from api import labels_match, qos_class
from certmanager import CertManager
from store import clone, now_iso, parse_iso

# Time runs fast in the sandbox: a rollout of two replicas takes about 2 s.
STARTUP = 0.5          # seconds from scheduling to Running and Ready
TERMINATION = 0.4      # a deleted pod stays Terminating this long
CRASH_RUN = 0.5        # a crash-looping container lives this long
BACKOFF = 0.15         # the kubelet's crash back-off (10 s, 20 s ... 5 min) runs this much faster
MAX_EVENTS = 2000      # the oldest events go first beyond this
TICK = 0.2             # the controller looks at least this often
MIN_TICK = 0.05        # and at most this often
OOM_PERIOD = 15.0      # an OOM-faulted container is killed this often
EVICT_AFTER = 10.0     # pods on a NotReady node are evicted after this
ALPHA = "bcdfghjklmnpqrstvwxz2456789"
BAD_TAGS = ("does-not-exist", "doesnotexist", "nonexistent")
# A registry that wants credentials: a pull needs an imagePullSecrets entry naming a
# kubernetes.io/dockerconfigjson Secret with an auth for it (the pull-secret fault).
PRIVATE_REGISTRY = "registry.sandbox.internal"
STORAGE_CLASSES = ("standard",)   # the only class a claim binds with (none set means this one)
REV = "deployment.kubernetes.io/revision"


def template_hash(tmpl):
    t = copy.deepcopy(tmpl)
    t.get("metadata", {}).get("labels", {}).pop("pod-template-hash", None)
    n = int(hashlib.sha1(json.dumps(t, sort_keys=True).encode()).hexdigest(), 16)
    out = ""
    for _ in range(10):
        n, r = divmod(n, len(ALPHA))
        out += ALPHA[r]
    return out


def bare_template(tmpl):
    """A template for comparison: no pod-template-hash, no nulls or empty values
    (kubectl sends templates back through Go structs, which add or drop those)."""
    t = copy.deepcopy(tmpl)
    labels = t.get("metadata", {}).get("labels")
    if labels:
        labels.pop("pod-template-hash", None)
    return squeeze(t)


def squeeze(v):
    if isinstance(v, dict):
        out = {k: squeeze(x) for k, x in v.items()}
        return {k: x for k, x in out.items() if x not in (None, {}, [], "")}
    if isinstance(v, list):
        return [squeeze(x) for x in v]
    return v


def owner_ref(obj, controller=True):
    return {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "name": obj["metadata"]["name"],
            "uid": obj["metadata"]["uid"], "controller": controller, "blockOwnerDeletion": True}


def pct(value, total, up):
    """An IntOrString such as maxSurge: 1, or "25%" of total rounded up or down."""
    if isinstance(value, int):
        return value
    if not str(value).endswith("%"):
        return int(value)
    n = int(str(value)[:-1]) * total / 100.0
    return int(-(-n // 1)) if up else int(n)


def go_duration(seconds):
    """A whole number of seconds as Go prints a time.Duration: 40s, 1m20s, 5m0s."""
    return "%dm%ds" % divmod(seconds, 60) if seconds >= 60 else "%ds" % seconds


def fenceposts(d):
    """maxSurge and maxUnavailable as counts, as the deployment controller resolves them."""
    want = d["spec"].get("replicas", 1)
    ru = d["spec"].get("strategy", {}).get("rollingUpdate") or {}
    surge = pct(ru.get("maxSurge", "25%"), want, True)
    unavailable = pct(ru.get("maxUnavailable", "25%"), want, False)
    if surge == 0 and unavailable == 0:
        unavailable = 1
    return surge, min(unavailable, want)


def replicaset_for(d, revision, now):
    """The ReplicaSet of a deployment's current template, with no replicas yet."""
    h = template_hash(d["spec"]["template"])
    tmpl = copy.deepcopy(d["spec"]["template"])
    tmpl["metadata"].setdefault("labels", {})["pod-template-hash"] = h
    sel = copy.deepcopy(d["spec"]["selector"])
    sel.setdefault("matchLabels", {})["pod-template-hash"] = h
    labels = dict(tmpl["metadata"]["labels"])
    ann = {k: v for k, v in d["metadata"].get("annotations", {}).items()
           if k not in (REV, "kubectl.kubernetes.io/last-applied-configuration")}
    ann.update({REV: str(revision), "deployment.kubernetes.io/desired-replicas": str(d["spec"]["replicas"]),
                "deployment.kubernetes.io/max-replicas": str(d["spec"]["replicas"] + fenceposts(d)[0])})
    rs = {"kind": "ReplicaSet", "apiVersion": "apps/v1",
          "metadata": {"name": "%s-%s" % (d["metadata"]["name"], h), "namespace": d["metadata"]["namespace"],
                       "labels": labels, "annotations": ann, "generation": 1,
                       "creationTimestamp": now_iso(now), "ownerReferences": [owner_ref(d)]},
          "spec": {"replicas": 0, "minReadySeconds": d["spec"].get("minReadySeconds", 0),
                   "selector": sel, "template": tmpl},
          "status": {"replicas": 0}}
    return rs


def pod_for(rs, name, now):
    """A new Pending pod of a ReplicaSet."""
    tmpl = clone(rs["spec"]["template"])
    pod = {"kind": "Pod", "apiVersion": "v1",
           "metadata": {"name": name, "generateName": rs["metadata"]["name"] + "-",
                        "namespace": rs["metadata"]["namespace"],
                        "labels": tmpl["metadata"].get("labels", {}), "creationTimestamp": now_iso(now),
                        "ownerReferences": [owner_ref(rs)]},
           "spec": tmpl["spec"], "status": {"phase": "Pending", "qosClass": qos_class(tmpl["spec"])}}
    if tmpl["metadata"].get("annotations"):
        pod["metadata"]["annotations"] = tmpl["metadata"]["annotations"]
    return pod


def spec_replicas(rs):
    return rs["spec"].get("replicas", 0)


def available(rs):
    return rs.get("status", {}).get("availableReplicas", 0)


def by_owner(objs):
    """Controller-owned objects grouped by their owner's uid."""
    out = {}
    for o in objs:
        for r in o["metadata"].get("ownerReferences", []):
            if r.get("controller"):
                out.setdefault(r.get("uid"), []).append(o)
    return out


def drop_zero(status, keys):
    for k in keys:
        if not status.get(k):
            status.pop(k, None)
    return status


MEMORY_UNITS = {"": 1, "k": 1000, "M": 1000 ** 2, "G": 1000 ** 3, "T": 1000 ** 4,
                "Ki": 1024, "Mi": 1024 ** 2, "Gi": 1024 ** 3, "Ti": 1024 ** 4}


def cpu_millis(q):
    """"500m" -> 500, "2" -> 2000; 0 when unset or unreadable."""
    m = re.match(r'^([\d.]+)(m?)$', str(q or ""))
    return 0 if not m else float(m.group(1)) * (1 if m.group(2) else 1000)


def memory_limit(container):
    """A container's memory limit in bytes ("256Mi", "1G", "134217728"); None when unset or unreadable."""
    q = ((container.get("resources") or {}).get("limits") or {}).get("memory")
    m = re.match(r'^([\d.]+)([kMGT]i?)?$', str(q or ""))
    return float(m.group(1)) * MEMORY_UNITS[m.group(2) or ""] if m else None


class Faults:
    def __init__(self):
        self.reset()

    def reset(self):
        self.crash = set()       # (namespace, deployment, image)
        self.oom = {}            # (namespace, deployment) -> the app container's memory limit (bytes) at injection
        self.bad_images = set()
        self.notready = set()    # node names
        self.api_error_rate = 0.0
        self.api_error_code = 500
        self.api_latency = 0.0
        self.exec_protocols = None  # the exec subprotocols served, when narrowed (an API server before 1.30)
        self.bad_image_undo = {}  # (ns, deployment) -> image to restore on reset
        self.template_undo = {}   # (ns, deployment) -> (the faulted pod spec, the one to restore on reset)
        self.claims = set()       # (ns, name) of the claims pvc-pending made, deleted on reset
        self.evicted = set()      # (ns, name) of the pods evicted made, deleted on reset

    def describe(self):
        return {"crashloop": sorted("%s/%s image=%s" % f for f in self.crash),
                "oom": sorted("%s/%s" % f for f in self.oom),
                "bad_images": sorted(self.bad_images), "node_notready": sorted(self.notready),
                "api_errors": self.api_error_rate, "api_error_code": self.api_error_code,
                "api_latency": self.api_latency, "exec_protocols": self.exec_protocols,
                "template_changes": sorted("%s/%s" % k for k in self.template_undo),
                "claims": sorted("%s/%s" % k for k in self.claims)}


class Controller:
    def __init__(self, store, state_dir):
        self.store, self.state_dir = store, state_dir
        self.faults = Faults()
        self.stop = threading.Event()
        self.paused = False      # `ctl workload pause`: no tick runs, so nothing changes by itself
        self.ip_seq = 10
        self.certs = CertManager(self, state_dir)
        self.reset()

    def reset(self):
        """Forget faults and the runtime state kept outside the objects."""
        self.faults.reset()
        self.rt = {}            # (pod uid, container) -> when a backed-off container may restart
        self.started = {}       # pod uid -> when it was scheduled (startTime has whole seconds only)
        self.deleting = {}      # pod uid -> when it was first seen Terminating
        self.bare = {}          # (uid, resourceVersion) -> bare_template of a ReplicaSet
        self.replicas_written = {}
        self.ws_stuck_pods = {}   # app -> uids of its pods when ctl dapr ws-stuck was first seen
        self.reported = set()
        self.quiet = {}         # deployment uid -> the families() signature it was found at rest with
        self.lists, self.lists_rv = {}, None   # shared() lists, valid while the store's resourceVersion stays
        self.families_read, self.families_rv = {}, None
        self.quiet_from, self.quiet_faults = None, None

    # plumbing ------------------------------------------------------------------
    def save(self, key, old, new):
        if old != new:
            return self.store.put(key, new)
        return old

    def emit(self, obj, etype, reason, message, now, component="kubelet", host=None, field_path=None):
        md = obj["metadata"]
        ns = md.get("namespace") or "default"
        events = self.store.list("events", ns, shared=True)
        for ev in events:
            io = ev["involvedObject"]
            if io.get("uid") == md.get("uid") and ev["reason"] == reason and ev["message"] == message:
                ev = clone(ev)
                ev["count"] = ev.get("count", 1) + 1
                ev["lastTimestamp"] = now_iso(now)
                self.store.put("events", ev)
                return
        if len(events) >= MAX_EVENTS:
            oldest = min(events, key=lambda e: (e.get("lastTimestamp") or "", e["metadata"]["resourceVersion"]))
            self.store.remove("events", ns, oldest["metadata"]["name"])
        ev = {"kind": "Event", "apiVersion": "v1",
              "metadata": {"name": "%s.%x" % (md["name"], random.getrandbits(60)), "namespace": ns,
                           "creationTimestamp": now_iso(now)},
              "involvedObject": {"kind": obj["kind"], "namespace": md.get("namespace"), "name": md["name"],
                                 "uid": md.get("uid"), "apiVersion": obj["apiVersion"],
                                 "resourceVersion": md.get("resourceVersion")},
              "reason": reason, "message": message, "type": etype, "count": 1,
              "source": {"component": component, **({"host": host} if host else {})},
              "firstTimestamp": now_iso(now), "lastTimestamp": now_iso(now),
              "reportingComponent": component, "reportingInstance": host or ""}
        if field_path:
            ev["involvedObject"]["fieldPath"] = field_path
        if not md.get("namespace"):
            ev["involvedObject"].pop("namespace")
        self.store.put("events", ev)

    def run(self):
        """Tick on every change, as controllers react to watch events, and at
        least every TICK for the timers (startup, back-off, termination)."""
        seen = None
        while not self.stop.is_set():
            with self.store.cond:
                if self.store.rv == seen:
                    self.store.cond.wait(TICK)
                seen = self.store.rv
            try:
                with self.store.lock:   # pause takes the lock too: once it returns, no tick starts
                    if not self.paused:
                        self.tick(time.time())
            except Exception:  # keep the loop alive; the log shows what broke
                import traceback
                traceback.print_exc()
            self.stop.wait(MIN_TICK)

    def guarded(self, fn, obj, now, *more):
        """One broken object must not stop the loop for the others."""
        try:
            fn(obj, now, *more)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError):
            key = (fn.__name__, obj["metadata"].get("uid"))
            if key not in self.reported:
                self.reported.add(key)
                import traceback
                traceback.print_exc()

    def shared(self, key, ns=None):
        """The store's objects of a kind, read-only; the same list until anything is written."""
        if self.lists_rv != self.store.rv:
            self.lists, self.lists_rv = {}, self.store.rv
        if (key, ns) not in self.lists:
            self.lists[(key, ns)] = self.store.list(key, ns, shared=True)
        return self.lists[(key, ns)]

    def owned(self, key):
        """by_owner of shared(key), cached alike."""
        self.shared(key)
        if ("owned", key) not in self.lists:
            self.lists[("owned", key)] = by_owner(self.shared(key))
        return self.lists[("owned", key)]

    def tick(self, now):
        """One pass of every controller. Objects come shared (read-only): a sync
        copies what it changes and writes only when the copy differs. A
        deployment whose objects are at rest and were not written by the last
        pass is skipped whole (see quiet): a namespace of a thousand settled
        deployments costs a tick little more than listing them."""
        with self.store.lock:
            self.sync_nodes(now)
            before = self.families()
            faults = self.faults.describe()
            skip = set()
            for uid, (sig, members) in before.items():
                if self.quiet.get(uid) == sig and faults == self.quiet_faults:
                    skip.update(members)
            rss = self.owned("replicasets.apps")
            for d in self.shared("deployments.apps"):
                if d["metadata"]["uid"] not in skip:
                    self.guarded(self.sync_deployment, d, now, rss.get(d["metadata"]["uid"], []))
            pods = self.owned("pods")
            for rs in self.shared("replicasets.apps"):
                if rs["metadata"]["uid"] not in skip:
                    self.guarded(self.sync_replicaset, rs, now, pods.get(rs["metadata"]["uid"], []))
            pods = self.owned("pods")
            for sts in self.shared("statefulsets.apps"):
                self.guarded(self.sync_statefulset, sts, now, pods.get(sts["metadata"]["uid"], []))
            for c in self.shared("persistentvolumeclaims"):
                self.guarded(self.sync_claim, c, now)
            for p in self.shared("pods"):
                if p["metadata"]["uid"] not in skip:
                    self.guarded(self.sync_pod, p, now)
            pods = self.owned("pods")
            for rs in self.shared("replicasets.apps"):
                if rs["metadata"]["uid"] not in skip:
                    self.replicaset_status(rs, pods.get(rs["metadata"]["uid"], []))
            rss = self.owned("replicasets.apps")
            for d in self.shared("deployments.apps"):
                if d["metadata"]["uid"] not in skip:
                    self.deployment_status(d, now, rss.get(d["metadata"]["uid"], []))
            for sts in self.shared("statefulsets.apps"):
                self.statefulset_status(sts, pods.get(sts["metadata"]["uid"], []))
            by_ns = {}
            for p in self.shared("pods"):
                by_ns.setdefault(p["metadata"]["namespace"], []).append(p)
            for s in self.shared("services"):
                self.sync_endpoints(s, now, by_ns.get(s["metadata"]["namespace"], []))
            for h in self.shared("horizontalpodautoscalers.autoscaling"):
                self.sync_hpa(h)
            for crt in self.shared("certificates.cert-manager.io"):
                self.guarded(self.certs.sync, crt, now)
            self.write_replica_files()
            after = self.families()
            if after is not before or after is not self.quiet_from or faults != self.quiet_faults:
                clean = faults == Faults().describe()
                self.quiet = {uid: sig for uid, (sig, _) in after.items()
                              if clean and uid in before and before[uid][0] == sig and self.at_rest(uid)}
                # a pass that wrote nothing over the same read decides the same again
                self.quiet_from = after if after is before else None
                self.quiet_faults = faults

    def families(self):
        """Each deployment's uid -> (the resourceVersions of it, its ReplicaSets and
        their pods; the uids of them all). Read again only after a write."""
        if self.families_rv == self.store.rv:
            return self.families_read
        rss = self.owned("replicasets.apps")
        pods = self.owned("pods")
        out, deps = {}, {}
        for d in self.shared("deployments.apps"):
            uid = d["metadata"]["uid"]
            deps[uid] = d
            sig, members = [d["metadata"]["resourceVersion"]], [uid]
            for rs in rss.get(uid, []):
                ps = pods.get(rs["metadata"]["uid"], [])
                sig.append((rs["metadata"]["resourceVersion"], tuple(p["metadata"]["resourceVersion"] for p in ps)))
                members += [rs["metadata"]["uid"]] + [p["metadata"]["uid"] for p in ps]
            out[uid] = (tuple(sig), members)
        self.last_read = (deps, rss, pods)
        self.families_read, self.families_rv = out, self.store.rv
        return out

    def at_rest(self, uid):
        """Nothing left for the controllers to do over time (tick asks only when
        no fault is set at all): the rollout complete, every pod Running and Ready (no start-up, back-off,
        termination or progress deadline pending). Uses the last families() read."""
        deps, rss, pods = self.last_read
        d = deps[uid]
        st, want = d.get("status") or {}, d["spec"].get("replicas", 1)
        if st.get("observedGeneration") != d["metadata"].get("generation", 1) or any(
                st.get(k, 0) != want for k in ("replicas", "updatedReplicas", "readyReplicas", "availableReplicas")):
            return False
        for rs in rss.get(uid, []):
            for p in pods.get(rs["metadata"]["uid"], []):
                if p["metadata"].get("deletionTimestamp") or not self.pod_is_ready(p):
                    return False
        return True

    # nodes ---------------------------------------------------------------------
    def sync_nodes(self, now):
        for n in self.shared("nodes"):
            new = clone(n)
            bad = n["metadata"]["name"] in self.faults.notready
            for c in new["status"]["conditions"]:
                if c["type"] == "Ready":
                    want = ("Unknown", "NodeStatusUnknown", "Kubelet stopped posting node status.") if bad \
                        else ("True", "KubeletReady", "kubelet is posting ready status")
                    if (c["status"], c["reason"], c["message"]) != want:
                        c["status"], c["reason"], c["message"] = want
                        c["lastTransitionTime"] = c["lastHeartbeatTime"] = now_iso(now)
                        self.emit(n, "Normal", "NodeNotReady" if bad else "NodeReady",
                                  "Node %s status is now: %s" % (n["metadata"]["name"],
                                                                 "NodeNotReady" if bad else "NodeReady"),
                                  now, "node-controller")
            taints = [t for t in new["spec"].get("taints", []) if t["key"] != "node.kubernetes.io/unreachable"]
            if bad:
                taints += [{"key": "node.kubernetes.io/unreachable", "effect": e, "timeAddedAt": now_iso(now)}
                           for e in ("NoSchedule", "NoExecute")]
                old_t = [t for t in n["spec"].get("taints", []) if t["key"] == "node.kubernetes.io/unreachable"]
                if old_t:
                    taints = [t for t in taints if t["key"] != "node.kubernetes.io/unreachable"] + old_t
            if taints:
                new["spec"]["taints"] = taints
            else:
                new["spec"].pop("taints", None)
            self.save("nodes", n, new)

    def node_ready(self, name):
        n = self.store.get("nodes", "", name)
        return n is not None and any(c["type"] == "Ready" and c["status"] == "True"
                                     for c in n["status"]["conditions"])

    # deployments -----------------------------------------------------------------
    def bare_of(self, rs):
        key = (rs["metadata"]["uid"], rs["metadata"]["resourceVersion"])
        if key not in self.bare:
            if len(self.bare) > 2000:
                self.bare.clear()
            self.bare[key] = bare_template(rs["spec"]["template"])
        return self.bare[key]

    def sync_deployment(self, d, now, rss):
        want = bare_template(d["spec"]["template"])
        new_rs = next((r for r in rss if self.bare_of(r) == want), None)
        revs = [int(r["metadata"].get("annotations", {}).get(REV, "0")) for r in rss]
        top = max(revs or [0])
        if d["spec"].get("paused"):
            return
        if new_rs is None:
            new_rs = self.create_replicaset(d, top + 1, now)
        elif int(new_rs["metadata"]["annotations"].get(REV, "0")) < top:
            r2 = clone(new_rs)
            old_rev = r2["metadata"]["annotations"][REV]
            hist = [h for h in r2["metadata"]["annotations"].get("deployment.kubernetes.io/revision-history", "").split(",") if h]
            r2["metadata"]["annotations"]["deployment.kubernetes.io/revision-history"] = ",".join(hist + [old_rev])
            r2["metadata"]["annotations"][REV] = str(top + 1)
            new_rs = self.save("replicasets.apps", new_rs, r2)
        rev = new_rs["metadata"]["annotations"][REV]
        if d["metadata"].get("annotations", {}).get(REV) != rev:
            d2 = clone(d)
            d2["metadata"].setdefault("annotations", {})[REV] = rev
            d = self.save("deployments.apps", d, d2)
        self.rollout(d, new_rs, [r for r in rss if r["metadata"]["uid"] != new_rs["metadata"]["uid"]], now)
        self.cleanup_history(d, rss, new_rs)

    def create_replicaset(self, d, revision, now):
        return self.store.put("replicasets.apps", replicaset_for(d, revision, now))

    def rollout(self, d, new_rs, olds, now):
        """The deployment controller's Recreate and RollingUpdate steps: the new
        ReplicaSet grows within maxSurge, old ones shrink within maxUnavailable
        (unhealthy replicas first, oldest ReplicaSet first)."""
        want = d["spec"]["replicas"]
        olds = sorted((r for r in olds if spec_replicas(r) > 0), key=lambda r: r["metadata"]["creationTimestamp"])
        if d["spec"].get("strategy", {}).get("type") == "Recreate":
            for r in olds:
                self.scale(d, r, 0, now)
            if not any(r.get("status", {}).get("replicas") for r in olds):
                self.scale(d, new_rs, want, now)
            return
        surge, unavailable = fenceposts(d)
        room = want + surge - spec_replicas(new_rs) - sum(spec_replicas(r) for r in olds)
        target = want if spec_replicas(new_rs) >= want else min(want, spec_replicas(new_rs) + max(0, room))
        new_rs = self.scale(d, new_rs, target, now)
        if not olds:
            return
        min_available = want - unavailable
        budget = (spec_replicas(new_rs) + sum(spec_replicas(r) for r in olds) - min_available
                  - (spec_replicas(new_rs) - available(new_rs)))
        if budget <= 0:
            return
        for i, r in enumerate(olds):
            n = min(budget, spec_replicas(r) - available(r))
            if n > 0:
                olds[i] = self.scale(d, r, spec_replicas(r) - n, now)
                budget -= n
        excess = available(new_rs) + sum(available(r) for r in olds) - min_available
        for r in olds:
            n = min(spec_replicas(r), excess)
            if n > 0:
                self.scale(d, r, spec_replicas(r) - n, now)
                excess -= n

    def scale(self, d, rs, n, now):
        cur = rs["spec"].get("replicas", 0)
        if cur == n:
            return rs
        r2 = clone(rs)
        r2["spec"]["replicas"] = n
        r2["metadata"]["generation"] = r2["metadata"].get("generation", 1) + 1
        r2["metadata"]["annotations"]["deployment.kubernetes.io/desired-replicas"] = str(d["spec"]["replicas"])
        r2["metadata"]["annotations"]["deployment.kubernetes.io/max-replicas"] = str(d["spec"]["replicas"] + fenceposts(d)[0])
        self.emit(d, "Normal", "ScalingReplicaSet", "Scaled %s replica set %s from %d to %d" % (
            "up" if n > cur else "down", rs["metadata"]["name"], cur, n), now, "deployment-controller")
        return self.store.put("replicasets.apps", r2)

    def cleanup_history(self, d, rss, new_rs):
        limit = d["spec"].get("revisionHistoryLimit", 10)
        idle = [r for r in rss if r["metadata"]["uid"] != new_rs["metadata"]["uid"]
                and r["spec"].get("replicas", 0) == 0 and not r.get("status", {}).get("replicas")]
        idle.sort(key=lambda r: int(r["metadata"]["annotations"].get(REV, "0")))
        for r in idle[:max(0, len(idle) - limit)]:
            self.store.remove("replicasets.apps", r["metadata"]["namespace"], r["metadata"]["name"])

    def deployment_status(self, d, now, rss):
        st = self.deployment_status_of(d, now, rss)
        if st != d.get("status"):
            d2 = clone(d)
            d2["status"] = st
            self.store.put("deployments.apps", d2)

    def deployment_status_of(self, d, now, rss):
        rev = d["metadata"].get("annotations", {}).get(REV)
        new_rs = next((r for r in rss if r["metadata"]["annotations"].get(REV) == rev
                       and self.bare_of(r) == bare_template(d["spec"]["template"])), None)
        want = d["spec"]["replicas"]
        tot = lambda f: sum(r.get("status", {}).get(f, 0) for r in rss)
        st = {"observedGeneration": d["metadata"].get("generation", 1), "replicas": tot("replicas"),
              "updatedReplicas": new_rs.get("status", {}).get("replicas", 0) if new_rs else 0,
              "readyReplicas": tot("readyReplicas"), "availableReplicas": tot("availableReplicas")}
        st["unavailableReplicas"] = max(0, sum(spec_replicas(r) for r in rss) - st["availableReplicas"])
        drop_zero(st, ["replicas", "updatedReplicas", "readyReplicas", "availableReplicas", "unavailableReplicas"])
        max_unavail = fenceposts(d)[1] if d["spec"].get("strategy", {}).get("type") != "Recreate" else want
        st["conditions"] = self.conditions(d, new_rs, st, want, max_unavail, now)
        if "collisionCount" in d.get("status", {}):
            st["collisionCount"] = d["status"]["collisionCount"]
        return st

    def conditions(self, d, new_rs, st, want, max_unavail, now):
        old = {c["type"]: c for c in d.get("status", {}).get("conditions", [])}
        avail_ok = st.get("availableReplicas", 0) >= want - max_unavail
        name = new_rs["metadata"]["name"] if new_rs else d["metadata"]["name"]
        done = (st.get("updatedReplicas", 0) == want and st.get("replicas", 0) == want
                and st.get("availableReplicas", 0) == want)
        if d["spec"].get("paused"):
            prog = ("Unknown", "DeploymentPaused", "Deployment is paused")
        elif done:
            prog = ("True", "NewReplicaSetAvailable", 'ReplicaSet "%s" has successfully progressed.' % name)
        progressed = (st.get("updatedReplicas"), st.get("availableReplicas")) != (
            d.get("status", {}).get("updatedReplicas"), d.get("status", {}).get("availableReplicas"))
        if not d["spec"].get("paused") and not done:
            prog = ("True", "ReplicaSetUpdated", 'ReplicaSet "%s" is progressing.' % name)
            was = old.get("Progressing", {})
            same_rollout = was.get("reason") in ("ReplicaSetUpdated", "ProgressDeadlineExceeded") and \
                '"%s"' % name in was.get("message", "")
            last = parse_iso(was.get("lastUpdateTime")) if same_rollout and not progressed else now
            if now - last > d["spec"].get("progressDeadlineSeconds", 600):
                prog = ("False", "ProgressDeadlineExceeded", 'ReplicaSet "%s" has timed out progressing.' % name)
        avail = ("True", "MinimumReplicasAvailable", "Deployment has minimum availability.") if avail_ok else \
            ("False", "MinimumReplicasUnavailable", "Deployment does not have minimum availability.")
        return [self.condition(old.get("Available"), "Available", avail, now, False),
                self.condition(old.get("Progressing"), "Progressing", prog, now, progressed and not done)]

    @staticmethod
    def condition(old, ctype, want, now, touch):
        status, reason, message = want
        if old and (old["status"], old["reason"], old["message"]) == want and not touch:
            return old
        c = {"type": ctype, "status": status, "lastUpdateTime": now_iso(now),
             "lastTransitionTime": now_iso(now), "reason": reason, "message": message}
        if old and old["status"] == status:
            c["lastTransitionTime"] = old["lastTransitionTime"]
        return c

    # replicasets -----------------------------------------------------------------
    def sync_replicaset(self, rs, now, pods):
        pods = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
        want = rs["spec"].get("replicas", 0)
        for _ in range(want - len(pods)):
            self.create_pod(rs, now)
        if len(pods) > want:
            # Like the ReplicaSet controller: unscheduled, then not ready, then the youngest go first.
            pods.sort(key=lambda p: (bool(p["spec"].get("nodeName")), self.pod_is_ready(p),
                                     [-ord(c) for c in p["metadata"]["creationTimestamp"]]))
            for p in pods[:len(pods) - want]:
                self.kill_pod(p, now)
                self.emit(rs, "Normal", "SuccessfulDelete", "Deleted pod: " + p["metadata"]["name"], now,
                          "replicaset-controller")

    def create_pod(self, rs, now):
        name = "%s-%s" % (rs["metadata"]["name"], "".join(random.choice(ALPHA) for _ in range(5)))
        pod = self.store.put("pods", self.admit(pod_for(rs, name, now)))
        self.emit(rs, "Normal", "SuccessfulCreate", "Created pod: " + name, now, "replicaset-controller")
        return pod

    def admit(self, pod):
        """Dapr's sidecar injector, a mutating webhook with failurePolicy Ignore: a pod annotated
        dapr.io/enabled is created without its daprd container while no injector pod works
        (none ready, or each stuck: `ctl k8s dapr-stuck injector`). The templates carry daprd
        already, so a working injector has nothing to add."""
        ann = pod["metadata"].get("annotations") or {}
        if ann.get("dapr.io/enabled") != "true" or self.injector_works():
            return pod
        pod["spec"]["containers"] = [c for c in pod["spec"]["containers"] if c["name"] != "daprd"] or pod["spec"]["containers"]
        return pod

    def injector_works(self):
        return any(self.pod_is_ready(p) and p["metadata"]["uid"] not in workload.DAPR_STUCK
                   and not p["metadata"].get("deletionTimestamp")
                   for p in self.shared("pods", "dapr-system")
                   if (p["metadata"].get("labels") or {}).get("app") == "dapr-sidecar-injector")

    # statefulsets ------------------------------------------------------------------
    def sync_statefulset(self, sts, now, pods):
        """The StatefulSet controller, OrderedReady with RollingUpdate: pods NAME-0..N-1 made in
        order, each once the one before is ready; removed from the highest ordinal; on a new
        template, the highest pod of an old revision is replaced first, one at a time."""
        name, want = sts["metadata"]["name"], sts["spec"].get("replicas", 1)
        rev = "%s-%s" % (name, template_hash(sts["spec"]["template"]))
        by_ordinal = {int(p["metadata"]["name"].rsplit("-", 1)[1]): p for p in pods}
        if any(p["metadata"].get("deletionTimestamp") for p in pods):
            return   # one change at a time: wait for the terminating pod to go
        for i in sorted(by_ordinal, reverse=True):
            if i >= want:
                return self.delete_member(sts, by_ordinal[i], now)
        for i in range(want):
            if i not in by_ordinal:
                return self.create_member(sts, i, rev, now)
            if not self.pod_is_ready(by_ordinal[i]):
                return
        for i in sorted(by_ordinal, reverse=True):
            if by_ordinal[i]["metadata"]["labels"].get("controller-revision-hash") != rev:
                return self.delete_member(sts, by_ordinal[i], now)

    def create_member(self, sts, i, rev, now):
        md = sts["metadata"]
        tmpl = clone(sts["spec"]["template"])
        name = "%s-%d" % (md["name"], i)
        labels = dict(tmpl["metadata"].get("labels", {}), **{
            "controller-revision-hash": rev, "statefulset.kubernetes.io/pod-name": name, "apps.kubernetes.io/pod-index": str(i)})
        spec = dict(tmpl["spec"], hostname=name)
        if sts["spec"].get("serviceName"):
            spec["subdomain"] = sts["spec"]["serviceName"]
        pod = {"kind": "Pod", "apiVersion": "v1",
               "metadata": {"name": name, "namespace": md["namespace"], "labels": labels,
                            "creationTimestamp": now_iso(now), "ownerReferences": [owner_ref(sts)]},
               "spec": spec, "status": {"phase": "Pending", "qosClass": qos_class(spec)}}
        if tmpl["metadata"].get("annotations"):
            pod["metadata"]["annotations"] = tmpl["metadata"]["annotations"]
        self.store.put("pods", self.admit(pod))
        self.emit(sts, "Normal", "SuccessfulCreate", "create Pod %s in StatefulSet %s successful" % (name, md["name"]),
                  now, "statefulset-controller")

    def delete_member(self, sts, p, now):
        self.kill_pod(p, now)
        self.emit(sts, "Normal", "SuccessfulDelete", "delete Pod %s in StatefulSet %s successful" % (
            p["metadata"]["name"], sts["metadata"]["name"]), now, "statefulset-controller")

    def statefulset_status(self, sts, pods):
        rev = "%s-%s" % (sts["metadata"]["name"], template_hash(sts["spec"]["template"]))
        pods = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
        ready = sum(1 for p in pods if self.pod_is_ready(p))
        at = lambda r: sum(1 for p in pods if p["metadata"]["labels"].get("controller-revision-hash") == r)
        old = sts.get("status") or {}
        current = old.get("currentRevision") or rev
        if at(rev) == len(pods) == sts["spec"].get("replicas", 1):
            current = rev
        st = {"observedGeneration": sts["metadata"].get("generation", 1), "replicas": len(pods), "readyReplicas": ready,
              "availableReplicas": ready, "currentReplicas": at(current), "updatedReplicas": at(rev),
              "currentRevision": current, "updateRevision": rev, "collisionCount": 0}
        st = drop_zero(st, ["readyReplicas", "availableReplicas", "currentReplicas", "updatedReplicas"])
        if st != old:
            new = clone(sts)
            new["status"] = st
            self.store.put("statefulsets.apps", new)

    def kill_pod(self, p, now):
        """Delete a pod gracefully: Terminating now, gone TERMINATION seconds later."""
        if p["metadata"].get("deletionTimestamp"):
            return
        if not p["spec"].get("nodeName"):
            self.store.remove("pods", p["metadata"]["namespace"], p["metadata"]["name"])
            return
        for c in p["spec"]["containers"]:
            self.emit(p, "Normal", "Killing", "Stopping container " + c["name"], now,
                      host=p["spec"].get("nodeName"), field_path="spec.containers{%s}" % c["name"])
        new = clone(p)
        grace = p["spec"].get("terminationGracePeriodSeconds", 30)
        new["metadata"]["deletionTimestamp"] = now_iso(now + grace)
        new["metadata"]["deletionGracePeriodSeconds"] = grace
        self.deleting[p["metadata"]["uid"]] = now
        self.store.put("pods", new)

    def finish_termination(self, p, now):
        uid = p["metadata"]["uid"]
        if now - self.deleting.setdefault(uid, now) < TERMINATION:
            return
        self.store.remove("pods", p["metadata"]["namespace"], p["metadata"]["name"])
        for table in (self.deleting, self.started):
            table.pop(uid, None)
        for c in p["spec"]["containers"]:
            self.rt.pop((uid, c["name"]), None)

    def pod_is_ready(self, p):
        return any(c["type"] == "Ready" and c["status"] == "True" for c in p.get("status", {}).get("conditions", []))

    def replicaset_status(self, rs, pods):
        st = self.replicaset_status_of(rs, pods)
        if st != rs.get("status"):
            r2 = clone(rs)
            r2["status"] = st
            self.store.put("replicasets.apps", r2)

    def replicaset_status_of(self, rs, pods):
        pods = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
        ready = sum(1 for p in pods if self.pod_is_ready(p))
        st = {"replicas": len(pods), "fullyLabeledReplicas": len(pods), "readyReplicas": ready,
              "availableReplicas": ready, "observedGeneration": rs["metadata"].get("generation", 1)}
        return drop_zero(st, ["fullyLabeledReplicas", "readyReplicas", "availableReplicas"])

    # pods (scheduler + kubelet) ---------------------------------------------------
    def sync_pod(self, p, now):
        if p["metadata"].get("deletionTimestamp"):
            return self.finish_termination(p, now)
        if p["status"].get("phase") in ("Failed", "Succeeded"):
            return   # a pod that ended stays as it ended (an evicted pod until deleted)
        node = p["spec"].get("nodeName")
        if not node:
            return self.schedule(p, now)
        if node in self.faults.notready:
            return self.node_lost(p, now)
        started = self.started.get(p["metadata"]["uid"]) or parse_iso(p["status"].get("startTime")) or now
        if now - started < STARTUP:
            return
        new = clone(p)
        mode = self.mode_of(p)
        statuses = {c["name"]: c for c in p["status"].get("containerStatuses", [])}
        new["status"]["containerStatuses"] = [
            self.container(p, c, statuses.get(c["name"]), mode if i == 0 else "ok", now)
            for i, c in enumerate(p["spec"]["containers"])]
        self.pod_conditions(new, now)
        self.save("pods", p, new)

    def sync_claim(self, c, now):
        """The volume provisioner: a claim of a known storage class binds; any other stays Pending."""
        if c.get("status", {}).get("phase") == "Bound":
            return
        new = clone(c)
        sc = c["spec"].get("storageClassName") or STORAGE_CLASSES[0]
        if sc in STORAGE_CLASSES:
            new["spec"]["volumeName"] = "pvc-" + c["metadata"]["uid"]
            new["status"] = {"phase": "Bound", "accessModes": c["spec"].get("accessModes", ["ReadWriteOnce"]),
                             "capacity": {"storage": ((c["spec"].get("resources") or {}).get("requests") or {}).get("storage", "1Gi")}}
            self.save("persistentvolumeclaims", c, new)
            return
        if c.get("status", {}).get("phase") != "Pending":
            new["status"] = {"phase": "Pending"}
            self.save("persistentvolumeclaims", c, new)
            self.emit(c, "Warning", "ProvisioningFailed", 'storageclass.storage.k8s.io "%s" not found' % sc, now,
                      "persistentvolume-controller")

    def cannot_schedule(self, p, nodes):
        """Why the scheduler leaves p Pending (its FailedScheduling message), or None."""
        n = len(self.shared("nodes"))
        for v in p["spec"].get("volumes") or []:
            claim = (v.get("persistentVolumeClaim") or {}).get("claimName")
            if not claim:
                continue
            pvc = self.store.get("persistentvolumeclaims", p["metadata"]["namespace"], claim)
            if pvc is None:
                return 'persistentvolumeclaim "%s" not found' % claim
            if pvc.get("status", {}).get("phase") != "Bound":
                return ("0/%d nodes are available: pod has unbound immediate PersistentVolumeClaims. preemption: "
                        "0/%d nodes are available: %d Preemption is not helpful for scheduling." % (n, n, n))
        if not nodes:
            return "0/%d nodes are available." % n
        requests = [(c.get("resources") or {}).get("requests") or {} for c in p["spec"]["containers"]]
        cpu = sum(cpu_millis(r.get("cpu")) for r in requests)
        if not any(cpu <= cpu_millis(node["status"]["allocatable"]["cpu"]) for node in nodes):
            return ("0/%d nodes are available: %d Insufficient cpu. preemption: 0/%d nodes are available: "
                    "%d No preemption victims found for incoming pod." % (n, len(nodes), n, len(nodes)))
        return None

    def schedule(self, p, now):
        nodes = [n for n in self.shared("nodes") if self.node_ready(n["metadata"]["name"])
                 and not n["spec"].get("unschedulable")]
        why = self.cannot_schedule(p, nodes)
        if why:
            cond = (p["status"].get("conditions") or [{}])[0]
            if cond.get("message") != why:
                new = clone(p)
                new["status"]["conditions"] = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                                "message": why, "lastTransitionTime": now_iso(now)}]
                self.save("pods", p, new)
                self.emit(p, "Warning", "FailedScheduling", why, now, "default-scheduler")
            return
        load = {n["metadata"]["name"]: 0 for n in nodes}
        for q in self.shared("pods"):
            if q["spec"].get("nodeName") in load:
                load[q["spec"]["nodeName"]] += 1
        node = min(nodes, key=lambda n: (load[n["metadata"]["name"]], n["metadata"]["name"]))
        self.started[p["metadata"]["uid"]] = now
        new = clone(p)
        new["spec"]["nodeName"] = node["metadata"]["name"]
        idx = sorted(load).index(node["metadata"]["name"])
        self.ip_seq = self.ip_seq % 250 + 1
        new["status"].update({
            "phase": "Pending", "hostIP": node["status"]["addresses"][0]["address"],
            "podIP": "10.244.%d.%d" % (idx, self.ip_seq), "startTime": now_iso(now),
            "conditions": [{"type": "PodScheduled", "status": "True", "lastTransitionTime": now_iso(now)}],
            "containerStatuses": [self.waiting(c, "ContainerCreating", None, 0) for c in p["spec"]["containers"]]})
        new["status"]["podIPs"] = [{"ip": new["status"]["podIP"]}]
        new["status"]["hostIPs"] = [{"ip": new["status"]["hostIP"]}]
        self.save("pods", p, new)
        self.emit(p, "Normal", "Scheduled", "Successfully assigned %s/%s to %s" % (
            p["metadata"]["namespace"], p["metadata"]["name"], node["metadata"]["name"]), now, "default-scheduler")

    def node_lost(self, p, now):
        new = clone(p)
        for c in new["status"].get("conditions", []):
            if c["type"] == "Ready" and c["status"] != "False":
                c.update(status="False", lastTransitionTime=now_iso(now))
                self.emit(p, "Warning", "NodeNotReady", "Node is not ready", now, "node-controller")
        new = self.save("pods", p, new)
        lost = parse_iso(next((c["lastTransitionTime"] for c in new["status"].get("conditions", [])
                               if c["type"] == "Ready"), None)) or now
        if now - lost >= EVICT_AFTER and p["metadata"].get("ownerReferences"):
            self.emit(p, "Normal", "TaintManagerEviction", "Marking for deletion Pod %s/%s" % (
                p["metadata"]["namespace"], p["metadata"]["name"]), now, "taint-eviction-controller")
            self.kill_pod(new, now)

    def pull_allowed(self, p, image):
        """Whether the kubelet may pull image: a private registry's needs a pull secret with its auth."""
        if image.split("/")[0] != PRIVATE_REGISTRY:
            return True
        for ref in p["spec"].get("imagePullSecrets") or []:
            sec = self.store.get("secrets", p["metadata"]["namespace"], ref.get("name", ""))
            if sec and sec.get("type") == "kubernetes.io/dockerconfigjson":
                try:
                    auths = json.loads(base64.b64decode(sec.get("data", {}).get(".dockerconfigjson", "")))["auths"]
                except (ValueError, KeyError, TypeError):
                    continue
                if PRIVATE_REGISTRY in auths:
                    return True
        return False

    def mode_of(self, p):
        c = p["spec"]["containers"][0]
        image = c.get("image", "")
        if image in self.faults.bad_images or any(t in image.split(":")[-1] for t in BAD_TAGS):
            return "badimage"
        if not self.pull_allowed(p, image):
            return "noauth"
        dep = self.deployment_of(p)
        ns = p["metadata"]["namespace"]
        if dep and (ns, dep, image) in self.faults.crash:
            return "crash"
        if dep and (ns, dep) in self.faults.oom:
            # a memory limit raised above the one the fault found heals it
            limit, now_limit = self.faults.oom[(ns, dep)], memory_limit(c)
            if limit is None or now_limit is None or now_limit <= limit:
                return "oom"
        return "ok"

    def deployment_of(self, p):
        for r in p["metadata"].get("ownerReferences", []):
            if r["kind"] == "ReplicaSet":
                rs = self.store.get("replicasets.apps", p["metadata"]["namespace"], r["name"])
                for r2 in (rs or {}).get("metadata", {}).get("ownerReferences", []):
                    if r2["kind"] == "Deployment":
                        return r2["name"]
        return None

    @staticmethod
    def waiting(c, reason, message, restarts, last=None):
        st = {"name": c["name"], "image": c["image"], "imageID": "", "ready": False, "started": False,
              "restartCount": restarts, "state": {"waiting": {"reason": reason}}}
        if message:
            st["state"]["waiting"]["message"] = message
        st["lastState"] = last or {}
        return st

    def running(self, p, c, restarts, now, ready, last=None):
        digest = hashlib.sha256(c["image"].encode()).hexdigest()
        return {"name": c["name"], "image": c["image"], "imageID": "%s@sha256:%s" % (c["image"].split(":")[0], digest),
                "containerID": "containerd://" + hashlib.sha256(("%s%s%s" % (p["metadata"]["uid"], c["name"], restarts)).encode()).hexdigest(),
                "ready": ready, "started": True, "restartCount": restarts,
                "state": {"running": {"startedAt": now_iso(now)}}, "lastState": last or {}}

    def container(self, p, c, cur, mode, now):
        cur = cur or self.waiting(c, "ContainerCreating", None, 0)
        state = cur.get("state", {})
        restarts = cur.get("restartCount", 0)
        fp = "spec.containers{%s}" % c["name"]
        host = p["spec"].get("nodeName")
        ev = lambda t, r, m: self.emit(p, t, r, m, now, host=host, field_path=fp)
        if cur.get("image") != c["image"]:
            cur = self.waiting(c, "ContainerCreating", None, restarts)
            state = cur["state"]
        if mode in ("badimage", "noauth"):
            w = state.get("waiting", {}).get("reason")
            if w == "ImagePullBackOff":
                return cur
            if w == "ErrImagePull":
                ev("Normal", "BackOff", 'Back-off pulling image "%s"' % c["image"])
                ev("Warning", "Failed", "Error: ImagePullBackOff")
                return self.waiting(c, "ImagePullBackOff", 'Back-off pulling image "%s"' % c["image"], restarts)
            ev("Normal", "Pulling", 'Pulling image "%s"' % c["image"])
            why = ('rpc error: code = NotFound desc = failed to pull and unpack image "%s": not found' % c["image"]
                   if mode == "badimage" else
                   'rpc error: code = Unknown desc = failed to pull and unpack image "%s": failed to resolve reference '
                   '"%s": pull access denied, repository does not exist or may require authorization: '
                   'authorization failed: no basic auth credentials' % (c["image"], c["image"]))
            ev("Warning", "Failed", 'Failed to pull image "%s": %s' % (c["image"], why))
            ev("Warning", "Failed", "Error: ErrImagePull")
            return self.waiting(c, "ErrImagePull", why, restarts)
        if "running" in state:
            started = parse_iso(state["running"]["startedAt"])
            if mode == "crash" and now - started >= CRASH_RUN:
                return self.crash(p, c, cur, now, ev)
            if mode == "oom" and (now - started >= OOM_PERIOD or not cur.get("lastState")):
                last = {"terminated": {"exitCode": 137, "reason": "OOMKilled", "startedAt": state["running"]["startedAt"],
                                       "finishedAt": now_iso(now), "containerID": cur.get("containerID", "")}}
                ev("Normal", "Pulled", 'Container image "%s" already present on machine' % c["image"])
                ev("Normal", "Started", "Started container " + c["name"])
                return self.running(p, c, restarts + 1, now, True, last)
            ready = mode != "crash"
            if cur.get("ready") != ready:
                cur = clone(cur)
                cur["ready"] = ready
            return cur
        if state.get("waiting", {}).get("reason") == "CrashLoopBackOff":
            if mode == "crash" and now < self.rt.get((p["metadata"]["uid"], c["name"]), 0):
                return cur
        ev("Normal", "Pulled", 'Container image "%s" already present on machine' % c["image"])
        ev("Normal", "Created", "Created container " + c["name"])
        ev("Normal", "Started", "Started container " + c["name"])
        if state.get("waiting", {}).get("reason") in ("CrashLoopBackOff",) or restarts:
            return self.running(p, c, restarts, now, mode != "crash", cur.get("lastState"))
        return self.running(p, c, restarts, now, mode != "crash")

    def crash(self, p, c, cur, now, ev):
        restarts = cur.get("restartCount", 0) + 1
        delay = min(10 * 2 ** (restarts - 1), 300)
        self.rt[(p["metadata"]["uid"], c["name"])] = now + delay * BACKOFF
        last = {"terminated": {"exitCode": 1, "reason": "Error", "startedAt": cur["state"]["running"]["startedAt"],
                               "finishedAt": now_iso(now), "containerID": cur.get("containerID", "")}}
        ev("Warning", "BackOff", "Back-off restarting failed container %s in pod %s_%s(%s)" % (
            c["name"], p["metadata"]["name"], p["metadata"]["namespace"], p["metadata"]["uid"]))
        return self.waiting(c, "CrashLoopBackOff", "back-off %s restarting failed container=%s pod=%s_%s(%s)" % (
            go_duration(delay), c["name"], p["metadata"]["name"], p["metadata"]["namespace"], p["metadata"]["uid"]),
            restarts, last)

    def pod_conditions(self, p, now):
        cs = p["status"]["containerStatuses"]
        ready = all(c.get("ready") for c in cs)
        started = all("running" in c.get("state", {}) for c in cs)
        old = {c["type"]: c for c in p["status"].get("conditions", [])}

        def cond(t, ok, reason=None):
            s = "True" if ok else "False"
            if t in old and old[t]["status"] == s:
                return old[t]
            c = {"type": t, "status": s, "lastTransitionTime": now_iso(now)}
            if reason and not ok:
                c["reason"] = reason
            return c
        p["status"]["conditions"] = [
            cond("PodReadyToStartContainers", True), cond("Initialized", True),
            cond("Ready", ready, "ContainersNotReady"), cond("ContainersReady", ready, "ContainersNotReady"),
            cond("PodScheduled", True)]
        p["status"]["phase"] = "Running" if started or any(c.get("restartCount") for c in cs) else "Pending"

    # services, hpa, replica files ------------------------------------------------
    def sync_endpoints(self, svc, now, ns_pods):
        sel = svc["spec"].get("selector")
        if not sel:
            return
        ns = svc["metadata"]["namespace"]
        reqs = [(k, "=", v) for k, v in sel.items()]
        pods = [p for p in ns_pods if p["metadata"]["namespace"] == ns and p["status"].get("podIP")
                and not p["metadata"].get("deletionTimestamp") and labels_match(reqs, p["metadata"].get("labels"))]
        addr = lambda p: {"ip": p["status"]["podIP"], "nodeName": p["spec"]["nodeName"],
                          "targetRef": {"kind": "Pod", "name": p["metadata"]["name"], "namespace": ns,
                                        "uid": p["metadata"]["uid"]}}
        ready = [addr(p) for p in pods if self.pod_is_ready(p)]
        unready = [addr(p) for p in pods if not self.pod_is_ready(p)]
        ports = [{"name": sp["name"], "port": self.target_port(sp, pods), "protocol": sp.get("protocol", "TCP")}
                 if sp.get("name") else {"port": self.target_port(sp, pods), "protocol": sp.get("protocol", "TCP")}
                 for sp in svc["spec"].get("ports", [])]
        subset = {}
        if ready:
            subset["addresses"] = sorted(ready, key=lambda a: a["ip"])
        if unready:
            subset["notReadyAddresses"] = sorted(unready, key=lambda a: a["ip"])
        old = self.store.get("endpoints", ns, svc["metadata"]["name"])
        new = clone(old) if old else {
            "kind": "Endpoints", "apiVersion": "v1",
            "metadata": {"name": svc["metadata"]["name"], "namespace": ns, "labels": svc["metadata"].get("labels", {}),
                         "creationTimestamp": now_iso(now)}}
        new["subsets"] = [dict(subset, ports=ports)] if subset else []
        if not new["subsets"]:
            new.pop("subsets")
        self.save("endpoints", old, new)

    @staticmethod
    def target_port(sp, pods):
        tp = sp.get("targetPort", sp["port"])
        if isinstance(tp, int):
            return tp
        for p in pods:
            for c in p["spec"]["containers"]:
                for cp in c.get("ports", []):
                    if cp.get("name") == tp:
                        return cp["containerPort"]
        return sp["port"]

    def sync_hpa(self, h):
        ref = h["spec"]["scaleTargetRef"]
        d = self.store.get("deployments.apps", h["metadata"]["namespace"], ref["name"])
        if d is None:
            return
        new = clone(h)
        st = new.setdefault("status", {})
        st["currentReplicas"] = d.get("status", {}).get("replicas", 0)
        st["desiredReplicas"] = max(h["spec"].get("minReplicas", 1), min(d["spec"]["replicas"], h["spec"]["maxReplicas"]))
        self.save("horizontalpodautoscalers.autoscaling", h, new)

    def write_replica_files(self):
        """Ready replicas of each todo-chatbot deployment, for the sandbox's Kafka
        consumers: under the app's name (recurring-task, as `ctl replicas` and the
        Kafka program use) and the deployment's full name."""
        if not self.state_dir:
            return
        for d in self.shared("deployments.apps", "todo-chatbot"):
            # At every pass: the pods may all be new by now without the ready count changing.
            self.heal_ws_stuck(d)
            full = d["metadata"]["name"]
            n = d.get("status", {}).get("readyReplicas", 0)
            if self.replicas_written.get(full) == n:
                continue
            folder = os.path.join(self.state_dir, "replicas")
            os.makedirs(folder, exist_ok=True)
            for name in {full, d["metadata"].get("labels", {}).get("app.kubernetes.io/component")} - {None}:
                tmp = os.path.join(folder, ".%s.tmp" % name)
                with open(tmp, "w") as f:
                    f.write("%d\n" % n)
                os.rename(tmp, os.path.join(folder, name))
            self.replicas_written[full] = n

    def heal_ws_stuck(self, d):
        """`ctl dapr ws-stuck APP`: the app refuses WebSocket upgrades (the Dapr stand-in reads the
        file) until its pods are replaced. The pods the controller finds when it first sees the file
        (within a tick of it) are the stuck ones; once no ready pod is one of them, the file goes."""
        app = d["metadata"].get("labels", {}).get("app.kubernetes.io/component")
        path = os.path.join(self.state_dir, "dapr", "ws-refused", app or "")
        try:
            with open(path) as f:
                stuck = app and f.read().strip() == "until-restart"
        except OSError:
            stuck = False
        if not stuck:
            self.ws_stuck_pods.pop(app, None)
            return
        pods = [p for p in self.shared("pods", d["metadata"]["namespace"])
                if p["metadata"].get("labels", {}).get("app.kubernetes.io/component") == app
                and not p["metadata"].get("deletionTimestamp")]
        old = self.ws_stuck_pods.setdefault(app, {p["metadata"]["uid"] for p in pods})
        ready = [p for p in pods if self.pod_is_ready(p)]
        if ready and not any(p["metadata"]["uid"] in old for p in ready):
            os.remove(path)
            del self.ws_stuck_pods[app]
