"""In-memory object store: one global resourceVersion, an event log for watches.

Objects are keyed by (resource key, namespace, name); a resource key is
"deployments.apps" or "pods" for the core group. Every write bumps the global
resourceVersion and appends to a bounded event log; watchers wait on `cond`.
"""
import collections
import json
import datetime
import threading
import uuid

HISTORY = 1000


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

    def __init__(self, code, reason, message, details=None, headers=None):
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message
        self.details = details
        self.headers = headers or {}

    def status(self):
        st = {"kind": "Status", "apiVersion": "v1", "metadata": {},
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

    def keys(self):
        with self.lock:
            return [(k, n, nm) for k, objs in self.objects.items() for (n, nm) in objs]

    def put(self, key, obj):
        """Store obj (ADDED or MODIFIED), stamping a fresh resourceVersion."""
        with self.lock:
            md = obj["metadata"]
            ident = (md.get("namespace", ""), md["name"])
            kind = "MODIFIED" if ident in self.objects[key] else "ADDED"
            md.setdefault("uid", str(uuid.uuid4()))
            md.setdefault("creationTimestamp", now_iso())
            self.rv += 1
            md["resourceVersion"] = str(self.rv)
            stored = clone(obj)
            self.objects[key][ident] = stored
            self._record(kind, key, stored)
            return clone(obj)

    def remove(self, key, ns, name):
        with self.lock:
            obj = self.objects[key].pop((ns or "", name), None)
            if obj is None:
                return None
            self.rv += 1
            obj["metadata"]["resourceVersion"] = str(self.rv)
            self._record("DELETED", key, obj)
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

    def _record(self, kind, key, obj):
        # Stored objects are never modified in place, so the log can share them.
        if len(self.log) == self.log.maxlen:
            self.floor = self.log[0][0]
        self.log.append((self.rv, kind, key, obj))
        self.cond.notify_all()

    def oldest_rv(self):
        with self.lock:
            return self.floor

    def events_after(self, rv):
        """Events with resourceVersion > rv, or None when rv is too old."""
        with self.lock:
            if rv < self.floor:
                return None
            return [e for e in self.log if e[0] > rv]

    def owned_by(self, uid):
        with self.lock:
            return [(k, o["metadata"].get("namespace", ""), o["metadata"]["name"])
                    for k, objs in self.objects.items() for o in objs.values()
                    if any(r.get("uid") == uid for r in o["metadata"].get("ownerReferences", []))]


def clone(obj):
    """A deep copy of a JSON value, several times faster than copy.deepcopy."""
    return json.loads(json.dumps(obj))
