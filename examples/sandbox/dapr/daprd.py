#!/usr/bin/python3
"""Dapr sidecar stand-in for the sandbox (Python 3 standard library only).

    daprd.py STATE_DIR

One process serves every app: for each app id it runs one sidecar HTTP server
(the Dapr API, as a real daprd next to that app would) and one small "app"
server (GET /health; the websocket app also GET /ws, a WebSocket echo, and GET
/stats, its counts of connections and messages), each on its own free loopback
port. One server per app
id rather than one routing by app id, because that is what clients see in
Kubernetes: each app talks to its own sidecar at DAPR_HTTP_ENDPOINT and the
sidecar knows its app id without being told.

Backends are real: state lives in the sandbox's Redis in Dapr's layout
(HASH `<appid>||<key>` with fields data and version, version being the ETag),
publish produces a CloudEvent to the sandbox's Kafka through the Kafka
program's control socket. Writes STATE_DIR/apps.json, STATE_DIR/ports/dapr
(the backend sidecar's port) and, last, STATE_DIR/dapr.json once every
server listens. A sidecar reports unhealthy while the file
STATE_DIR/dapr/unhealthy/<appid> exists (see `ctl dapr unhealthy`); an app
refuses WebSocket upgrades with 503 while STATE_DIR/dapr/ws-refused/<appid>
exists (`ctl dapr ws-refuse`; `ctl dapr ws-stuck` writes "until-restart" in it,
and the Kubernetes stand-in removes it once the app's pods are replaced), and
its /stats counts the connections in STATE_DIR/dapr/ws-load/<appid> as open too
(`ctl dapr ws-load`).
"""

import base64
import http.client
import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "k8s"))
from podexec import upgrade  # noqa: E402  (the Kubernetes stand-in's WebSocket framing)

RUNTIME_VERSION = "1.12.0"
STATE_STORE = "statestore"
PUBSUB = "kafka-pubsub"
SECRET_STORE = "local-secret-store"

# Seed 000's topic table: who consumes what.
SUBSCRIPTIONS = {
    "backend": [],
    "frontend": [],
    "websocket": ["task-events", "task-updates"],
    "recurring-task": ["task-events"],
    "notification": ["reminders"],
}
DEAD_LETTER = {"reminders": "reminders-dlq"}

STATE_DIR = ""
apps = {}  # app id -> {"port": app port, "sidecar": sidecar port}


def read_state(*parts):
    with open(os.path.join(STATE_DIR, *parts)) as f:
        return f.read().strip()


def write_json_atomically(name, doc):
    path = os.path.join(STATE_DIR, name)
    with open(path + ".tmp", "w") as f:
        json.dump(doc, f, indent=2)
    os.replace(path + ".tmp", path)


# ---- Redis, spoken directly (RESP is a few lines) ----

class RedisError(Exception):
    pass


class Redis:
    """One connection per thread, reconnecting after failures."""

    def __init__(self):
        self.local = threading.local()

    def _connect(self):
        port = int(read_state("ports", "redis"))
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.local.file = sock.makefile("rwb")
        self.local.sock = sock
        self._send("AUTH", read_state("secrets", "redis"))

    def _send(self, *args):
        f = self.local.file
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            b = a if isinstance(a, bytes) else str(a).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(b), b))
        f.write(b"".join(out))
        f.flush()
        return self._reply()

    def _reply(self):
        line = self.local.file.readline()
        if not line:
            raise ConnectionError("redis closed the connection")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RedisError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self.local.file.read(n + 2)[:-2]
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._reply() for _ in range(n)]
        raise ConnectionError("unexpected reply from redis: %r" % line)

    def call(self, *args):
        for attempt in (1, 2):
            try:
                if getattr(self.local, "file", None) is None:
                    self._connect()
                return self._send(*args)
            except (OSError, ConnectionError):
                self.local.file = None
                if attempt == 2:
                    raise


redis = Redis()

# Checks every ETag first, then applies every operation, inside one script so
# a transaction is all-or-nothing and a check cannot race a write.
# ARGV per key: operation, value, etag ("" = none), first-write ("1"/"0"), ttl.
STATE_SCRIPT = """
for i, key in ipairs(KEYS) do
  local b = (i - 1) * 5
  local etag, first = ARGV[b + 3], ARGV[b + 4]
  local version = redis.call('HGET', key, 'version')
  if etag ~= '' then
    if not version or version ~= etag then return redis.error_reply('ETAGMISMATCH ' .. key) end
  elseif first == '1' and version and ARGV[b + 1] == 'upsert' then
    return redis.error_reply('ETAGMISMATCH ' .. key)
  end
end
for i, key in ipairs(KEYS) do
  local b = (i - 1) * 5
  if ARGV[b + 1] == 'delete' then
    redis.call('DEL', key)
  else
    redis.call('HSET', key, 'data', ARGV[b + 2])
    redis.call('HINCRBY', key, 'version', 1)
    if ARGV[b + 5] ~= '' then redis.call('EXPIRE', key, ARGV[b + 5]) end
  end
end
return #KEYS
"""


class ApiError(Exception):
    def __init__(self, status, code, message):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def state_ops(app_id, ops, err_code):
    """Applies [(operation, key, value_bytes, etag, options, metadata)] atomically."""
    keys, argv = [], []
    for op, key, value, etag, options, metadata in ops:
        etag = "" if etag is None else str(etag)
        if etag and not etag.isdigit():
            raise ApiError(400, err_code, "invalid etag value: %s" % etag)
        first = "1" if (options or {}).get("concurrency") == "first-write" else "0"
        ttl = str((metadata or {}).get("ttlInSeconds", ""))
        keys.append("%s||%s" % (app_id, key))
        argv += [op, value or b"", etag, first, ttl]
    # daprd's own wording for each operation's failure
    what = {"ERR_STATE_SAVE": "failed saving state in state store %s" % STATE_STORE,
            "ERR_STATE_DELETE": "failed deleting state with key %s" % (ops[0][1] if ops else ""),
            "ERR_STATE_TRANSACTION": "error while executing state transaction"}[err_code]
    try:
        redis.call("EVAL", STATE_SCRIPT, len(keys), *keys, *argv)
    except RedisError as e:
        if str(e).startswith("ETAGMISMATCH"):
            raise ApiError(409, err_code, "%s: possible etag mismatch. error from state store: %s"
                           % (what, e))
        raise ApiError(500, err_code, "%s: %s" % (what, e))
    except (OSError, ConnectionError) as e:
        raise ApiError(500, err_code, "%s: %s" % (what, e))


def state_get(app_id, key):
    try:
        reply = redis.call("HMGET", "%s||%s" % (app_id, key), "data", "version")
    except (OSError, ConnectionError, RedisError) as e:
        raise ApiError(500, "ERR_STATE_GET", "fail to get %s from state store %s: %s"
                       % (key, STATE_STORE, e))
    data, version = reply
    return (None, None) if data is None else (data, version.decode() if version else "1")


# ---- Kafka, through the Kafka program's control socket ----

def kafka_produce(topic, key, value, headers):
    port = int(read_state("kafka", "control.port"))
    parts = ["produce", topic, key.encode().hex() if key else "-", value.hex() or "-"]
    parts += ["%s=%s" % (k, v.encode().hex()) for k, v in headers.items()]
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        s.sendall((" ".join(parts) + "\n").encode())
        reply = s.makefile().readline().strip()
    if not reply.startswith("ok"):
        raise ApiError(500, "ERR_PUBSUB_PUBLISH_MESSAGE", "error when publish to topic %s in "
                       "pubsub %s: %s" % (topic, PUBSUB, reply))


def cloud_event(app_id, topic, body, content_type):
    event = {
        "id": str(uuid.uuid4()),
        "source": app_id,
        "type": "com.dapr.event.sent",
        "specversion": "1.0",
        "datacontenttype": content_type,
        "topic": topic,
        "pubsubname": PUBSUB,
        "traceid": "00-%s-%s-01" % (uuid.uuid4().hex, uuid.uuid4().hex[:16]),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    event["traceparent"], event["tracestate"] = event["traceid"], ""
    try:
        text = body.decode()
        event["data"] = json.loads(text) if "json" in content_type else text
    except (UnicodeDecodeError, ValueError):
        event["data_base64"] = base64.b64encode(body).decode()
    return event


# ---- HTTP ----

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as clients reuse connections
    disable_nagle_algorithm = True  # no 40 ms delayed-ACK stall per request on a kept-alive connection

    def log_message(self, fmt, *args):
        sys.stderr.write("%s %s\n" % (self.server.name, fmt % args))

    def body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def send(self, status, payload=None, headers=None):
        data = payload if isinstance(payload, bytes) else (
            b"" if payload is None else json.dumps(payload).encode())
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if status != 204:
            if "Content-Type" not in (headers or {}):
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if status != 204:
            self.wfile.write(data)

    def error(self, status, code, message):
        self.send(status, {"errorCode": code, "message": message})

    def dispatch(self):
        try:
            self.route(urlsplit(self.path))
        except ApiError as e:
            self.error(e.status, e.code, e.message)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = lambda self: self.dispatch()


# The websocket app's /stats (seed 000's WebSocket checks read it): connections
# open and made, and messages received (a ping is no message).
WS_STATS = {"connections": 0, "connections_total": 0, "messages_received": 0}
WS_STATS_LOCK = threading.Lock()


def ws_load(app_id):
    """Connections of clients the sandbox does not hold open, counted on /stats as open
    (STATE_DIR/dapr/ws-load/<appid>, written by `ctl dapr ws-load`)."""
    try:
        with open(os.path.join(STATE_DIR, "dapr", "ws-load", app_id)) as f:
            return int(f.read().strip() or 0)
    except (OSError, ValueError):
        return 0


def count(**deltas):
    with WS_STATS_LOCK:
        for name, d in deltas.items():
            WS_STATS[name] += d


class AppHandler(Handler):
    """The app itself: enough for health probes and service invocation."""

    def route(self, url):
        if url.path == "/health":
            self.send(200, {"status": "healthy", "service": self.server.app_id})
        elif url.path == "/ws" and self.server.app_id == "websocket":
            self.echo()
        elif url.path == "/stats" and self.server.app_id == "websocket":
            with WS_STATS_LOCK:
                stats = dict(WS_STATS)
            load = ws_load(self.server.app_id)
            stats["connections"] += load
            stats["connections_total"] += load
            self.send(200, stats)
        else:
            self.send(404, {"detail": "Not Found"})

    def echo(self):
        """The app's WebSocket endpoint: every text or binary message comes back as it came;
        of the subprotocols a client offers, the first is taken."""
        if "websocket" not in self.headers.get("Upgrade", "").lower():
            return self.send(426, {"detail": "Upgrade Required: this endpoint speaks WebSocket"}, {"Upgrade": "websocket"})
        if os.path.exists(os.path.join(STATE_DIR, "dapr", "ws-refused", self.server.app_id)):
            return self.send(503, {"detail": "WebSocket upgrades refused (fault ws-refuse)"})
        offered = self.headers.get("Sec-WebSocket-Protocol", "").split(",")[0].strip()
        ws = upgrade(self, offered or None)
        count(connections=1, connections_total=1)
        try:
            while True:
                op, data = ws.read_message()
                if op == 8:
                    ws.send(8, data[:2])
                    return
                count(messages_received=1)
                ws.send(op, data)
        except (EOFError, OSError, ValueError):
            pass
        finally:
            count(connections=-1)


def json_body(handler):
    try:
        return json.loads(handler.body() or b"null")
    except ValueError as e:
        raise ApiError(400, "ERR_MALFORMED_REQUEST", "failed to parse request body: %s" % e)


class SidecarHandler(Handler):
    """The Dapr HTTP API of one app's sidecar."""

    def route(self, url):
        parts = [unquote(p) for p in url.path.split("/")[1:]]
        if parts[:1] != ["v1.0"] or len(parts) < 2:
            return self.error(404, "ERR_NOT_FOUND", "no route for %s" % url.path)
        api, rest = parts[1], parts[2:]
        handler = {
            "healthz": self.healthz, "metadata": self.metadata, "publish": self.publish,
            "state": self.state, "secrets": self.secrets, "invoke": self.invoke,
        }.get(api)
        if handler is None:
            return self.error(404, "ERR_NOT_FOUND", "no route for %s" % url.path)
        handler(rest, parse_qs(url.query))

    @property
    def app_id(self):
        return self.server.app_id

    def unhealthy(self):
        return os.path.exists(os.path.join(STATE_DIR, "dapr", "unhealthy", self.app_id))

    def healthz(self, rest, query):
        if self.unhealthy():
            return self.error(500, "ERR_HEALTH_NOT_READY", "dapr is not ready")
        if rest == ["outbound"]:
            try:
                redis.call("PING")
            except (OSError, ConnectionError, RedisError) as e:
                return self.error(500, "ERR_HEALTH_NOT_READY", "dapr outbound is not ready: %s" % e)
        self.send(204)

    def metadata(self, rest, query):
        if self.command == "PUT" and len(rest) == 1:
            self.server.extended[rest[0]] = self.body().decode(errors="replace")
            return self.send(204)
        self.send(200, metadata_document(self.app_id, self.server.extended))

    def publish(self, rest, query):
        if self.command != "POST" or len(rest) != 2:
            return self.error(405, "ERR_METHOD_NOT_ALLOWED", "use POST /v1.0/publish/{pubsub}/{topic}")
        pubsub, topic = rest
        if pubsub != PUBSUB:
            return self.error(404, "ERR_PUBSUB_NOT_FOUND", "pubsub %s not found" % pubsub)
        body = self.body()
        content_type = self.headers.get("Content-Type") or "text/plain"
        raw = query.get("metadata.rawPayload", ["false"])[0] == "true"
        if raw or content_type.startswith("application/cloudevents+json"):
            value = body
        else:
            value = json.dumps(cloud_event(self.app_id, topic, body, content_type)).encode()
        key = query.get("metadata.partitionKey", [None])[0]
        kafka_produce(topic, key, value, {"content-type": "application/cloudevents+json"})
        self.send(204)

    def state(self, rest, query):
        if not rest or rest[0] != STATE_STORE:
            store = rest[0] if rest else ""
            return self.error(400, "ERR_STATE_STORE_NOT_FOUND", "state store %s is not found" % store)
        if len(rest) == 1 and self.command == "POST":
            return self.state_save()
        if rest[1:] == ["bulk"] and self.command == "POST":
            return self.state_bulk()
        if rest[1:] == ["transaction"] and self.command == "POST":
            return self.state_transaction()
        if len(rest) == 2 and self.command == "GET":
            data, etag = state_get(self.app_id, rest[1])
            return self.send(204) if data is None else self.send(200, data, {"ETag": etag})
        if len(rest) == 2 and self.command == "DELETE":
            etag = self.headers.get("If-Match")
            state_ops(self.app_id, [("delete", rest[1], None, etag, {}, {})], "ERR_STATE_DELETE")
            return self.send(204)
        self.error(405, "ERR_METHOD_NOT_ALLOWED", "unsupported state request")

    def state_save(self):
        items = json_body(self)
        if not isinstance(items, list) or not all(isinstance(i, dict) and i.get("key") for i in items):
            raise ApiError(400, "ERR_MALFORMED_REQUEST", "expected an array of {key, value}")
        for i in items:  # each item on its own, like Dapr's bulk save
            state_ops(self.app_id, [("upsert", i["key"], encode_value(i.get("value")), i.get("etag"),
                                     i.get("options"), i.get("metadata"))], "ERR_STATE_SAVE")
        self.send(204)

    def state_bulk(self):
        req = json_body(self)
        keys = req.get("keys") if isinstance(req, dict) else None
        if not isinstance(keys, list):
            raise ApiError(400, "ERR_MALFORMED_REQUEST", "expected {\"keys\": [...]}")
        out = []
        for key in keys:
            data, etag = state_get(self.app_id, key)
            item = {"key": key}
            if data is not None:
                item["data"], item["etag"] = decode_value(data), etag
            out.append(item)
        self.send(200, out)

    def state_transaction(self):
        req = json_body(self)
        ops = []
        for o in (req or {}).get("operations", []):
            r = o.get("request") or {}
            if o.get("operation") not in ("upsert", "delete") or not r.get("key"):
                raise ApiError(400, "ERR_MALFORMED_REQUEST", "bad operation: %s" % json.dumps(o))
            ops.append((o["operation"], r["key"], encode_value(r.get("value")), r.get("etag"),
                        r.get("options"), r.get("metadata")))
        if ops:
            state_ops(self.app_id, ops, "ERR_STATE_TRANSACTION")
        self.send(204)

    def secrets(self, rest, query):
        if len(rest) != 2 or rest[0] != SECRET_STORE:
            return self.error(400, "ERR_SECRET_STORE_NOT_FOUND",
                              "failed finding secret store with key %s" % (rest[0] if rest else ""))
        with open(os.path.join(STATE_DIR, "dapr", "secrets.json")) as f:
            secrets = json.load(f)
        if rest[1] == "bulk":
            return self.send(200, secrets)
        if rest[1] not in secrets:
            return self.error(500, "ERR_SECRET_GET", "failed getting secret with key %s from secret "
                              "store %s: secret %s not found" % (rest[1], SECRET_STORE, rest[1]))
        self.send(200, secrets[rest[1]])

    def invoke(self, rest, query):
        if len(rest) < 3 or rest[1] != "method":
            return self.error(404, "ERR_DIRECT_INVOKE", "malformed invoke path")
        target = apps.get(rest[0])
        if target is None:
            return self.error(404, "ERR_DIRECT_INVOKE", "failed to invoke, id: %s, err: app "
                              "not found" % rest[0])
        path = "/" + "/".join(rest[2:]) + (("?" + urlsplit(self.path).query) if "?" in self.path else "")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", target["port"], timeout=10)
            conn.request(self.command, path, body=self.body() or None,
                         headers={"Content-Type": self.headers.get("Content-Type", "application/json")})
            resp = conn.getresponse()
            data = resp.read()
            conn.close()
        except OSError as e:
            return self.error(500, "ERR_DIRECT_INVOKE", "failed to invoke, id: %s, err: %s"
                              % (rest[0], e))
        self.send(resp.status, data, {"Content-Type": resp.getheader("Content-Type", "application/json")})


def encode_value(value):
    """Dapr stores a state value as its JSON bytes (a string stays a JSON string)."""
    return json.dumps(value, separators=(",", ":")).encode()


def decode_value(data):
    try:
        return json.loads(data)
    except ValueError:
        return data.decode(errors="replace")


def metadata_document(app_id, extended):
    subs = [{
        "pubsubname": PUBSUB, "topic": t, "metadata": {},
        "rules": [{"match": "", "path": "/events/%s" % t}],
        "deadLetterTopic": DEAD_LETTER.get(t, ""), "type": "DECLARATIVE",
    } for t in SUBSCRIPTIONS[app_id]]
    return {
        "id": app_id,
        "runtimeVersion": RUNTIME_VERSION,
        "enabledFeatures": [],
        "actors": [],
        "extended": dict(extended, daprRuntimeVersion=RUNTIME_VERSION),
        "components": [
            {"name": STATE_STORE, "type": "state.redis", "version": "v1",
             "capabilities": ["ETAG", "TRANSACTIONAL", "TTL", "QUERY_API"]},
            {"name": PUBSUB, "type": "pubsub.kafka", "version": "v1", "capabilities": []},
            {"name": SECRET_STORE, "type": "secretstores.local.file", "version": "v1",
             "capabilities": []},
        ],
        "subscriptions": subs,
        "httpEndpoints": [],
        "appConnectionProperties": {
            "port": apps[app_id]["port"], "protocol": "http", "channelAddress": "127.0.0.1",
            "maxConcurrency": -1,
            "health": {"healthCheckPath": "/health", "healthProbeInterval": "5s",
                       "healthProbeTimeout": "500ms", "healthThreshold": 3},
        },
    }


def ensure_secrets():
    """The local file secret store; made once, like a real secrets file would be."""
    path = os.path.join(STATE_DIR, "dapr", "secrets.json")
    if os.path.exists(path):
        return
    doc = {
        "database-secrets": {"username": "todo", "password": read_state("secrets", "todo")},
        "redis-secrets": {"password": read_state("secrets", "redis")},
        "app-secrets": {"jwt-secret": uuid.uuid4().hex, "openai-api-key": "sk-sandbox-" + uuid.uuid4().hex},
    }
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=2)


def serve(handler, app_id, name):
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    server.app_id, server.name, server.extended = app_id, name, {}
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main():
    global STATE_DIR
    if len(sys.argv) != 2:
        sys.exit("usage: daprd.py STATE_DIR")
    STATE_DIR = os.path.abspath(sys.argv[1])
    os.makedirs(os.path.join(STATE_DIR, "dapr", "unhealthy"), exist_ok=True)
    os.makedirs(os.path.join(STATE_DIR, "dapr", "ws-refused"), exist_ok=True)
    ensure_secrets()
    servers = []
    for app_id in SUBSCRIPTIONS:
        app = serve(AppHandler, app_id, "app:" + app_id)
        sidecar = serve(SidecarHandler, app_id, "daprd:" + app_id)
        apps[app_id] = {"port": app.server_address[1], "sidecar": sidecar.server_address[1]}
        servers += [app, sidecar]
    write_json_atomically("apps.json", {a: {"port": p["port"]} for a, p in apps.items()})
    with open(os.path.join(STATE_DIR, "ports", "dapr.tmp"), "w") as f:
        f.write("%d\n" % apps["backend"]["sidecar"])   # DAPR_HTTP_ENDPOINT's port, for `up`
    os.replace(os.path.join(STATE_DIR, "ports", "dapr.tmp"), os.path.join(STATE_DIR, "ports", "dapr"))
    write_json_atomically("dapr.json", {a: {"port": p["sidecar"],
                                            "endpoint": "http://127.0.0.1:%d" % p["sidecar"]}
                                        for a, p in apps.items()})
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    sys.stderr.write("daprd stand-in ready: %s\n" % json.dumps(apps))
    while not stop.wait(1):
        pass
    for s in servers:
        s.server_close()


if __name__ == "__main__":
    main()
