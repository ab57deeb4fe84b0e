"""RBAC for service accounts, as the apiserver's RBAC authorizer decides it:
a request is allowed when a RoleBinding in its namespace, or a
ClusterRoleBinding, binds the account (or one of its groups) to a Role or
ClusterRole with a rule matching the API group, the resource (with its
subresource, "pods/log"), the verb and, where the rule names them, the object."""

ROLES, ROLE_BINDINGS = "roles.rbac.authorization.k8s.io", "rolebindings.rbac.authorization.k8s.io"
CLUSTER_ROLES = "clusterroles.rbac.authorization.k8s.io"
CLUSTER_ROLE_BINDINGS = "clusterrolebindings.rbac.authorization.k8s.io"


def _names(subject_list, user, groups):
    for s in subject_list or []:
        kind = s.get("kind")
        if kind == "ServiceAccount" and user == "system:serviceaccount:%s:%s" % (s.get("namespace"), s.get("name")):
            return True
        if kind == "User" and s.get("name") == user:
            return True
        if kind == "Group" and s.get("name") in groups:
            return True
    return False


def _matches(rule, verb, group, resource, name):
    def has(field, value):
        values = rule.get(field) or []
        return "*" in values or value in values
    return (has("verbs", verb) and has("apiGroups", group) and has("resources", resource)
            and (not rule.get("resourceNames") or name in rule["resourceNames"]))


def allows(store, user, groups, verb, group, resource, ns, name):
    """True when a binding grants `verb` on `resource` (with its subresource)
    of `group`, in namespace `ns` (None: cluster-scoped), for object `name`."""
    bindings = [(b, ns) for b in store.list(ROLE_BINDINGS, ns, shared=True)] if ns else []
    bindings += [(b, None) for b in store.list(CLUSTER_ROLE_BINDINGS, shared=True)]
    for binding, where in bindings:
        if not _names(binding.get("subjects"), user, groups):
            continue
        ref = binding.get("roleRef") or {}
        role = store.get(ROLES, where, ref.get("name")) if ref.get("kind") == "Role" and where else \
            store.get(CLUSTER_ROLES, "", ref.get("name")) if ref.get("kind") == "ClusterRole" else None
        if role and any(_matches(r, verb, group, resource, name) for r in role.get("rules") or []):
            return True
    return False
