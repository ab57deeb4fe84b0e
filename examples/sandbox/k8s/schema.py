"""Known fields of the built-in kinds, for server-side field validation.

kubectl sends `fieldValidation=Strict` by default (it sees from /openapi/v3 that
the server validates); the apiserver then refuses unknown fields with 400
BadRequest, warns about them with `Warn` (the default without the parameter) and
drops them silently with `Ignore`. Server-side apply refuses them always.

A schema is a dict of field -> schema, ANY (not checked: free maps, statuses and
the deeper corners), or [schema] for a list of objects. Only what kubectl users
write often is spelled out; custom resources (Dapr's) preserve unknown fields.
"""
ANY = None

META = {k: ANY for k in (
    "name", "generateName", "namespace", "selfLink", "uid", "resourceVersion", "generation",
    "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "labels", "annotations",
    "ownerReferences", "finalizers", "managedFields")}


def kind(**fields):
    """A top-level object: apiVersion, kind, metadata, then its own fields."""
    return dict({"apiVersion": ANY, "kind": ANY, "metadata": META}, **fields)


def fields(names, **typed):
    return dict({k: ANY for k in names.split()}, **typed)


PROBE = fields("exec httpGet tcpSocket grpc initialDelaySeconds timeoutSeconds periodSeconds successThreshold "
               "failureThreshold terminationGracePeriodSeconds")
CONTAINER = fields(
    "name image command args workingDir envFrom resources resizePolicy restartPolicy volumeMounts "
    "volumeDevices lifecycle terminationMessagePath terminationMessagePolicy imagePullPolicy securityContext "
    "stdin stdinOnce tty",
    ports=[fields("name hostPort containerPort protocol hostIP")],
    env=[fields("name value valueFrom")],
    livenessProbe=PROBE, readinessProbe=PROBE, startupProbe=PROBE)
POD_SPEC = fields(
    "volumes ephemeralContainers restartPolicy terminationGracePeriodSeconds activeDeadlineSeconds dnsPolicy "
    "nodeSelector serviceAccountName serviceAccount automountServiceAccountToken nodeName hostNetwork hostPID "
    "hostIPC shareProcessNamespace securityContext imagePullSecrets hostname subdomain affinity schedulerName "
    "tolerations hostAliases priorityClassName priority dnsConfig readinessGates runtimeClassName "
    "enableServiceLinks preemptionPolicy overhead topologySpreadConstraints setHostnameAsFQDN os hostUsers "
    "schedulingGates resourceClaims resources",
    containers=[CONTAINER], initContainers=[CONTAINER])
TEMPLATE = {"metadata": META, "spec": POD_SPEC}

SCHEMAS = {
    "pods": kind(spec=POD_SPEC, status=ANY),
    "deployments.apps": kind(spec=fields("replicas selector strategy minReadySeconds revisionHistoryLimit paused "
                                         "progressDeadlineSeconds", template=TEMPLATE), status=ANY),
    "statefulsets.apps": kind(spec=fields("replicas selector serviceName podManagementPolicy updateStrategy "
                                          "revisionHistoryLimit minReadySeconds volumeClaimTemplates ordinals "
                                          "persistentVolumeClaimRetentionPolicy", template=TEMPLATE), status=ANY),
    "replicasets.apps": kind(spec=fields("replicas minReadySeconds selector", template=TEMPLATE), status=ANY),
    "services": kind(spec=fields(
        "selector clusterIP clusterIPs type externalIPs sessionAffinity loadBalancerIP loadBalancerSourceRanges "
        "externalName externalTrafficPolicy healthCheckNodePort publishNotReadyAddresses sessionAffinityConfig "
        "ipFamilies ipFamilyPolicy allocateLoadBalancerNodePorts loadBalancerClass internalTrafficPolicy "
        "trafficDistribution", ports=[fields("name protocol appProtocol port targetPort nodePort")]), status=ANY),
    "configmaps": kind(data=ANY, binaryData=ANY, immutable=ANY),
    "secrets": kind(data=ANY, stringData=ANY, type=ANY, immutable=ANY),
    "persistentvolumeclaims": kind(spec=fields("accessModes selector resources volumeName storageClassName volumeMode "
                                               "dataSource dataSourceRef volumeAttributesClassName"), status=ANY),
    "serviceaccounts": kind(secrets=ANY, imagePullSecrets=ANY, automountServiceAccountToken=ANY),
    "namespaces": kind(spec=ANY, status=ANY),
    "nodes": kind(spec=ANY, status=ANY),
    "endpoints": kind(subsets=ANY),
    "events": kind(**fields("involvedObject reason message source firstTimestamp lastTimestamp count type "
                            "eventTime series action related reportingComponent reportingInstance")),
    "leases.coordination.k8s.io": kind(spec=fields("holderIdentity leaseDurationSeconds acquireTime renewTime "
                                                   "leaseTransitions strategy preferredHolder")),
    "horizontalpodautoscalers.autoscaling": kind(spec=fields("scaleTargetRef minReplicas maxReplicas metrics behavior"),
                                                 status=ANY),
    "ingresses.networking.k8s.io": kind(spec=fields("ingressClassName defaultBackend tls rules"), status=ANY),
    "networkpolicies.networking.k8s.io": kind(spec=fields("podSelector ingress egress policyTypes"), status=ANY),
    "customresourcedefinitions.apiextensions.k8s.io": kind(spec=ANY, status=ANY),
}


def unknown_fields(res_key, obj):
    """The unknown fields of obj as (path, parent dict, key), outermost first; [] for kinds without a schema."""
    schema = SCHEMAS.get(res_key)
    out = []
    if schema is not None:
        _walk(obj, schema, [], out)
    return out


def _walk(value, schema, path, out):
    if schema is ANY:
        return
    if isinstance(schema, list):
        for i, item in enumerate(value if isinstance(value, list) else []):
            _walk(item, schema[0], path + [(i, item)], out)
        return
    if not isinstance(value, dict):
        return
    for k, v in value.items():
        if k in schema:
            _walk(v, schema[k], path + [k], out)
        else:
            out.append((path + [k], value, k))


def dotted(path):
    """spec.template.spec.containers[0].imagePullPolicyy, as the strict JSON decoder names a field."""
    s = ""
    for p in path:
        s += "[%d]" % p[0] if isinstance(p, tuple) else ("." if s else "") + p
    return s


def typed(path):
    """.spec.template.spec.containers[name="web"].x, as server-side apply names a field."""
    s = ""
    for p in path:
        if isinstance(p, tuple):
            i, item = p
            s += '[name="%s"]' % item["name"] if isinstance(item, dict) and "name" in item else "[%d]" % i
        else:
            s += "." + p
    return s


def prune(found):
    for _, parent, key in found:
        parent.pop(key, None)
