#!/usr/bin/python3
"""A Kubernetes API server stand-in for the runbook sandbox.

usage: server.py STATE_DIR PORT   (certificates and tokens are read from STATE_DIR/k8s/)
"""
import json
import os
import random
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, parse_qsl, urlsplit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import resources as R          # noqa: E402
import podexec                 # noqa: E402
import proto                   # noqa: E402
import rbac                    # noqa: E402
import workload as W           # noqa: E402
from api import Api, labels_match, parse_label_selector, fields_match, selector_of  # noqa: E402
from controller import Controller  # noqa: E402
from metrics import Metrics        # noqa: E402
from seed import Seeder         # noqa: E402
from store import ApiError, Store, now_iso  # noqa: E402

VERSION = {"major": "1", "minor": "32", "gitVersion": "v1.32.0", "gitCommit": "sandbox",
           "gitTreeState": "clean", "buildDate": "2024-12-11T00:00:00Z", "goVersion": "go1.23.3",
           "compiler": "gc", "platform": "linux/amd64"}
BOOKMARK_EVERY = 5.0
PUBLIC = ("/version", "/healthz", "/livez", "/readyz")


class Cluster:
    """Everything a request handler needs, built once at start."""

    def __init__(self, state_dir):
        self.state_dir = state_dir
        self.store = Store()
        self.ip = 100
        self.api = Api(self.store, self.next_cluster_ip)
        self.controller = Controller(self.store, state_dir)
        kdir = os.path.join(state_dir, "k8s")
        read = lambda n: open(os.path.join(kdir, n)).read().strip()
        self.users = {read("token"): ("sandbox-admin", ["system:masters", "system:authenticated"]),
                      read("exec-token"): ("sandbox-exec-user", ["system:masters", "system:authenticated"]),
                      read("viewer-token"): ("sandbox-viewer", ["system:authenticated"])}
        self.admin_token = read("admin-token")
        self.requests = {}
        self.json_cache = {}
        self.reseed()
        self.metrics = Metrics(self)

    def encoded(self, res, gv, obj):
        """A stored object as list items carry it, JSON-encoded once per resourceVersion
        and version asked for (stored objects never change in place): a page of 500
        pods is then a join, not an encoding."""
        md = obj["metadata"]
        key = (res.key, md.get("namespace", ""), md["name"], md.get("resourceVersion"), res.api_version(gv))
        data = self.json_cache.get(key)
        if data is None:
            if len(self.json_cache) >= 50000:
                self.json_cache.clear()
            data = json.dumps(dict(obj, apiVersion=key[-1], kind=res.kind), separators=(",", ":")).encode()
            self.json_cache[key] = data
        return data

    def count(self, method, path, q):
        """Requests by kind, for `ctl k8s requests`: "list pods", "get deployments",
        "watch pods", "patch deployments/scale", or the path (discovery)."""
        parts = path.strip("/").split("/")
        rest = parts[2:] if parts[0] == "api" else parts[3:] if parts[0] == "apis" else []
        if rest[:1] == ["namespaces"] and len(rest) >= 3:
            rest = rest[2:]
        if not rest:
            kind = method + " " + path
        else:
            kind = verb_of(method, rest[1] if len(rest) > 1 else None, q) + " " + rest[0] + \
                ("/" + rest[2] if len(rest) > 2 else "")
        with self.store.lock:
            self.requests[kind] = self.requests.get(kind, 0) + 1

    def next_cluster_ip(self):
        self.ip += 1
        return "10.245.%d.%d" % (self.ip // 250, self.ip % 250 + 1)

    def reseed(self):
        with self.store.lock:
            self.store.clear()
            self.controller.reset()
            Seeder(self.store, self.controller, self.state_dir, self.next_cluster_ip).run()
            # Watches from before the reseed must re-list (410 Gone).
            self.store.clear_history()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "sandbox-apiserver/1.32"
    cluster = None
    # TCP_NODELAY on every accepted socket: a reply goes out as two writes (headers, then
    # body), and with Nagle the body waits for the client's delayed ACK of the headers,
    # some 40 ms per request on a kept-alive connection.
    disable_nagle_algorithm = True

    def log_message(self, fmt, *args):
        if os.environ.get("K8S_SANDBOX_VERBOSE"):
            sys.stderr.write("%s %s\n" % (now_iso(), fmt % args))

    # plumbing ----------------------------------------------------------------
    def body(self):
        if getattr(self, "_body", None) is not None:
            return self._body
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline().strip():
                        pass
                    break
                data += self.rfile.read(size)
                self.rfile.readline()
        else:
            n = int(self.headers.get("Content-Length") or 0)
            data = self.rfile.read(n) if n else b""
        self._body = data
        return data

    def send_json(self, code, obj, headers=None, data=None):
        """obj as JSON, or data: JSON already encoded."""
        if data is None:
            data = json.dumps(obj, separators=(",", ":")).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-cache, private")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        for w in self.cluster.api.take_warnings():
            self.send_header("Warning", '299 - "%s"' % w.replace("\\", "\\\\").replace('"', '\\"'))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_raw(self, code, ctype, data):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def start_chunked(self, ctype="application/json"):
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache, private")
        self.end_headers()

    def chunk(self, data):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def end_chunked(self):
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def user(self):
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Bearer ") and auth[7:].strip() in self.cluster.users:
            return self.cluster.users[auth[7:].strip()]
        if auth.startswith("Bearer ") and auth[7:].strip() == self.cluster.admin_token:
            return ("sandbox-ctl", ["system:masters"])
        cert = self.connection.getpeercert() if hasattr(self.connection, "getpeercert") else None
        if cert:
            subject = dict(x[0] for x in cert.get("subject", ()))
            return (subject.get("commonName", "unknown"), [subject.get("organizationName", "system:authenticated")])
        return None

    def do_GET(self):
        self.dispatch()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_GET

    def dispatch(self):
        self._body = None
        self.cluster.api.take_warnings()   # none left from this thread's last request
        url = urlsplit(self.path)
        self.q = dict(parse_qsl(url.query, keep_blank_values=True))
        self.raw_query = url.query
        path = url.path.rstrip("/") or "/"
        try:
            if path.startswith("/_sandbox/"):
                return self.admin(path)
            self.cluster.count(self.command, path, self.q)
            faults = self.cluster.controller.faults
            if faults.api_latency:
                time.sleep(faults.api_latency)
            if self.user() is None and path not in PUBLIC:
                raise ApiError(401, "Unauthorized", "Unauthorized")
            if faults.api_error_rate and random.random() < faults.api_error_rate:
                raise injected_error(faults.api_error_code)
            self.route(path)
        except ApiError as e:
            self.body_if_unread()
            self.send_json(e.code, e.status(), e.headers)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            self.close_connection = True
        except Exception as e:  # a bug in the stand-in: answer like an apiserver, log the traceback
            import traceback
            traceback.print_exc()
            try:
                self.send_json(500, ApiError(500, "InternalError", "Internal error occurred: %s" % e).status())
            except OSError:
                pass

    def body_if_unread(self):
        if self.command in ("POST", "PUT", "PATCH", "DELETE"):
            self.body()

    # routing ------------------------------------------------------------------
    def route(self, path):
        if path in PUBLIC:
            return self.send_json(200, VERSION) if path == "/version" else self.send_raw(200, "text/plain", b"ok")
        if path == "/api":
            return self.send_json(200, {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
                {"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1:%d" % self.server.server_port}]})
        if path == "/apis":
            return self.send_json(200, R.group_list())
        if path.startswith("/openapi/"):
            return self.openapi(path)
        parts = path.strip("/").split("/")
        if parts[0] == "api" and len(parts) >= 2:
            group, version, rest = "", parts[1], parts[2:]
        elif parts[0] == "apis" and len(parts) >= 3:
            group, version, rest = parts[1], parts[2], parts[3:]
        elif parts[0] == "apis" and len(parts) == 2:
            vs = dict(R.GROUPS).get(parts[1])
            if not vs:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            versions = [{"groupVersion": parts[1] + "/" + v, "version": v} for v in vs]
            return self.send_json(200, {"kind": "APIGroup", "apiVersion": "v1", "name": parts[1],
                                        "versions": versions, "preferredVersion": versions[0]})
        else:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if not rest:
            if (group and version not in dict(R.GROUPS).get(group, [])) or (not group and version != "v1"):
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            return self.send_json(200, R.api_resource_list(group, version))
        self.resource(group, version, rest)

    def resource(self, group, version, rest):
        ns = None
        if rest[0] == "namespaces" and len(rest) >= 3 and rest[2] not in ("status", "finalize"):
            ns, rest = rest[1], rest[2:]
        res = R.lookup(group, version, rest[0])
        if res is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else None
        self.gv = version
        self.authorize(res, ns, name, sub)
        if res.virtual:
            return self.virtual(res, ns, name)
        if sub in ("log", "proxy", "exec"):
            return getattr(self, "sub_" + sub)(res, ns, name, "/".join(rest[3:]))
        if sub and sub not in res.subs:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        handle = (lambda: getattr(self, "sub_" + sub)(res, ns, name, "")) if sub in ("eviction", "scale", "token") else \
            (lambda: self.verb(res, ns or "", name, sub))
        if self.command in ("GET", "HEAD"):
            return handle()
        # A write reads, changes and stores: no controller tick may come in between.
        self.body()
        with self.cluster.store.lock:
            handle()

    def authorize(self, res, ns, name, sub):
        """Service accounts get what their Roles and ClusterRoles grant (rbac.py);
        other users: system:masters may do anything, everyone else only get,
        list and watch (the `viewer` context). Refused as the apiserver words it."""
        user, groups = self.user() or ("system:anonymous", [])
        # Connecting to a pod's processes is a create on pods/exec, whatever the method.
        verb = "create" if sub in ("exec", "attach") else verb_of(self.command, name, self.q)
        if user.startswith("system:serviceaccount:"):
            # Everyone may ask who they are and what they may do (system:basic-user); a
            # namespace is in its own namespace, so a Role there may grant reading it.
            if res.group in ("authentication.k8s.io", "authorization.k8s.io"):
                return
            resource = res.name + ("/" + sub if sub else "")
            where = name if res.name == "namespaces" else ns
            if rbac.allows(self.cluster.store, user, groups, verb, res.group, resource, where, name):
                return
        elif "system:masters" in groups or verb in ("get", "list", "watch"):
            return
        qualified = res.name + ("." + res.group if res.group else "")
        msg = '%s is forbidden: User "%s" cannot %s resource "%s" in API group "%s"' % (
            '%s "%s"' % (qualified, name) if name else qualified, user, verb,
            res.name + ("/" + sub if sub else ""), res.group)
        if ns:
            msg += ' in the namespace "%s"' % ns
        details = {"group": res.group, "kind": res.name}
        if name:
            details["name"] = name
        raise ApiError(403, "Forbidden", msg, details)

    def verb(self, res, ns, name, sub):
        api, m, q = self.cluster.api, self.command, self.q
        if verb_of(m, name, q) not in res.verbs:
            raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource",
                           {})
        manager = q.get("fieldManager") or self.headers.get("User-Agent", "unknown").split("/")[0]
        if m in ("GET", "HEAD") and name:
            return self.reply(res, api.get(res, ns, name))
        if m == "GET" and q.get("watch") in ("1", "true"):
            return self.watch(res, ns or None)
        if m == "GET":
            return self.reply_list(res, ns or None)
        if m == "POST" and not name:
            obj = self.json_body()
            out = api.create(res, ns, obj, q, manager)
            return self.reply(res, out, 201)
        if m == "PUT" and name:
            return self.reply(res, api.update(res, ns, name, self.json_body(), q, manager, sub))
        if m == "PATCH" and name:
            body = self.body()
            ctype = self.headers.get("Content-Type", "")
            out = api.patch(res, ns, name, body, ctype, q, manager, sub)
            return self.reply(res, out)
        if m == "DELETE" and name:
            body = self.body()
            opts = self.json_body() if body.strip() else {}
            out = api.delete(res, ns, name, q, opts)
            if res.name in ("pods", "namespaces"):
                return self.reply(res, out)
            # Most resources answer a delete with a Status, as the apiserver's generic registry does.
            md = out["metadata"]
            return self.send_json(200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                                        "details": {"name": md["name"], "group": res.group, "kind": res.name,
                                                    "uid": md.get("uid")}})
        if m == "DELETE":
            items, _ = api.list(res, ns or None, q)
            for o in items:
                api.delete(res, o["metadata"].get("namespace", ""), o["metadata"]["name"], q, {})
            return self.send_json(200, {"kind": res.kind + "List", "apiVersion": res.api_version(self.gv),
                                        "metadata": {"resourceVersion": str(self.cluster.store.rv)}, "items": items})
        raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")

    def json_body(self):
        data = self.body()
        if "protobuf" in self.headers.get("Content-Type", ""):
            return proto.decode_object(data)
        try:
            return json.loads(data)
        except ValueError as e:
            raise ApiError(400, "BadRequest", "the object provided is unrecognized (must be JSON): %s" % e)

    # responses -----------------------------------------------------------------
    def as_version(self, res, obj):
        obj["apiVersion"] = res.api_version(self.gv)
        obj["kind"] = res.kind
        return obj

    def wants_table(self):
        return "as=Table" in self.headers.get("Accept", "")

    def reply(self, res, obj, code=200):
        obj = self.as_version(res, obj)
        if self.wants_table() and self.command == "GET":
            return self.send_json(code, self.table(res, [obj], {"resourceVersion": obj["metadata"].get("resourceVersion", "")}))
        self.send_json(code, obj)

    def reply_list(self, res, ns):
        items, meta = self.cluster.api.list(res, ns, self.q)
        if self.wants_table():
            items = [self.as_version(res, dict(o)) for o in items]
            return self.send_json(200, self.table(res, items, meta))
        head = json.dumps({"kind": res.kind + "List", "apiVersion": res.api_version(self.gv), "metadata": meta},
                          separators=(",", ":")).encode()
        body = b",".join(self.cluster.encoded(res, self.gv, o) for o in items)
        self.send_json(200, None, data=head[:-1] + b',"items":[' + body + b"]}")

    def table(self, res, objs, meta, columns=None):
        columns = columns or res.columns
        cols = [{"name": n, "type": t, "format": "name" if n == "Name" else "", "description": d, "priority": p}
                for n, t, p, _, d in columns]
        full = self.q.get("includeObject") == "Object"
        rows = [{"cells": [fn(o) for _, _, _, fn, _ in columns],
                 "object": o if full else {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                                           "metadata": o["metadata"]}} for o in objs]
        return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": meta,
                "columnDefinitions": cols, "rows": rows}

    # watch ---------------------------------------------------------------------
    def watch(self, res, ns):
        store, q = self.cluster.store, self.q
        reqs = parse_label_selector(q.get("labelSelector"))
        match = lambda o: (ns is None or o["metadata"].get("namespace") == ns) and \
            labels_match(reqs, o["metadata"].get("labels")) and fields_match(q.get("fieldSelector"), o)
        rv = q.get("resourceVersion") or "0"
        timeout = min(float(q.get("timeoutSeconds") or 1800), 3600)
        bookmarks = q.get("allowWatchBookmarks") in ("true", "1")
        self.start_chunked()
        with store.lock:
            if rv == "0":
                pos = store.rv
                initial = [o for o in store.list(res.key, ns) if match(o)]
            else:
                pos, initial = int(rv), []
        for o in initial:
            self.send_event("ADDED", res, o)
        deadline = time.time() + timeout
        mark = next_bookmark(time.time(), deadline) if bookmarks else None
        while time.time() < deadline:
            with store.cond:
                if store.rv <= pos:
                    store.cond.wait(max(0.0, min(1.0, deadline - time.time(),
                                                 mark - time.time() if mark else 1.0)))
                evs = store.events_after(pos)
                pos_now = store.rv
            if evs is None:
                self.send_line({"type": "ERROR", "object": ApiError(
                    410, "Expired", "too old resource version: %s (%d)" % (pos, store.oldest_rv())).status()})
                break
            for erv, kind, key, obj, _ in evs:
                if key == res.key and match(obj):
                    self.send_event(kind, res, obj)
            pos = max(pos, pos_now)
            if mark and time.time() >= mark:
                self.send_line({"type": "BOOKMARK", "object": {"kind": res.kind, "apiVersion": res.api_version(self.gv),
                                                               "metadata": {"resourceVersion": str(pos)}}})
                mark = next_bookmark(time.time(), deadline)
        self.end_chunked()

    def send_event(self, kind, res, obj):
        import copy
        obj = self.as_version(res, copy.deepcopy(obj))
        if self.wants_table():
            obj = self.table(res, [obj], {"resourceVersion": obj["metadata"]["resourceVersion"]})
        self.send_line({"type": kind, "object": obj})

    def send_line(self, ev):
        self.chunk(json.dumps(ev, separators=(",", ":")).encode() + b"\n")

    # subresources ----------------------------------------------------------------
    def sub_scale(self, res, ns, name, _):
        api, store = self.cluster.api, self.cluster.store
        obj = api.get(res, ns, name)
        if self.command == "GET":
            if self.wants_table():
                scale = scale_of(obj)
                return self.send_json(200, self.table(res, [scale], {"resourceVersion": scale["metadata"]["resourceVersion"]},
                                                      R.SCALE_COLUMNS))
            return self.send_json(200, scale_of(obj))
        if self.command == "PUT":
            scale = self.json_body()
            rv = scale.get("metadata", {}).get("resourceVersion")
            if rv and rv != obj["metadata"]["resourceVersion"]:
                from store import conflict
                raise conflict(res, name)
        elif self.command == "PATCH":
            body = self.body()
            scale = api.patched(res, scale_of(obj), body, self.headers.get("Content-Type", ""))
        else:
            raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
        new = json.loads(json.dumps(obj))
        new["spec"]["replicas"] = int(scale.get("spec", {}).get("replicas", 0))
        out = api.commit(res, obj, new, self.q, self.q.get("fieldManager") or "kubectl-scale")
        self.send_json(200, scale_of(out))

    def sub_log(self, res, ns, name, _):
        pod = self.cluster.api.get(res, ns, name)
        containers = [c["name"] for c in pod["spec"]["containers"]]
        cname = self.q.get("container")
        if not cname:
            if len(containers) > 1:
                raise ApiError(400, "BadRequest", "a container name must be specified for pod %s, choose one of: [%s]"
                               % (name, " ".join(containers)))
            cname = containers[0]
        if cname not in containers:
            raise ApiError(400, "BadRequest", "container %s is not valid for pod %s" % (cname, name))
        previous = self.q.get("previous") in ("true", "1")
        lines = W.container_logs(pod, cname, previous, time.time())
        if lines is None:
            if previous:
                raise ApiError(400, "BadRequest", 'previous terminated container "%s" in pod "%s" not found' % (cname, name))
            raise ApiError(400, "BadRequest", 'container "%s" in pod "%s" is waiting to start: ContainerCreating' % (cname, name))
        data = self.format_logs(lines)
        if self.q.get("follow") not in ("true", "1") or previous:
            return self.send_raw(200, "text/plain", data)
        self.follow_logs(res, ns, name, cname, data, lines[-1][0] if lines else 0)

    def format_logs(self, lines, since_ok=True):
        q = self.q
        if q.get("sinceSeconds"):
            cutoff = time.time() - int(q["sinceSeconds"])
            lines = [l for l in lines if l[0] >= cutoff]
        elif q.get("sinceTime"):
            from store import parse_iso
            cutoff = parse_iso(q["sinceTime"])
            lines = [l for l in lines if l[0] >= cutoff]
        if q.get("tailLines"):
            n = int(q["tailLines"])
            lines = lines[-n:] if n > 0 else []
        data = self.log_text(lines)
        if q.get("limitBytes"):
            data = data[:int(q["limitBytes"])]
        return data

    def log_text(self, lines):
        stamp = self.q.get("timestamps") in ("true", "1")
        return "".join(("%s " % now_iso(t).replace("Z", ".000000000Z") if stamp else "") + l + "\n" for t, l in lines).encode()

    def follow_logs(self, res, ns, name, cname, data, last):
        self.start_chunked("text/plain")
        if data:
            self.chunk(data)
        while True:
            time.sleep(1)
            pod = self.cluster.store.get("pods", ns, name)
            if pod is None:
                break
            lines = [l for l in (W.container_logs(pod, cname, False, time.time()) or []) if l[0] > last]
            if lines:
                self.chunk(self.log_text(lines))
                last = lines[-1][0]
        self.end_chunked()

    def sub_proxy(self, res, ns, name, rest):
        name = name.split(":")[1] if name.count(":") == 2 else name.split(":")[0]
        store = self.cluster.store
        if res.name == "pods":
            pod = self.cluster.api.get(res, ns, name)
            pods = [pod] if self.cluster.controller.pod_is_ready(pod) else []
            why = 'pod "%s" is not ready' % name
        elif res.name == "services":
            svc = self.cluster.api.get(res, ns, name)
            sel = [(k, "=", v) for k, v in (svc["spec"].get("selector") or {}).items()]
            pods = [p for p in store.list("pods", ns) if sel and labels_match(sel, p["metadata"].get("labels"))
                    and self.cluster.controller.pod_is_ready(p)]
            why = 'no endpoints available for service "%s"' % name
        else:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if not pods:
            raise ApiError(503, "ServiceUnavailable", why)
        app = pods[0]["metadata"].get("labels", {}).get("app.kubernetes.io/component")
        port = W.app_port(self.cluster.state_dir, app)
        if not port:
            raise ApiError(503, "ServiceUnavailable", why)
        body = self.body()
        path = "/" + rest + ("?" + self.raw_query if self.raw_query else "")
        try:
            code, ctype, data = W.forward(port, self.command, path, body, dict(self.headers))
        except OSError as e:
            raise ApiError(503, "ServiceUnavailable", "error trying to reach service: %s" % e)
        self.send_raw(code, ctype, data)

    def sub_eviction(self, res, ns, name, _):
        self.json_body()
        self.cluster.api.delete(res, ns, name, self.q, {})
        self.send_json(201, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201})

    def sub_token(self, res, ns, name, _):
        """TokenRequest (kubectl create token): a token for the service account."""
        if self.command != "POST":
            raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
        self.cluster.api.get(res, ns, name)
        spec = self.json_body().get("spec") or {}
        token = "%048x" % random.getrandbits(192)
        self.cluster.users[token] = ("system:serviceaccount:%s:%s" % (ns, name),
                                     ["system:serviceaccounts", "system:serviceaccounts:" + ns, "system:authenticated"])
        seconds = int(spec.get("expirationSeconds") or 3600)
        expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + seconds))
        self.send_json(201, {"kind": "TokenRequest", "apiVersion": "authentication.k8s.io/v1",
                             "metadata": {"name": name, "namespace": ns, "creationTimestamp": None},
                             "spec": dict(spec, expirationSeconds=seconds),
                             "status": {"token": token, "expirationTimestamp": expires}})

    def sub_exec(self, res, ns, name, _):
        if self.command not in ("GET", "POST"):
            raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
        self.q_multi = parse_qs(self.raw_query, keep_blank_values=True)
        podexec.serve(self, self.cluster.api.get(res, ns, name), self.cluster.state_dir, self.cluster.store,
                      self.cluster.controller.faults.exec_protocols or podexec.PROTOCOLS)

    def virtual(self, res, ns, name):
        store = self.cluster.store
        if res.name == "selfsubjectreviews":
            self.json_body()
            user, groups = self.user()
            return self.send_json(201, {"kind": "SelfSubjectReview", "apiVersion": "authentication.k8s.io/v1",
                                        "metadata": {"creationTimestamp": None},
                                        "status": {"userInfo": {"username": user, "groups": groups}}})
        if res.name == "selfsubjectaccessreviews":
            body = self.json_body()
            body["status"] = {"allowed": True, "reason": "sandbox: every authenticated user is an administrator"}
            return self.send_json(201, body)
        av = res.api_version(self.gv)
        if res.name == "pods":
            pods = [p for p in store.list("pods", ns) if p["spec"].get("nodeName")]
            reqs = parse_label_selector(self.q.get("labelSelector"))
            items = [W.pod_metrics(p, av) for p in pods if labels_match(reqs, p["metadata"].get("labels"))
                     and any("running" in c.get("state", {}) for c in p.get("status", {}).get("containerStatuses", []))]
        else:
            pods = store.list("pods")
            items = [W.node_metrics(n, pods, av) for n in store.list("nodes")]
        if name:
            found = [i for i in items if i["metadata"]["name"] == name]
            if not found:
                raise ApiError(404, "NotFound", '%s.%s "%s" not found' % (res.name, res.group, name))
            return self.send_json(200, found[0])
        self.send_json(200, {"kind": res.kind + "List", "apiVersion": av, "metadata": {}, "items": items})

    def openapi(self, path):
        if path == "/openapi/v3":
            return self.send_json(200, R.openapi_index())
        parts = path.split("/")[3:]
        if parts[:1] == ["api"] and parts[1:] == ["v1"]:
            return self.send_json(200, R.openapi_group("", "v1"))
        if parts[:1] == ["apis"] and len(parts) == 3:
            return self.send_json(200, R.openapi_group(parts[1], parts[2]))
        raise ApiError(404, "NotFound", "the server could not find the requested resource")

    # sandbox control --------------------------------------------------------------
    def admin(self, path):
        if self.headers.get("Authorization", "") != "Bearer " + self.cluster.admin_token:
            raise ApiError(401, "Unauthorized", "Unauthorized")
        import faults
        body = self.json_body() if self.command == "POST" else {}
        code, out = faults.run(self.cluster, path[len("/_sandbox/"):], body.get("args", []))
        self.send_json(code, out)


def next_bookmark(now, deadline):
    """When the next BOOKMARK goes out, as the apiserver's watch cache decides: every
    BOOKMARK_EVERY seconds (a minute there, compressed here) and once 2 s before the watch
    times out, then no more; None when there is none to come."""
    at = min(now + BOOKMARK_EVERY, deadline - 2)
    return at if at >= now else None


def verb_of(method, name, q):
    """The RBAC verb of a request, as the apiserver's request info resolver names it."""
    if method in ("GET", "HEAD"):
        return "watch" if q.get("watch") in ("1", "true") else "get" if name else "list"
    if method == "DELETE":
        return "delete" if name else "deletecollection"
    return {"POST": "create", "PUT": "update", "PATCH": "patch"}.get(method, method.lower())


def injected_error(code):
    reasons = {429: ("TooManyRequests", "the server has received too many requests and has asked us to try again later"),
               500: ("InternalError", "Internal error occurred: injected by the sandbox (api-errors)"),
               503: ("ServiceUnavailable", "the server is currently unable to handle the request"),
               504: ("Timeout", "the server was unable to return a response in the time allotted")}
    reason, msg = reasons.get(code, reasons[500])
    return ApiError(code, reason, msg, {"retryAfterSeconds": 1} if code == 429 else None,
                    {"Retry-After": "1"} if code in (429, 503) else None)


def scale_of(obj):
    md = obj["metadata"]
    return {"kind": "Scale", "apiVersion": "autoscaling/v1",
            "metadata": {k: md[k] for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp") if k in md},
            "spec": {"replicas": obj["spec"].get("replicas", 1)},
            "status": {"replicas": obj.get("status", {}).get("replicas", 0),
                       "selector": ",".join("%s=%s" % kv for kv in sorted(obj["spec"]["selector"].get("matchLabels", {}).items()))}}


def main():
    state_dir, port = os.path.abspath(sys.argv[1]), int(sys.argv[2])
    kdir = os.path.join(state_dir, "k8s")
    Handler.cluster = cluster = Cluster(state_dir)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(os.path.join(kdir, "server.crt"), os.path.join(kdir, "server.key"))
    ctx.load_verify_locations(os.path.join(kdir, "ca.crt"))
    ctx.verify_mode = ssl.CERT_OPTIONAL
    httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    httpd.daemon_threads = True
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True, do_handshake_on_connect=False)
    threading.Thread(target=cluster.controller.run, daemon=True).start()
    cluster.metrics.start()
    print("k8s stand-in listening on https://127.0.0.1:%d" % port, flush=True)
    httpd.serve_forever()


if __name__ == "__main__":
    main()
