"""The API verbs over the store: get, list, create, update, patch, apply, delete."""
import base64
import copy
import json
import re
import threading
import time

import patch as P
import schema as S
from store import ApiError, already_exists, conflict, not_found, now_iso

IGNORED_META = ("resourceVersion", "managedFields")


# Selectors ------------------------------------------------------------------------
def parse_label_selector(text):
    reqs = []
    for part in re.findall(r'(?:[^,(]|\([^)]*\))+', text or ""):
        part = part.strip()
        m = re.match(r'^([\w./-]+)\s+(in|notin)\s+\(([^)]*)\)$', part)
        if m:
            reqs.append((m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",")}))
            continue
        m = re.match(r'^([\w./-]+)\s*(==|!=|=)\s*([\w./-]*)$', part)
        if m:
            reqs.append((m.group(1), "!=" if m.group(2) == "!=" else "=", m.group(3)))
        elif part.startswith("!"):
            reqs.append((part[1:], "!", None))
        elif re.match(r'^[\w./-]+$', part):
            reqs.append((part, "exists", None))
        else:
            raise ApiError(400, "BadRequest", "unable to parse requirement: invalid label selector %r" % text)
    return reqs


def labels_match(reqs, labels):
    labels = labels or {}
    for key, op, val in reqs:
        have = labels.get(key)
        if op == "=":
            ok = have == val
        elif op == "!=":
            ok = have != val
        elif op in ("in", "notin"):
            ok = (have in val) == (op == "in")
        else:
            ok = (key in labels) == (op == "exists")
        if not ok:
            return False
    return True


def field_value(obj, path):
    for p in path.split("."):
        obj = obj.get(p) if isinstance(obj, dict) else None
    return "" if obj is None else str(obj)


def fields_match(text, obj):
    for part in filter(None, (text or "").split(",")):
        m = re.match(r'^([\w.]+)\s*(==|!=|=)\s*(.*)$', part)
        if not m:
            raise ApiError(400, "BadRequest", "invalid field selector %r" % part)
        same = field_value(obj, m.group(1)) == m.group(3)
        if same == (m.group(2) == "!="):
            return False
    return True


def selector_of(sel):
    return [(k, "=", v) for k, v in sorted((sel or {}).get("matchLabels", {}).items())] + \
        [(e["key"], e["operator"].lower() if e["operator"] in ("In", "NotIn") else
          ("exists" if e["operator"] == "Exists" else "!"), set(e.get("values", [])))
         for e in (sel or {}).get("matchExpressions", [])]


# Defaults -------------------------------------------------------------------------
def default_pod_spec(spec):
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("schedulerName", "default-scheduler")
    spec.setdefault("securityContext", {})
    for c in spec.get("containers", []):
        c.setdefault("imagePullPolicy", "Always" if c.get("image", "").endswith(":latest") else "IfNotPresent")
        c.setdefault("terminationMessagePath", "/dev/termination-log")
        c.setdefault("terminationMessagePolicy", "File")
        c.setdefault("resources", {})
        for p in c.get("ports", []):
            p.setdefault("protocol", "TCP")
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            if c.get(probe):
                default_probe(c[probe])


def default_probe(probe):
    probe.setdefault("timeoutSeconds", 1)
    probe.setdefault("periodSeconds", 10)
    probe.setdefault("successThreshold", 1)
    probe.setdefault("failureThreshold", 3)
    if "httpGet" in probe:
        probe["httpGet"].setdefault("scheme", "HTTP")


def qos_class(pod_spec):
    """Guaranteed when every container's limits equal its requests, BestEffort with none at all."""
    cs = pod_spec.get("containers", [])
    res = [c.get("resources") or {} for c in cs]
    if not any(r.get("requests") or r.get("limits") for r in res):
        return "BestEffort"
    if all(r.get("limits") and all(r["limits"].get(k) and r.get("requests", r["limits"]).get(k) == r["limits"][k]
                                   for k in ("cpu", "memory")) for r in res):
        return "Guaranteed"
    return "Burstable"


# Kinds with a pod template and a selector.
WORKLOADS = ("deployments", "replicasets", "statefulsets")


def apply_defaults(res, obj):
    spec = obj.setdefault("spec", {}) if res.name in (
        "deployments", "replicasets", "statefulsets", "pods", "services", "namespaces") else obj.get("spec")
    if res.name in WORKLOADS:
        spec.setdefault("replicas", 1)
        spec.setdefault("selector", {"matchLabels": obj["spec"].get("template", {}).get("metadata", {}).get("labels", {})})
        tmpl = spec.setdefault("template", {})
        tmpl.setdefault("metadata", {})
        default_pod_spec(tmpl.setdefault("spec", {}))
    if res.name == "deployments":
        spec.setdefault("strategy", {"type": "RollingUpdate",
                                     "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}})
        spec.setdefault("revisionHistoryLimit", 10)
        spec.setdefault("progressDeadlineSeconds", 600)
    elif res.name == "statefulsets":
        spec.setdefault("podManagementPolicy", "OrderedReady")
        spec.setdefault("updateStrategy", {"type": "RollingUpdate", "rollingUpdate": {"partition": 0}})
        spec.setdefault("revisionHistoryLimit", 10)
    elif res.name == "pods":
        default_pod_spec(spec)
        obj.setdefault("status", {"phase": "Pending", "qosClass": qos_class(spec)})
    elif res.name == "services":
        spec.setdefault("type", "ClusterIP")
        spec.setdefault("sessionAffinity", "None")
        for p in spec.get("ports", []):
            p.setdefault("protocol", "TCP")
            p.setdefault("targetPort", p.get("port"))
    elif res.name == "namespaces":
        spec.setdefault("finalizers", ["kubernetes"])
        obj.setdefault("status", {"phase": "Active"})
    elif res.name == "secrets":
        obj.setdefault("type", "Opaque")
        for k, v in (obj.pop("stringData", None) or {}).items():
            obj.setdefault("data", {})[k] = base64.b64encode(v.encode()).decode()


def validate(res, obj):
    """The few checks a real apiserver makes that our controller relies on."""
    spec = obj.get("spec") or {}
    pod_spec = spec.get("template", {}).get("spec") if res.name in WORKLOADS else \
        spec if res.name == "pods" else None
    if pod_spec is None:
        return
    prefix = "spec.template.spec" if res.name != "pods" else "spec"
    causes = []
    if not pod_spec.get("containers"):
        causes.append(("FieldValueRequired", "Required value", prefix + ".containers"))
    for i, c in enumerate(pod_spec.get("containers") or []):
        for f in ("name", "image"):
            if not c.get(f):
                causes.append(("FieldValueRequired", "Required value", "%s.containers[%d].%s" % (prefix, i, f)))
    if res.name in WORKLOADS:
        sel = selector_of(spec.get("selector"))
        if not labels_match(sel, spec.get("template", {}).get("metadata", {}).get("labels")):
            causes.append(("FieldValueInvalid", "Invalid value: `selector` does not match template `labels`",
                           "spec.template.metadata.labels"))
    if causes:
        name = obj["metadata"].get("name", "")
        raise ApiError(422, "Invalid", '%s.%s "%s" is invalid: %s' % (
            res.kind, res.group or "core", name, ", ".join("%s: %s" % (f, m) for _, m, f in causes)),
            {"name": name, "group": res.group, "kind": res.kind,
             "causes": [{"reason": r, "message": m, "field": f} for r, m, f in causes]})


def strip_volatile(obj):
    o = copy.deepcopy(obj)
    for k in IGNORED_META:
        o.get("metadata", {}).pop(k, None)
    return o


class Api:
    def __init__(self, store, next_cluster_ip):
        self.store = store
        self.next_cluster_ip = next_cluster_ip
        self.local = threading.local()

    # field validation -------------------------------------------------------------
    def take_warnings(self):
        """The Warning headers this thread's request collected, cleared."""
        out, self.local.warnings = getattr(self.local, "warnings", []), []
        return out

    def check_fields(self, res, obj, q, patch_body=None, patch_type=None):
        """Unknown fields: refused (Strict), warned about (Warn, the default) or dropped (Ignore)."""
        directive = q.get("fieldValidation") or "Warn"
        if directive not in ("Strict", "Warn", "Ignore"):
            raise ApiError(400, "BadRequest", 'fieldValidation: Unsupported value: "%s": supported values: '
                           '"Ignore", "Strict", "Warn"' % directive)
        found = S.unknown_fields(res.key, obj)
        if not found:
            return
        errs = ", ".join('unknown field "%s"' % S.dotted(p) for p, _, _ in found)
        if directive == "Strict":
            strict = "strict decoding error: " + errs
            if patch_type == "strategic":
                # what the apiserver's strategic merge patcher says, Go map formatting and all
                raise ApiError(422, "Invalid", ' "" is invalid: patch: Invalid value: "%s": %s'
                               % (go_value(patch_body), strict),
                               {"causes": [{"reason": "FieldValueInvalid", "field": "patch",
                                            "message": 'Invalid value: "%s": %s' % (go_value(patch_body), strict)}]})
            if patch_type:
                raise ApiError(400, "BadRequest", strict)
            version = (obj.get("apiVersion") or res.api_version()).split("/")[-1]
            raise ApiError(400, "BadRequest", '%s in version "%s" cannot be handled as a %s: %s'
                           % (res.kind, version, res.kind, strict))
        if directive == "Warn":
            self.local.warnings = getattr(self.local, "warnings", []) + \
                ['unknown field "%s"' % S.dotted(p) for p, _, _ in found]
        S.prune(found)

    # reads ---------------------------------------------------------------------
    def get(self, res, ns, name):
        obj = self.store.get(res.key, ns, name)
        if obj is None:
            raise not_found(res, name)
        return obj

    def list(self, res, ns, q):
        """A list as the apiserver serves it (objects shared: callers must not
        modify them). limit/continue pages in etcd key order, every page read at
        the revision of the first (410 Expired once that is compacted); and the
        resourceVersion/resourceVersionMatch rules: unset is the latest, "0" is
        any (the watch cache: limit ignored), N is not older than N, or exactly N
        when paging or asked for (Exact)."""
        rv, match, cont = q.get("resourceVersion") or "", q.get("resourceVersionMatch") or "", q.get("continue")
        limit = int(q.get("limit") or 0)
        if match and match not in ("Exact", "NotOlderThan"):
            raise ApiError(400, "BadRequest", 'resourceVersionMatch: Unsupported value: "%s": supported values: '
                           '"Exact", "NotOlderThan"' % match)
        if match and not rv:
            raise ApiError(400, "BadRequest", "resourceVersionMatch is forbidden unless resourceVersion is provided")
        if match == "Exact" and rv == "0":
            raise ApiError(400, "BadRequest", 'resourceVersionMatch "exact" is forbidden for resourceVersion "0"')
        if cont and (rv or match):
            raise ApiError(400, "BadRequest", "specifying resource version is not allowed when using continue")
        try:
            want = int(rv) if rv else None
        except ValueError:
            raise ApiError(400, "BadRequest", 'invalid resource version "%s"' % rv)
        start = ""
        if cont:
            try:
                tok = json.loads(base64.urlsafe_b64decode(cont + "=" * (-len(cont) % 4)))
                want, start = int(tok["rv"]), str(tok["start"])
                if tok.get("v") != "meta.k8s.io/v1":
                    raise ValueError("unknown version")
            except (ValueError, KeyError, TypeError) as e:
                raise ApiError(400, "BadRequest", "continue key is not valid: %s" % e)
            if want < 0:
                want = None     # an inconsistent continue: the latest objects from the start key on
        elif rv == "0":
            want, limit = None, 0
        elif want is not None and not (limit or match == "Exact"):
            want = None if want <= self.store.rv else want   # not older than: the latest
        if want is not None and want > self.store.rv:
            raise too_large(want, self.store.rv)
        with self.store.lock:
            at = want if want is not None else self.store.rv
            objs = self.store.list_at(res.key, ns, at)
        if objs is None:
            if cont:
                raise ApiError(410, "Expired", EXPIRED_CONTINUE, meta={"continue": continue_token(-1, start)})
            raise ApiError(410, "Expired", "too old resource version: %d (%d)" % (at, self.store.oldest_rv()))
        reqs = parse_label_selector(q.get("labelSelector"))
        fields = q.get("fieldSelector")
        keyed = sorted((key_of(o, ns), o) for o in objs)
        items, last, more = [], None, 0
        for key, o in keyed:
            if key < start or not (labels_match(reqs, o["metadata"].get("labels")) and fields_match(fields, o)):
                continue
            if limit and len(items) == limit:
                more += 1
                continue
            items.append(o)
            last = key
        meta = {"resourceVersion": str(at)}
        if more:
            meta["continue"] = continue_token(at, last + "\x00")
            if not reqs and not fields:
                meta["remainingItemCount"] = more
        return items, meta

    # writes --------------------------------------------------------------------
    def create(self, res, ns, obj, q, manager):
        if not isinstance(obj, dict):
            raise ApiError(400, "BadRequest", "the object provided is unrecognized (must be of type %s)" % res.kind)
        self.check_fields(res, obj, q)
        md = obj.setdefault("metadata", {})
        if res.namespaced:
            if md.get("namespace") and md["namespace"] != ns:
                raise ApiError(400, "BadRequest", "the namespace of the provided object does not "
                               "match the namespace sent on the request")
            md["namespace"] = ns
            if self.store.get("namespaces", "", ns) is None:
                raise ApiError(404, "NotFound", 'namespaces "%s" not found' % ns,
                               {"name": ns, "kind": "namespaces"})
        else:
            md.pop("namespace", None)
        if not md.get("name"):
            if not md.get("generateName"):
                raise ApiError(422, "Invalid", "%s.%s \"\" is invalid: metadata.name: Required value: "
                               "name or generateName is required" % (res.kind, res.group or "core"),
                               {"kind": res.kind, "causes": [{"reason": "FieldValueRequired",
                                                              "message": "Required value", "field": "metadata.name"}]})
            md["name"] = md["generateName"] + _suffix()
        if self.store.get(res.key, ns if res.namespaced else "", md["name"]) is not None:
            raise already_exists(res, md["name"])
        obj["kind"], obj["apiVersion"] = res.kind, res.api_version()
        for k in ("resourceVersion", "uid", "creationTimestamp", "deletionTimestamp", "managedFields"):
            md.pop(k, None)
        if res.generation:
            md["generation"] = 1
        apply_defaults(res, obj)
        validate(res, obj)
        if res.name == "services" and obj["spec"].get("type") != "ExternalName":
            obj["spec"].setdefault("clusterIP", self.next_cluster_ip())
            obj["spec"].setdefault("clusterIPs", [obj["spec"]["clusterIP"]])
        set_owner(obj, manager, "Update", P.leaf_paths(obj), replace=True)
        if q.get("dryRun"):
            md.setdefault("uid", _uid())
            md["creationTimestamp"] = now_iso()
            return obj
        return self.store.put(res.key, obj)

    def commit(self, res, old, new, q, manager, operation="Update", applied=None):
        """Write new over old: generation, ownership, no-op detection, dry run."""
        new["kind"], new["apiVersion"] = res.kind, res.api_version()
        md = new["metadata"]
        for k in ("uid", "creationTimestamp", "namespace", "name"):
            if k in old["metadata"]:
                md[k] = old["metadata"][k]
        apply_defaults(res, new)
        validate(res, new)
        if res.generation:
            md["generation"] = old["metadata"].get("generation", 1)
            if spec_of(new) != spec_of(old):
                md["generation"] += 1
        md["managedFields"] = old["metadata"].get("managedFields", [])
        same_owner = operation != "Apply" or owners_of(old).get(manager) == P.leaf_paths(applied)
        if same_owner and strip_volatile(new) == strip_volatile(old):
            return old
        if operation == "Apply":
            set_owner(new, manager, "Apply", P.leaf_paths(applied), replace=True)
        else:
            changed = {p for p in P.leaf_paths(new) if P.value_at(new, p) != P.value_at(old, p)}
            set_owner(new, manager, "Update", changed)
        if q.get("dryRun"):
            md["resourceVersion"] = old["metadata"]["resourceVersion"]
            return new
        return self.store.put(res.key, new)

    def update(self, res, ns, name, obj, q, manager, subresource=None):
        old = self.get(res, ns, name)
        if not isinstance(obj, dict):
            raise ApiError(400, "BadRequest", "the object provided is unrecognized (must be of type %s)" % res.kind)
        self.check_fields(res, obj, q)
        rv = obj.get("metadata", {}).get("resourceVersion")
        if rv and rv != old["metadata"]["resourceVersion"]:
            raise conflict(res, name)
        if subresource == "status":
            new = copy.deepcopy(old)
            new["status"] = obj.get("status", {})
        else:
            new = copy.deepcopy(obj)
            if "status" in old and res.name not in ("configmaps", "secrets"):
                new["status"] = old["status"]
        return self.commit(res, old, new, q, manager)

    def patch(self, res, ns, name, body, ctype, q, manager, subresource=None):
        if "apply-patch" in ctype:
            return self.apply(res, ns, name, body, q, manager)
        old = self.get(res, ns, name)
        new = self.patched(res, old, body, ctype)
        self.check_fields(res, new, q, json.loads(body or b"null"),
                          "strategic" if "strategic-merge-patch" in ctype else "json")
        rv = new.get("metadata", {}).get("resourceVersion")
        if rv and rv != old["metadata"]["resourceVersion"]:
            raise conflict(res, name)
        if subresource == "status":
            keep = copy.deepcopy(old)
            keep["status"] = new.get("status", {})
            new = keep
        elif "status" in old:
            new["status"] = old["status"]
        return self.commit(res, old, new, q, manager)

    def patched(self, res, old, body, ctype):
        try:
            doc = json.loads(body or b"null")
        except ValueError as e:
            raise ApiError(400, "BadRequest", "error decoding patch: %s" % e)
        if "json-patch" in ctype:
            return P.json_patch(old, doc)
        if "strategic-merge-patch" in ctype:
            if res.custom:
                raise ApiError(415, "UnsupportedMediaType", "the body of the request was in an unknown "
                               "format - accepted media types include: application/json-patch+json, "
                               "application/merge-patch+json, application/apply-patch+yaml")
            return P.strategic_merge(old, doc)
        if "merge-patch" in ctype:
            return P.merge_patch(old, doc)
        raise ApiError(415, "UnsupportedMediaType", "the body of the request was in an unknown format")

    def apply(self, res, ns, name, body, q, manager):
        if not q.get("fieldManager"):
            raise ApiError(422, "Invalid", "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: "
                           "Required value: is required for apply patch")
        try:
            applied = json.loads(body)
        except ValueError:
            raise ApiError(400, "BadRequest", "apply patches must be JSON in this sandbox")
        found = S.unknown_fields(res.key, applied)
        if found:
            # a plain error inside the apiserver: 500 without a reason, "Error from server: ..." in kubectl
            where = "%s/%s; %s, Kind=%s" % (ns if res.namespaced else "", name,
                                            res.api_version() if res.group else "/" + res.version, res.kind)
            lines = ["%s: field not declared in schema" % S.typed(p) for p, _, _ in found]
            raise ApiError(500, "", "failed to create typed patch object (%s): %s" % (
                where, lines[0] if len(lines) == 1 else "errors:\n  " + "\n  ".join(lines)))
        old = self.store.get(res.key, ns if res.namespaced else "", name)
        if old is None:
            obj = self.create(res, ns, copy.deepcopy(applied), q, manager)
            if not q.get("dryRun"):
                set_owner(obj, manager, "Apply", P.leaf_paths(applied), replace=True)
                obj = self.store.put(res.key, obj)
            return obj
        owners = owners_of(old)
        found = P.apply_conflicts(owners, manager, old, applied)
        if found and q.get("force") != "true":
            raise apply_conflict(res, name, found, res.api_version())
        new = P.strategic_merge(old, applied)
        stale = owners.get(manager, set()) - P.leaf_paths(applied)
        others = set().union(*[p for m, p in owners.items() if m != manager] or [set()])
        for path in stale - others:
            delete_path(new, path)
        return self.commit(res, old, new, q, manager, "Apply", applied)

    def delete(self, res, ns, name, q, opts):
        obj = self.get(res, ns, name)
        opts = opts or {}
        if q.get("dryRun") or opts.get("dryRun"):
            return obj
        policy = q.get("propagationPolicy") or opts.get("propagationPolicy") or "Background"
        self.cascade(obj["metadata"]["uid"], policy)
        if res.name == "namespaces":
            for key, n, nm in self.store.keys():
                if n == name:
                    self.store.remove(key, n, nm)
        if res.name == "pods":
            grace = q.get("gracePeriodSeconds", opts.get("gracePeriodSeconds"))
            return self.terminate_pod(obj, None if grace is None else int(grace))
        return self.store.remove(res.key, ns if res.namespaced else "", name)

    def terminate_pod(self, pod, grace=None):
        """A pod on a node is only marked Terminating; the kubelet (our controller)
        removes it once its containers stopped. Unscheduled pods go at once."""
        md = pod["metadata"]
        if grace is None:
            grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
        if not pod["spec"].get("nodeName") or grace == 0:
            return self.store.remove("pods", md["namespace"], md["name"])
        if md.get("deletionTimestamp"):
            return pod
        md["deletionTimestamp"] = now_iso(time.time() + grace)
        md["deletionGracePeriodSeconds"] = grace
        return self.store.put("pods", pod)

    def cascade(self, uid, policy):
        for key, n, nm in self.store.owned_by(uid):
            child = self.store.get(key, n, nm)
            if child is None:
                continue
            if policy == "Orphan":
                child["metadata"]["ownerReferences"] = [
                    r for r in child["metadata"]["ownerReferences"] if r.get("uid") != uid]
                self.store.put(key, child)
            else:
                self.cascade(child["metadata"]["uid"], policy)
                if key == "pods":
                    self.terminate_pod(child)
                else:
                    self.store.remove(key, n, nm)


EXPIRED_CONTINUE = ("The provided continue parameter is too old to display a consistent list result. You can start "
                    "a new list without the continue parameter, or use the continue token in this response to "
                    "retrieve the remainder of the results. Continuing with the provided token results in an "
                    "inconsistent list - objects that were created, modified, or deleted between the time the first "
                    "chunk was returned and now may show up in the list.")


def key_of(obj, ns):
    """An object's etcd key below the list's prefix: NAME in a namespace, else NAMESPACE/NAME."""
    md = obj["metadata"]
    return md["name"] if ns is not None or not md.get("namespace") else md["namespace"] + "/" + md["name"]


def continue_token(rv, start):
    doc = json.dumps({"v": "meta.k8s.io/v1", "rv": rv, "start": start}, separators=(",", ":"))
    return base64.urlsafe_b64encode(doc.encode()).decode().rstrip("=")


def too_large(want, have):
    return ApiError(504, "Timeout", "Too large resource version: %d, current: %d" % (want, have),
                    {"causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}],
                     "retryAfterSeconds": 1}, {"Retry-After": "1"})


def go_value(v):
    """A JSON value as Go's %+v prints it once decoded into interface{}: map[a:1 b:[x y]]."""
    if isinstance(v, dict):
        return "map[" + " ".join("%s:%s" % (k, go_value(v[k])) for k in sorted(v)) + "]"
    if isinstance(v, list):
        return "[" + " ".join(go_value(x) for x in v) + "]"
    if v is None:
        return "<nil>"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and v.is_integer():
        return "%d" % v
    return str(v)


def spec_of(obj):
    return {k: v for k, v in obj.items() if k not in ("metadata", "status", "kind", "apiVersion")}


def owners_of(obj):
    out = {}
    for e in obj["metadata"].get("managedFields", []) or []:
        out.setdefault(e["manager"], set()).update(flatten(e.get("fieldsV1", {})))
    return out


def flatten(tree, prefix=()):
    out = set()
    for k, v in tree.items():
        if k == ".":
            continue
        out |= flatten(v, prefix + (k,)) if v else {prefix + (k,)}
    return out


def set_owner(obj, manager, operation, paths, replace=False):
    md = obj["metadata"]
    entries = [e for e in md.get("managedFields", []) or []]
    mine = next((e for e in entries if e["manager"] == manager and e["operation"] == operation), None)
    have = set() if replace or not mine else flatten(mine.get("fieldsV1", {}))
    for e in entries:
        if e is not mine:
            e["fieldsV1"] = P.fields_v1(flatten(e.get("fieldsV1", {})) - set(paths))
    entries = [e for e in entries if e is not mine and e["fieldsV1"]]
    if paths or have:
        entries.append({"manager": manager, "operation": operation, "apiVersion": obj["apiVersion"],
                        "time": now_iso(), "fieldsType": "FieldsV1",
                        "fieldsV1": P.fields_v1(have | set(paths))})
    md["managedFields"] = entries


def delete_path(obj, path):
    parent = P.value_at(obj, path[:-1])
    last = path[-1]
    if isinstance(parent, dict) and last.startswith("f:"):
        parent.pop(last[2:], None)
    elif isinstance(parent, list):
        item = P.value_at(obj, path)
        if item in parent:
            parent.remove(item)


def apply_conflict(res, name, found, api_version):
    msgs = ['conflict with "%s" using %s: %s' % (m, api_version, P.path_str(p)) for m, p in found]
    text = "Apply failed with %d conflict%s: %s" % (len(found), "" if len(found) == 1 else "s",
                                                    "\n".join(msgs))
    causes = [{"type": "FieldManagerConflict", "message": 'conflict with "%s" using %s' % (m, api_version),
               "field": P.path_str(p)} for m, p in found]
    return ApiError(409, "Conflict", text, {"name": name, "group": res.group, "kind": res.name,
                                            "causes": causes})


_ALPHA = "bcdfghjklmnpqrstvwxz2456789"


def _suffix(n=5):
    import random
    return "".join(random.choice(_ALPHA) for _ in range(n))


def _uid():
    import uuid
    return str(uuid.uuid4())
