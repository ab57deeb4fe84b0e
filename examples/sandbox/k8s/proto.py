"""Decode the Kubernetes protobuf wire format for the objects kubectl's typed
clients send (kubectl create configmap/secret/namespace/deployment/service,
auth whoami/can-i, drain's evictions, create token). kubectl 1.32 sends those as
application/vnd.kubernetes.protobuf and does not fall back to JSON.

A schema is {field number: (name, type, sub-schema)}; type is one of
str, bytes, int, bool, msg, map (string -> string), bmap (string -> bytes),
qmap (string -> Quantity); a name ending in [] is repeated.
"""
import base64
import struct

from store import ApiError

MAGIC = b"k8s\x00"

INT_OR_STRING = {1: ("type", "int", None), 2: ("intVal", "int", None), 3: ("strVal", "str", None)}
OWNER_REF = {1: ("kind", "str", None), 3: ("name", "str", None), 4: ("uid", "str", None),
             5: ("apiVersion", "str", None), 6: ("controller", "bool", None), 7: ("blockOwnerDeletion", "bool", None)}
META = {1: ("name", "str", None), 2: ("generateName", "str", None), 3: ("namespace", "str", None),
        5: ("uid", "str", None), 6: ("resourceVersion", "str", None), 11: ("labels", "map", None),
        12: ("annotations", "map", None), 13: ("ownerReferences[]", "msg", OWNER_REF), 14: ("finalizers[]", "str", None)}
SELECTOR = {1: ("matchLabels", "map", None),
            2: ("matchExpressions[]", "msg", {1: ("key", "str", None), 2: ("operator", "str", None),
                                               3: ("values[]", "str", None)})}
CONTAINER = {1: ("name", "str", None), 2: ("image", "str", None), 3: ("command[]", "str", None),
             4: ("args[]", "str", None), 5: ("workingDir", "str", None),
             6: ("ports[]", "msg", {1: ("name", "str", None),
                                    3: ("containerPort", "int", None), 4: ("protocol", "str", None)}),
             7: ("env[]", "msg", {1: ("name", "str", None), 2: ("value", "str", None)}),
             8: ("resources", "msg", {1: ("limits", "qmap", None), 2: ("requests", "qmap", None)}),
             13: ("terminationMessagePath", "str", None), 14: ("imagePullPolicy", "str", None),
             20: ("terminationMessagePolicy", "str", None)}
POD_SPEC = {2: ("containers[]", "msg", CONTAINER), 3: ("restartPolicy", "str", None),
            4: ("terminationGracePeriodSeconds", "int", None), 6: ("dnsPolicy", "str", None),
            7: ("nodeSelector", "map", None), 8: ("serviceAccountName", "str", None),
            10: ("nodeName", "str", None), 19: ("schedulerName", "str", None)}
TEMPLATE = {1: ("metadata", "msg", META), 2: ("spec", "msg", POD_SPEC)}
DEPLOYMENT_SPEC = {1: ("replicas", "int", None), 2: ("selector", "msg", SELECTOR), 3: ("template", "msg", TEMPLATE),
                   4: ("strategy", "msg", {1: ("type", "str", None), 2: ("rollingUpdate", "msg", {
                       1: ("maxUnavailable", "msg", INT_OR_STRING), 2: ("maxSurge", "msg", INT_OR_STRING)})}),
                   5: ("minReadySeconds", "int", None), 6: ("revisionHistoryLimit", "int", None),
                   7: ("paused", "bool", None), 9: ("progressDeadlineSeconds", "int", None)}
SERVICE_SPEC = {1: ("ports[]", "msg", {1: ("name", "str", None), 2: ("protocol", "str", None), 3: ("port", "int", None),
                                       4: ("targetPort", "msg", INT_OR_STRING), 5: ("nodePort", "int", None)}),
                2: ("selector", "map", None), 3: ("clusterIP", "str", None), 4: ("type", "str", None)}
RESOURCE_ATTRS = {1: ("namespace", "str", None), 2: ("verb", "str", None), 3: ("group", "str", None),
                  4: ("version", "str", None), 5: ("resource", "str", None), 6: ("subresource", "str", None),
                  7: ("name", "str", None)}

KINDS = {
    "ConfigMap": {1: ("metadata", "msg", META), 2: ("data", "map", None), 3: ("binaryData", "bmap", None),
                  4: ("immutable", "bool", None)},
    "Secret": {1: ("metadata", "msg", META), 2: ("data", "bmap", None), 3: ("type", "str", None),
               4: ("stringData", "map", None), 5: ("immutable", "bool", None)},
    "Namespace": {1: ("metadata", "msg", META), 2: ("spec", "msg", {1: ("finalizers[]", "str", None)})},
    "ServiceAccount": {1: ("metadata", "msg", META)},
    "Deployment": {1: ("metadata", "msg", META), 2: ("spec", "msg", DEPLOYMENT_SPEC)},
    "Service": {1: ("metadata", "msg", META), 2: ("spec", "msg", SERVICE_SPEC)},
    "Pod": {1: ("metadata", "msg", META), 2: ("spec", "msg", POD_SPEC)},
    "SelfSubjectReview": {1: ("metadata", "msg", META)},
    "SelfSubjectAccessReview": {1: ("metadata", "msg", META), 2: ("spec", "msg", {
        1: ("resourceAttributes", "msg", RESOURCE_ATTRS),
        2: ("nonResourceAttributes", "msg", {1: ("path", "str", None), 2: ("verb", "str", None)})})},
    "Eviction": {1: ("metadata", "msg", META)},
    "TokenRequest": {1: ("metadata", "msg", META), 2: ("spec", "msg", {
        1: ("audiences[]", "str", None), 4: ("expirationSeconds", "int", None)})},
}


def varint(buf, i):
    shift = result = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


def fields(buf):
    i = 0
    while i < len(buf):
        key, i = varint(buf, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            val, i = varint(buf, i)
        elif wt == 2:
            n, i = varint(buf, i)
            val, i = buf[i:i + n], i + n
        elif wt == 1:
            val, i = struct.unpack_from("<q", buf, i)[0], i + 8
        elif wt == 5:
            val, i = struct.unpack_from("<i", buf, i)[0], i + 4
        else:
            raise ValueError("unsupported wire type %d" % wt)
        yield num, val


def entry(buf):
    kv = dict(fields(buf))
    return kv.get(1, b"").decode(), kv.get(2, b"")


def decode(buf, schema):
    out = {}
    for num, val in fields(buf):
        if num not in schema:
            continue
        name, typ, sub = schema[num]
        repeated = name.endswith("[]")
        name = name.rstrip("[]")
        if typ in ("map", "bmap", "qmap"):
            k, v = entry(val)
            if typ == "map":
                v = v.decode()
            elif typ == "bmap":
                v = base64.b64encode(v).decode()
            else:
                v = dict(fields(v)).get(1, b"").decode()
            out.setdefault(name, {})[k] = v
            continue
        if typ == "str":
            v = val.decode()
        elif typ == "bytes":
            v = base64.b64encode(val).decode()
        elif typ == "int":
            v = val - (1 << 64) if val >= 1 << 63 else val
        elif typ == "bool":
            v = bool(val)
        else:
            v = decode(val, sub)
            if sub is INT_OR_STRING:
                v = v.get("strVal", "") if v.get("type") == 1 else v.get("intVal", 0)
        if repeated:
            out.setdefault(name, []).append(v)
        else:
            out[name] = v
    return prune(out)


def prune(obj):
    """Go's protobuf writes every non-pointer field; JSON would have left the empty ones out."""
    return {k: v for k, v in obj.items() if v not in ("", {}, [], None)}


def decode_object(body):
    if not body.startswith(MAGIC):
        raise ApiError(415, "UnsupportedMediaType", "the body of the request was in an unknown format")
    envelope = dict(fields(body[len(MAGIC):]))
    type_meta = dict(fields(envelope.get(1, b"")))
    api_version, kind = type_meta.get(1, b"").decode(), type_meta.get(2, b"").decode()
    if kind not in KINDS:
        raise ApiError(415, "UnsupportedMediaType", "the sandbox API server cannot decode protobuf %s; "
                       "send application/json" % (kind or "objects"))
    obj = decode(envelope.get(2, b""), KINDS[kind])
    obj.update(apiVersion=api_version, kind=kind)
    obj.setdefault("metadata", {})
    return obj
