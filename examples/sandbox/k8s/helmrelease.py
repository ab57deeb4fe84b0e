"""Helm 3 release records, written as helm writes them (pkg/storage/driver/secrets.go, util.go).

A record is a Secret named sh.helm.release.v1.NAME.vREVISION, of type
helm.sh/release.v1, labelled name, owner=helm, status and version; its one key,
`release`, is base64 of the gzip (best compression) of the release's JSON, and
the API server's own base64 of the Secret's data wraps that again.
"""
import base64
import gzip
import json

from store import now_iso

CHART = {"name": "todo-chatbot", "version": "0.5.0", "appVersion": "1.4.0", "apiVersion": "v2",
         "description": "Todo chatbot: backend, frontend, websocket, recurring tasks, notifications",
         "type": "application"}


def stamp(t):
    """A time as Go's encoding/json writes a time.Time (RFC 3339 with nanoseconds)."""
    return now_iso(t).replace("Z", ".%09dZ" % int((t % 1) * 1e9))


def scalar(v):
    if v is True or v is False:
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, dict):
        return "{}"
    if isinstance(v, list):
        return "[]"
    return json.dumps(v)


def yaml_lines(v, ind=0):
    """Block YAML for dicts, lists and scalars, as a chart's templates render it."""
    sp, out = "  " * ind, []
    items = v.items() if isinstance(v, dict) else ((None, x) for x in v)
    for k, x in items:
        head = sp + ("%s:" % k if k is not None else "-")
        if isinstance(x, (dict, list)) and x:
            sub = yaml_lines(x, ind + 1)
            if k is None:
                out.append(sp + "- " + sub[0].lstrip())
                out += sub[1:]
            else:
                out.append(head)
                out += sub
        else:
            out.append(head + " " + scalar(x))
    return out


def manifest(docs):
    """The rendered manifest: documents each after a `---` and their template's # Source line."""
    parts = []
    for source, doc in docs:
        parts.append("---\n# Source: todo-chatbot/templates/%s\n%s\n" % (source, "\n".join(yaml_lines(doc))))
    return "".join(parts)


def release(name, namespace, revision, status, description, config, docs, first, last, defaults):
    return {"name": name,
            "info": {"first_deployed": stamp(first), "last_deployed": stamp(last), "deleted": "",
                     "description": description, "status": status},
            "chart": {"metadata": dict(CHART), "lock": None, "templates": [], "values": defaults,
                      "schema": None, "files": []},
            "config": config, "manifest": manifest(docs), "version": revision, "namespace": namespace}


def encode(rel):
    data = json.dumps(rel, separators=(",", ":")).encode()
    return base64.b64encode(gzip.compress(data, 9, mtime=0)).decode()


def decode(text):
    return json.loads(gzip.decompress(base64.b64decode(text)))


def secret(rel):
    """The Secret helm's storage keeps a release in (its data as the API server holds it)."""
    labels = {"name": rel["name"], "owner": "helm", "status": rel["info"]["status"], "version": str(rel["version"])}
    return {"metadata": {"name": "sh.helm.release.v1.%s.v%d" % (rel["name"], rel["version"]),
                         "namespace": rel["namespace"], "labels": labels},
            "type": "helm.sh/release.v1",
            "data": {"release": base64.b64encode(encode(rel).encode()).decode()}}
