"""Patch semantics: JSON merge (RFC 7386), JSON patch (RFC 6902), strategic merge,
and the field ownership that server-side apply needs."""
import copy
import json

from store import ApiError

# Strategic merge: lists merged by key, the rest replaced (as in the Go types' patchMergeKey).
MERGE_KEYS = {"containers": "name", "initContainers": "name", "ephemeralContainers": "name",
              "env": "name", "volumes": "name", "volumeMounts": "mountPath",
              "imagePullSecrets": "name", "conditions": "type", "ownerReferences": "uid",
              "hostAliases": "ip", "envFrom": None, "ports": "*port"}


def merge_patch(target, patch):
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


def list_key(field, items):
    key = MERGE_KEYS.get(field)
    if key == "*port":
        sample = next((i for i in items if isinstance(i, dict)), {})
        return "containerPort" if "containerPort" in sample else "port"
    return key


def strategic_merge(target, patch):
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if patch.get("$patch") == "replace":
        return {k: v for k, v in patch.items() if k != "$patch"}
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if k.startswith("$deleteFromPrimitiveList/"):
            f = k.split("/", 1)[1]
            out[f] = [x for x in out.get(f, []) if x not in v]
        elif k.startswith("$"):
            continue
        elif v is None:
            out.pop(k, None)
        elif isinstance(v, list) and isinstance(out.get(k), list) and list_key(k, v + out[k]):
            out[k] = merge_list(out[k], v, list_key(k, v + out[k]))
        elif isinstance(v, dict):
            out[k] = strategic_merge(out.get(k), v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def merge_list(cur, patch, key):
    out = copy.deepcopy(cur)
    for item in patch:
        if not isinstance(item, dict) or key not in item:
            continue
        idx = next((i for i, c in enumerate(out) if c.get(key) == item[key]), None)
        if item.get("$patch") == "delete":
            if idx is not None:
                out.pop(idx)
        elif idx is None:
            out.append(strategic_merge({}, item))
        else:
            out[idx] = strategic_merge(out[idx], item)
    return out


def _pointer(path):
    if path == "":
        return []
    if not path.startswith("/"):
        raise ApiError(422, "Invalid", "invalid JSON pointer %r" % path)
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _walk(doc, parts):
    for p in parts:
        if isinstance(doc, list):
            doc = doc[int(p)]
        else:
            doc = doc[p]
    return doc


def json_patch(doc, ops):
    doc = copy.deepcopy(doc)
    if not isinstance(ops, list):
        raise ApiError(400, "BadRequest", "json patch must be a list of operations")
    for op in ops:
        try:
            doc = _apply_op(doc, op)
        except (KeyError, IndexError, ValueError, TypeError) as e:
            raise ApiError(422, "Invalid", "the server rejected our request due to an error in our "
                           "request: json patch %s operation failed: %s" % (op.get("op"), e))
    return doc


def _apply_op(doc, op):
    kind, parts = op.get("op"), _pointer(op.get("path", ""))
    if kind == "test":
        if _walk(doc, parts) != op.get("value"):
            raise ValueError("testing value %s failed" % op.get("path"))
        return doc
    if kind in ("move", "copy"):
        src = _pointer(op["from"])
        value = copy.deepcopy(_walk(doc, src))
        if kind == "move":
            doc = _apply_op(doc, {"op": "remove", "path": op["from"]})
        return _apply_op(doc, {"op": "add", "path": op["path"], "value": value})
    if not parts:
        return copy.deepcopy(op.get("value")) if kind in ("add", "replace") else None
    parent, last = _walk(doc, parts[:-1]), parts[-1]
    if kind == "remove":
        del parent[int(last) if isinstance(parent, list) else last]
    elif kind == "replace":
        if isinstance(parent, list):
            parent[int(last)] = copy.deepcopy(op["value"])
        else:
            if last not in parent:
                raise KeyError("replace operation does not apply: doc is missing key: " + op["path"])
            parent[last] = copy.deepcopy(op["value"])
    elif kind == "add":
        if isinstance(parent, list):
            parent.insert(len(parent) if last == "-" else int(last), copy.deepcopy(op["value"]))
        else:
            parent[last] = copy.deepcopy(op["value"])
    else:
        raise ValueError("unknown operation %r" % kind)
    return doc


# Field ownership ------------------------------------------------------------------
# A field path is a tuple in fieldsV1 spelling: ("f:spec", "f:replicas").
SKIP_META = {"uid", "resourceVersion", "generation", "creationTimestamp", "managedFields",
             "selfLink", "deletionTimestamp"}


def leaf_paths(obj, prefix=(), field=None):
    out = set()
    if isinstance(obj, dict) and obj:
        for k, v in obj.items():
            if (not prefix and k in ("status", "kind", "apiVersion")) or \
                    (prefix == ("f:metadata",) and k in SKIP_META):
                continue
            out |= leaf_paths(v, prefix + ("f:" + k,), k)
        return out
    if isinstance(obj, list) and obj and field:
        key = list_key(field, obj)
        if key and all(isinstance(i, dict) and key in i for i in obj):
            for i in obj:
                out |= leaf_paths(i, prefix + ('k:' + json.dumps({key: i[key]}, separators=(",", ":")),), None)
            return out
    return {prefix} if prefix else out


def value_at(obj, path):
    for p in path:
        if obj is None:
            return None
        if p.startswith("f:"):
            obj = obj.get(p[2:]) if isinstance(obj, dict) else None
        else:
            (k, v), = json.loads(p[2:]).items()
            obj = next((i for i in obj or [] if isinstance(i, dict) and i.get(k) == v), None)
    return obj


def fields_v1(paths):
    tree = {}
    for p in sorted(paths):
        node = tree
        for part in p:
            node = node.setdefault(part, {})
    return tree


def apply_conflicts(owners, manager, current, applied):
    """Fields in `applied` that another manager owns with a different value."""
    out = []
    for path in leaf_paths(applied):
        for other, paths in owners.items():
            if other != manager and path in paths and value_at(current, path) != value_at(applied, path):
                out.append((other, path))
    return out


def path_str(path):
    out = ""
    for p in path:
        out += "." + p[2:] if p.startswith("f:") else "[%s=%s]" % next(iter(json.loads(p[2:]).items()))
    return out
