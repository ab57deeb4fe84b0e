"""In-memory object store: one global resourceVersion, an event log for watches.

Objects are keyed by (resource key, namespace, name); a resource key is
"deployments.apps" or "pods" for the core group. Every write bumps the global
resourceVersion and appends to a bounded event log; watchers wait on `cond`,
and paged lists read past revisions from it.
"""
import collections
import json
import datetime
import threading
import uuid

HISTORY = 10000   # events kept: the apiserver's etcd keeps about 5 minutes of revisions


def now_iso(t=None):
    t = datetime.datetime.now(datetime.timezone.utc) if t is None else \
        datetime.datetime.fromtimestamp(t, datetime.timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(s):
    if not s:
        return None
    s = s.replace("Z", "+00:00")
    if "." in s:
        head, tail = s.split(".", 1)
        s = head + tail[tail.index("+"):] if "+" in tail else head
    return datetime.datetime.fromisoformat(s).timestamp()


class ApiError(Exception):
    """A failure that becomes a Status object on the wire."""

    def __init__(self, code, reason, message, details=None, headers=None, meta=None):
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message
        self.details = details
        self.headers = headers or {}
        self.meta = meta or {}   # the Status's ListMeta (an expired list's inconsistent continue)

    def status(self):
        st = {"kind": "Status", "apiVersion": "v1", "metadata": dict(self.meta),
              "status": "Failure", "message": self.message,
              "reason": self.reason, "code": self.code}
        if not self.reason:
            del st["reason"]   # StatusReasonUnknown
        if self.details:
            st["details"] = self.details
        return st


def not_found(res, name):
    return ApiError(404, "NotFound", '%s "%s" not found' % (res.qualified, name),
                    {"name": name, "group": res.group, "kind": res.name})


def already_exists(res, name):
    return ApiError(409, "AlreadyExists", '%s "%s" already exists' % (res.qualified, name),
                    {"name": name, "group": res.group, "kind": res.name})


def conflict(res, name):
    return ApiError(409, "Conflict",
                    'Operation cannot be fulfilled on %s "%s": the object has been modified; '
                    'please apply your changes to the latest version and try again'
                    % (res.qualified, name),
                    {"name": name, "group": res.group, "kind": res.name})


class Store:
    """Objects by resource key, then (namespace, name). Readers get deep copies
    unless they ask for `shared` references, which they must not modify (the
    controller reads everything several times a second and copies only what
    it changes)."""

    def __init__(self):
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        self.objects = collections.defaultdict(dict)
        self.rv = 100
        self.log = collections.deque(maxlen=HISTORY)
        self.floor = self.rv     # watches from before this resourceVersion get 410 Gone

    def get(self, key, ns, name):
        with self.lock:
            obj = self.objects[key].get((ns or "", name))
            return clone(obj) if obj is not None else None

    def list(self, key, ns=None, shared=False):
        with self.lock:
            items = [o if shared else clone(o) for (n, _), o in self.objects[key].items()
                     if ns is None or n == ns]
        items.sort(key=lambda o: (o["metadata"].get("namespace", ""), o["metadata"]["name"]))
        return items

    def list_at(self, key, ns, rv):
        """The objects (shared) as they were at resourceVersion rv, in key order
        (namespace, name), as etcd reads a revision; None when rv is older than
        the history kept (compacted)."""
        with self.lock:
            if rv < self.floor or rv > self.rv:
                return None
            now = {ident: o for ident, o in self.objects[key].items() if ns is None or ident[0] == ns}
            for erv, kind, k, obj, prev in reversed(self.log):
                if erv <= rv:
                    break
                md = obj["metadata"]
                ident = (md.get("namespace", ""), md["name"])
                if k != key or (ns is not None and ident[0] != ns):
                    continue
                if prev is None:
                    now.pop(ident, None)
                else:
                    now[ident] = prev
        return [now[ident] for ident in sorted(now)]

    def keys(self):
        with self.lock:
            return [(k, n, nm) for k, objs in self.objects.items() for (n, nm) in objs]

    def put(self, key, obj, give=False):
        """Store obj (ADDED or MODIFIED), stamping a fresh resourceVersion. With
        give, the store keeps obj itself (the caller must not touch it again)
        and returns it shared, saving two copies."""
        with self.lock:
            md = obj["metadata"]
            ident = (md.get("namespace", ""), md["name"])
            prev = self.objects[key].get(ident)
            kind = "MODIFIED" if prev is not None else "ADDED"
            md.setdefault("uid", str(uuid.uuid4()))
            md.setdefault("creationTimestamp", now_iso())
            self.rv += 1
            md["resourceVersion"] = str(self.rv)
            stored = obj if give else clone(obj)
            self.objects[key][ident] = stored
            self._record(kind, key, stored, prev)
            return obj if give else clone(obj)

    def remove(self, key, ns, name):
        with self.lock:
            prev = self.objects[key].pop((ns or "", name), None)
            if prev is None:
                return None
            self.rv += 1
            obj = dict(prev, metadata=dict(prev["metadata"], resourceVersion=str(self.rv)))
            self._record("DELETED", key, obj, prev)
            return clone(obj)

    def clear(self):
        """Drop every object and the watch history."""
        with self.lock:
            self.objects.clear()
        self.clear_history()

    def clear_history(self):
        with self.lock:
            self.log.clear()
            self.floor = self.rv
            self.cond.notify_all()

    def _record(self, kind, key, obj, prev):
        # Stored objects are never modified in place, so the log can share them;
        # prev (the object before the write, None for ADDED) lets a paged list
        # read the revision its first page was served at (list_at).
        if len(self.log) == self.log.maxlen:
            self.floor = self.log[0][0]
        self.log.append((self.rv, kind, key, obj, prev if kind != "ADDED" else None))
        self.cond.notify_all()

    def oldest_rv(self):
        with self.lock:
            return self.floor

    def events_after(self, rv):
        """Events with resourceVersion > rv, or None when rv is too old."""
        with self.lock:
            if rv < self.floor:
                return None
            out = []
            for e in reversed(self.log):
                if e[0] <= rv:
                    break
                out.append(e)
            out.reverse()
            return out

    def owned_by(self, uid):
        with self.lock:
            return [(k, o["metadata"].get("namespace", ""), o["metadata"]["name"])
                    for k, objs in self.objects.items() for o in objs.values()
                    if any(r.get("uid") == uid for r in o["metadata"].get("ownerReferences", []))]


def clone(obj):
    """A deep copy of a JSON value, several times faster than copy.deepcopy."""
    return json.loads(json.dumps(obj))
