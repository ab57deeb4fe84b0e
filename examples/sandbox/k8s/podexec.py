"""pods/exec over WebSocket, as the API server serves kubectl 1.30+ (channel.k8s.io
v5, else v4): the command runs for real in a per-pod root directory.

Each pod gets STATE_DIR/k8s/pods/NS/POD/ with var/log (the app's log and rotated
copies), tmp and app (the working directory, with ./heapdump, the app's heap dump
command). When user namespaces are available the command runs in the pod's own
user and mount namespaces: /var/log is a tmpfs of LOG_VOLUME seeded from the pod's
var/log (so `df /var/log` gives a real share, and the disk-full fault can fill it)
and the pod's tmp is bind-mounted over /tmp, so `du -sh /var/log` and
`kubectl cp pod:/tmp/x` see the pod's files; otherwise it runs in the pod's app
directory with the host's /var/log and /tmp. A holder process per pod keeps those
namespaces and each command enters them with nsenter, which costs about what a
plain exec does; making them anew for each command (unshare, two mounts) cost
several times more.
The container's env (env, envFrom of ConfigMaps and Secrets) is the process env, so
DATABASE_URL and REDIS_URL reach the sandbox's real PostgreSQL and Redis.

WebSocket framing is the minimum RFC 6455 needs for this: binary messages,
ping/pong and close; fragmented client messages are reassembled."""
import base64
import hashlib
import json
import os
import signal
import struct
import subprocess
import threading
import time

from store import ApiError

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
PROTOCOLS = ("v5.channel.k8s.io", "v4.channel.k8s.io")
STDIN, STDOUT, STDERR, STATUS, CLOSE = 0, 1, 2, 3, 255
_unshare = None


def can_unshare():
    global _unshare
    if _unshare is None:
        try:
            _unshare = subprocess.run(["unshare", "-Urm", "true"], capture_output=True, timeout=5).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            _unshare = False
    return _unshare


def pod_root(state_dir, ns, pod, app):
    """The pod's filesystem, made on first use: an app log, rotated copies, an app dir."""
    root = os.path.join(state_dir, "k8s", "pods", ns, pod)
    if not os.path.isdir(root):
        for d in ("var/log", "tmp", "app"):
            os.makedirs(os.path.join(root, d), exist_ok=True)
        line = json.dumps({"level": "INFO", "service": app, "logger": "app.main", "message": "request served"}) + "\n"
        with open(os.path.join(root, "var/log", app + ".log"), "w") as f:
            f.write(line * 2000)
        for i in range(1, 6):   # rotated logs, older with each number
            path = os.path.join(root, "var/log", "%s.log.%d" % (app, i))
            with open(path, "w") as f:
                f.write(line * 4000)
            old = time.time() - i * 86400
            os.utime(path, (old, old))
        with open(os.path.join(root, "app", "VERSION"), "w") as f:
            f.write("1.0.0\n")
        # The app's heap dump command, as `jmap -dump` would be: writes FILE, prints its path.
        dump = os.path.join(root, "app", "heapdump")
        with open(dump, "w") as f:
            f.write('#!/bin/sh\nout=${1:-/tmp/heap.hprof}\nhead -c 4000000 /dev/urandom >"$out" && echo "heap dumped to $out"\n')
        os.chmod(dump, 0o755)
    return root


def container_env(store, ns, container, pod_name):
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOSTNAME": pod_name, "HOME": "/tmp", "LANG": "C.UTF-8"}

    def source(kind, name):
        obj = store.get(kind, ns, name) or {}
        data = dict(obj.get("data") or {})
        if kind == "secrets":
            data = {k: base64.b64decode(v).decode(errors="replace") for k, v in data.items()}
        return data

    for ef in container.get("envFrom") or []:
        ref = ef.get("configMapRef") or ef.get("secretRef")
        if ref:
            env.update({ef.get("prefix", "") + k: v for k, v in source("configmaps" if "configMapRef" in ef else "secrets",
                                                                       ref["name"]).items()})
    for e in container.get("env") or []:
        if "value" in e:
            env[e["name"]] = e["value"]
        elif e.get("valueFrom"):
            ref = e["valueFrom"].get("secretKeyRef") or e["valueFrom"].get("configMapKeyRef")
            if ref:
                v = source("secrets" if "secretKeyRef" in e["valueFrom"] else "configmaps", ref["name"]).get(ref["key"])
                if v is not None:
                    env[e["name"]] = v
    return env


_holders, _holders_lock = {}, threading.Lock()
LOG_VOLUME = "64m"   # the size of each pod's /var/log, so that df gives a real share and a fault can fill it
HOLD = ('R="$0"; mount -t tmpfs -o size=%s,mode=755 pod-log /var/log && cp -a "$R/var/log/." /var/log/ && '
        'mount --bind "$R/tmp" /tmp && echo ready && read _' % LOG_VOLUME)


def holder(store, root, ns, pod):
    """The pid of the process that holds the pod's namespaces, started on first use:
    /var/log is a tmpfs of LOG_VOLUME that starts with the pod root's var/log, /tmp
    is the pod root's tmp. It exits when its stdin, a pipe from the stand-in, closes:
    when the stand-in exits, however it ends, or when a later call finds its pod
    deleted."""
    with _holders_lock:
        for key in [k for k in _holders if k != (ns, pod) and store.get("pods", *k) is None]:
            _holders.pop(key).stdin.close()
        h = _holders.get((ns, pod))
        if h is None or h.poll() is not None:
            h = subprocess.Popen(["unshare", "-Urm", "/bin/sh", "-c", HOLD, root], start_new_session=True,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            if h.stdout.readline() != b"ready\n":
                h.kill()
                h.wait()
                raise OSError("cannot set up the pod's namespaces")
            h.stdout.close()
            _holders[(ns, pod)] = h
        return h.pid


def pod_command(store, state_dir, pod, argv, cname=None):
    """The argv that runs argv in the pod's filesystem, and its working directory."""
    ns, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
    app = pod["metadata"].get("labels", {}).get("app.kubernetes.io/component") or cname or pod["spec"]["containers"][0]["name"]
    root = pod_root(state_dir, ns, name, app)
    cwd = os.path.join(root, "app")
    if not can_unshare():
        return argv, cwd
    return ["nsenter", "-t", str(holder(store, root, ns, name)), "-U", "-m", "--wd=" + cwd, "--"] + argv, cwd


class Socket:
    """Server side of one WebSocket: frames in, frames out (one writer at a time)."""

    def __init__(self, rfile, wfile):
        self.rfile, self.wfile, self.lock = rfile, wfile, threading.Lock()

    def read_exact(self, n):
        data = self.rfile.read(n)
        if len(data) < n:
            raise EOFError
        return data

    def read_message(self):
        """(opcode, payload) of the next whole message; pings are answered here."""
        parts, first = [], None
        while True:
            b0, b1 = self.read_exact(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self.read_exact(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self.read_exact(8))[0]
            mask = self.read_exact(4) if b1 & 0x80 else None
            data = self.read_exact(n)
            if mask:
                m = (mask * (n // 4 + 1))[:n]
                data = (int.from_bytes(data, "big") ^ int.from_bytes(m, "big")).to_bytes(n, "big")
            op = b0 & 0x0F
            if op == 9:
                self.send(10, data)
                continue
            if op == 10:
                continue
            if op == 8:
                return 8, data
            if first is None:
                first = op
            parts.append(data)
            if b0 & 0x80:
                return first, b"".join(parts)

    def send(self, op, data):
        n = len(data)
        head = bytes([0x80 | op]) + (bytes([n]) if n < 126 else struct.pack(">BH", 126, n) if n < 65536
                                     else struct.pack(">BQ", 127, n))
        with self.lock:
            self.wfile.write(head + data)
            self.wfile.flush()

    def channel(self, ch, data):
        self.send(2, bytes([ch]) + data)


def upgrade(handler, proto=None):
    """Answer a WebSocket upgrade request with 101 (and the subprotocol chosen):
    the Socket over the handler's connection, which closes when the exchange ends."""
    key = handler.headers.get("Sec-WebSocket-Key", "")
    accept = base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()
    handler.send_response(101, "Switching Protocols")
    handler.send_header("Upgrade", "websocket")
    handler.send_header("Connection", "Upgrade")
    handler.send_header("Sec-WebSocket-Accept", accept)
    if proto:
        handler.send_header("Sec-WebSocket-Protocol", proto)
    handler.end_headers()
    handler.wfile.flush()
    handler.close_connection = True
    return Socket(handler.rfile, handler.wfile)


def status_message(code):
    if code == 0:
        return {"metadata": {}, "status": "Success"}
    return {"metadata": {}, "status": "Failure",
            "message": "command terminated with non-zero exit code: error executing command, exit code %d" % code,
            "reason": "NonZeroExitCode", "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]}}


def serve(handler, pod, state_dir, store, protocols=PROTOCOLS):
    """Answer GET pods/NAME/exec: upgrade, run, stream, report the exit status."""
    q = handler.q_multi
    argv = q.get("command") or []
    if not argv:
        raise ApiError(400, "BadRequest", "you must specify at least 1 command")
    names = [c["name"] for c in pod["spec"]["containers"]]
    cname = q.get("container", [None])[0] or pod["metadata"].get("annotations", {}).get(
        "kubectl.kubernetes.io/default-container") or names[0]
    if cname not in names:
        raise ApiError(400, "BadRequest", "container %s is not valid for pod %s" % (cname, pod["metadata"]["name"]))
    if pod.get("status", {}).get("phase") != "Running":
        raise ApiError(400, "BadRequest", "pod %s is not running" % pod["metadata"]["name"])
    if "websocket" not in handler.headers.get("Upgrade", "").lower():
        raise ApiError(400, "BadRequest", "the sandbox API server serves exec over WebSocket only "
                       "(v5.channel.k8s.io, v4.channel.k8s.io); use kubectl 1.30 or later")
    offered = [p.strip() for p in handler.headers.get("Sec-WebSocket-Protocol", "").split(",")]
    proto = next((p for p in protocols if p in offered), None)
    if proto is None:
        raise ApiError(400, "BadRequest", "none of the offered subprotocols %s is served; want one of %s"
                       % (offered, ", ".join(protocols)))
    container = next(c for c in pod["spec"]["containers"] if c["name"] == cname)
    ns, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
    want_stdin = q.get("stdin", ["false"])[0] in ("true", "1")

    ws = upgrade(handler, proto)

    try:
        run, cwd = pod_command(store, state_dir, pod, argv, cname)
        proc = subprocess.Popen(run, cwd=cwd, env=container_env(store, ns, container, name), start_new_session=True,
                                stdin=subprocess.PIPE if want_stdin else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError as e:
        ws.channel(STATUS, json.dumps({"metadata": {}, "status": "Failure", "reason": "InternalError",
                                       "message": "failed to exec in container: %s" % e}).encode())
        ws.send(8, struct.pack(">H", 1000))
        return

    def pump(src, ch):
        try:
            while True:
                data = os.read(src.fileno(), 65536)
                if not data:
                    break
                ws.channel(ch, data)
        except OSError:
            pass

    pumps = [threading.Thread(target=pump, args=(proc.stdout, STDOUT), daemon=True),
             threading.Thread(target=pump, args=(proc.stderr, STDERR), daemon=True)]
    for t in pumps:
        t.start()

    def reader():
        """The client's messages: stdin, the close of stdin (v5), or the end of the session."""
        try:
            while True:
                op, data = ws.read_message()
                if op == 8:
                    break
                if not data:
                    continue
                if data[0] == STDIN and want_stdin and proc.stdin:
                    try:
                        proc.stdin.write(data[1:])
                        proc.stdin.flush()
                    except OSError:
                        pass
                elif data[0] == CLOSE and data[1:2] == bytes([STDIN]) and proc.stdin:
                    proc.stdin.close()
        except (EOFError, OSError, ValueError):
            pass
        if proc.poll() is None:   # the client went away: the command ends with its session
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass

    threading.Thread(target=reader, daemon=True).start()
    code = proc.wait()
    for t in pumps:
        t.join()
    code = code if code >= 0 else 128 - code
    try:
        ws.channel(STATUS, json.dumps(status_message(code)).encode())
        ws.send(8, struct.pack(">H", 1000))
    except OSError:
        pass
