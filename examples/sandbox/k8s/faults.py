"""Faults the sandbox can inject, driven by `ctl k8s ...` through /_sandbox/."""
import copy
import re
import subprocess
import time

import podexec
import workload

from controller import memory_limit

NS = "todo-chatbot"


def find_deployment(store, name):
    for ns, n in [(NS, name), (NS, "todo-chatbot-" + name)]:
        d = store.get("deployments.apps", ns, n)
        if d:
            return d
    for d in store.list("deployments.apps"):
        if d["metadata"]["name"] == name:
            return d
    raise LookupError('deployment "%s" not found' % name)


def duration(text):
    m = re.match(r'^([\d.]+)(ms|s|m)?$', text)
    if not m:
        raise ValueError("bad duration %r (use 500ms, 2s, 1m)" % text)
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, None: 1}[m.group(2)]


def app_container(d):
    return d["spec"]["template"]["spec"]["containers"][0]


def app_image(d):
    return app_container(d)["image"]


def crashloop(cluster, f, args):
    d = find_deployment(cluster.store, args[0])
    f.crash.add((d["metadata"]["namespace"], d["metadata"]["name"], app_image(d)))
    return "deployment %s: pods with image %s now crash-loop" % (d["metadata"]["name"], app_image(d))


def oom(cluster, f, args):
    d = find_deployment(cluster.store, args[0])
    app = d["spec"]["template"]["spec"]["containers"][0]
    f.oom[(d["metadata"]["namespace"], d["metadata"]["name"])] = memory_limit(app)
    return "deployment %s: app containers are OOM-killed every 15s (until their memory limit is raised above %s)" % (
        d["metadata"]["name"], ((app.get("resources") or {}).get("limits") or {}).get("memory", "none"))


def bad_image(cluster, f, args):
    d = find_deployment(cluster.store, args[0])
    image = app_image(d)
    bad = image.rsplit(":", 1)[0] + ":does-not-exist"
    f.bad_images.add(bad)
    f.bad_image_undo[(d["metadata"]["namespace"], d["metadata"]["name"])] = image
    new = copy.deepcopy(d)
    new["spec"]["template"]["spec"]["containers"][0]["image"] = bad
    res = lookup_res("deployments")
    cluster.api.commit(res, d, new, {}, "sandbox-fault")
    return "deployment %s: image set to %s (cannot be pulled)" % (d["metadata"]["name"], bad)


def helm_upgrade(cluster, f, args):
    """helm-upgrade APP TAG: `helm upgrade todo-chatbot --set APP.image.tag=TAG`, as helm
    leaves it: a new release record deployed, the last one superseded, the Deployment's
    image changed. `reset --world` undoes it."""
    import base64
    import helmrelease
    import resources
    import seed
    app, tag = args[0], args[1]
    records = [s for s in cluster.store.list("secrets", NS) if s.get("type") == "helm.sh/release.v1"
               and s["metadata"]["labels"].get("name") == "todo-chatbot"]
    last = max(records, key=lambda s: int(s["metadata"]["labels"]["version"]))
    rel = helmrelease.decode(base64.b64decode(last["data"]["release"]))
    tags = {name: v["image"]["tag"] for name, v in rel["config"].items()}
    if app not in tags:
        raise LookupError('release todo-chatbot has no app "%s" (apps: %s)' % (app, ", ".join(sorted(tags))))
    tags[app] = tag
    secrets = resources.lookup("", "v1", "secrets")
    rel["info"]["status"] = "superseded"
    cluster.api.commit(secrets, last, helmrelease.secret(rel), {}, "helm")
    new = seed.chart_release(rel["version"] + 1, "deployed", "Upgrade complete", tags, time.time(), time.time())
    new["info"]["first_deployed"] = rel["info"]["first_deployed"]
    cluster.api.create(secrets, NS, helmrelease.secret(new), {}, "helm")
    d = find_deployment(cluster.store, app)
    changed = copy.deepcopy(d)
    app_container(changed)["image"] = app_image(d).rsplit(":", 1)[0] + ":" + tag
    cluster.api.commit(lookup_res("deployments"), d, changed, {}, "helm")
    return "release todo-chatbot: revision %d deployed (%s at %s), revision %d superseded" % (
        new["version"], app, tag, rel["version"])


def change_template(cluster, f, d, change):
    """A release that changes the pod template (change(spec) edits it); reset undoes it while
    the template is still the fault's."""
    new = copy.deepcopy(d)
    change(new["spec"]["template"]["spec"])
    key = (d["metadata"]["namespace"], d["metadata"]["name"])
    f.template_undo.setdefault(key, (None, d["spec"]["template"]["spec"]))
    f.template_undo[key] = (new["spec"]["template"]["spec"], f.template_undo[key][1])
    cluster.api.commit(lookup_res("deployments"), d, new, {}, "sandbox-fault")


def unschedulable(cluster, f, args):
    d = find_deployment(cluster.store, args[0])

    def change(spec):
        spec["containers"][0].setdefault("resources", {}).setdefault("requests", {})["cpu"] = "8"
    change_template(cluster, f, d, change)
    return "deployment %s: the app container requests 8 CPUs, more than any node has: new pods stay Pending" % (
        d["metadata"]["name"])


def pvc_pending(cluster, f, args):
    d = find_deployment(cluster.store, args[0])
    ns, claim = d["metadata"]["namespace"], d["metadata"]["name"] + "-data"
    if cluster.store.get("persistentvolumeclaims", ns, claim) is None:
        import resources
        cluster.api.create(resources.lookup("", "v1", "persistentvolumeclaims"), ns, {
            "metadata": {"name": claim}, "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "fast-ssd",
                                                   "resources": {"requests": {"storage": "5Gi"}}}}, {}, "sandbox-fault")
    f.claims.add((ns, claim))

    def change(spec):
        spec.setdefault("volumes", []).append({"name": "data", "persistentVolumeClaim": {"claimName": claim}})
        spec["containers"][0].setdefault("volumeMounts", []).append({"name": "data", "mountPath": "/data"})
    change_template(cluster, f, d, change)
    return ("deployment %s: pods mount PVC %s of storage class fast-ssd, which does not exist: the claim stays "
            "Pending and new pods unschedulable" % (d["metadata"]["name"], claim))


def pull_secret(cluster, f, args):
    d = find_deployment(cluster.store, args[0])
    import controller
    image = controller.PRIVATE_REGISTRY + "/todo-chatbot/" + app_image(d).rsplit("/", 1)[-1]

    def change(spec):
        spec["containers"][0]["image"] = image
        spec["imagePullSecrets"] = [{"name": "regcred"}]
    change_template(cluster, f, d, change)
    return ("deployment %s: image %s from a registry that wants credentials, imagePullSecrets regcred (which does "
            "not exist): ErrImagePull until a kubernetes.io/dockerconfigjson Secret regcred with an auth for %s "
            "exists" % (d["metadata"]["name"], image, controller.PRIVATE_REGISTRY))


def evicted(cluster, f, args):
    """evicted DEPLOYMENT: a pod of it the kubelet evicted for memory pressure an hour ago, left
    behind Failed (reason Evicted), as `kubectl get pods --field-selector=status.phase=Failed` lists it."""
    d = find_deployment(cluster.store, args[0])
    ns, app = d["metadata"]["namespace"], app_container(d)["name"]
    name = "%s-evicted-%d" % (d["metadata"]["name"], len(f.evicted) + 1)
    node = next((n["metadata"]["name"] for n in cluster.store.list("nodes")), "")
    then = time.time() - 3600
    from store import now_iso
    cluster.store.put("pods", {"kind": "Pod", "apiVersion": "v1",
        "metadata": {"name": name, "namespace": ns, "labels": {"sandbox/evicted-from": d["metadata"]["name"]},
                     "creationTimestamp": now_iso(then - 600)},
        "spec": dict(copy.deepcopy(d["spec"]["template"]["spec"]), nodeName=node),
        "status": {"phase": "Failed", "reason": "Evicted", "startTime": now_iso(then - 600),
                   "message": "The node was low on resource: memory. Threshold quantity: 100Mi, available: 51200Ki. "
                              "Container %s was using 1843Mi, request is 256Mi, has larger consumption of request." % app,
                   "containerStatuses": [{"name": c["name"], "image": c["image"], "ready": False, "restartCount": 0,
                                          "state": {"terminated": {"exitCode": 137, "reason": "ContainerStatusUnknown",
                                                                   "finishedAt": now_iso(then)}}}
                                         for c in d["spec"]["template"]["spec"]["containers"]]}})
    f.evicted.add((ns, name))
    return "pod %s/%s: evicted (Failed, reason Evicted) on node %s" % (ns, name, node)


def node_notready(cluster, f, args):
    if cluster.store.get("nodes", "", args[0]) is None:
        raise LookupError('node "%s" not found' % args[0])
    f.notready.add(args[0])
    return "node %s stops posting status" % args[0]


def share(text):
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 1:
        raise ValueError("bad rate %r (use a percentage such as 10%% or a fraction such as 0.1)" % text)
    return value


def api_errors(cluster, f, args):
    value = share(args[0])
    code = int(args[1]) if len(args) > 1 and args[1].isdigit() else 500 if len(args) == 1 else 0
    if code not in (429, 500, 503, 504):
        raise ValueError("bad status code %r (use 429, 500, 503 or 504)" % args[1])
    f.api_error_rate, f.api_error_code = value, code
    return "%.0f%% of API requests fail with %d" % (f.api_error_rate * 100, f.api_error_code)


def api_latency(cluster, f, args):
    f.api_latency = duration(args[0])
    return "every API request is delayed by %gs" % f.api_latency


def exec_protocol(cluster, f, args):
    """exec-protocol v4: pods/exec speaks only v4.channel.k8s.io, as an API server before 1.30."""
    if args[0] not in ("v4", "v5"):
        raise ValueError("bad protocol %r (use v4 or v5)" % args[0])
    f.exec_protocols = ("%s.channel.k8s.io" % args[0],)
    return "pods/exec serves only %s" % f.exec_protocols[0] if args[0] == "v4" else "pods/exec serves %s" % ", ".join(podexec.PROTOCOLS)


LOG_ERROR = "upstream call failed: connection reset by peer (fault log-errors)"


def log_errors(cluster, f, args):
    """log-errors DEPLOYMENT [MESSAGE]: half the app's log lines from 5 minutes ago on are
    ERROR lines with MESSAGE (logger app.upstream), as an incident found after it began."""
    d = find_deployment(cluster.store, args[0])
    app = d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") or app_container(d)["name"]
    message = " ".join(args[1:]) or LOG_ERROR
    workload.LOG_ERRORS[(d["metadata"]["namespace"], app)] = (time.time() - 300, message, "app.upstream", 0.5)
    return "deployment %s: half its log lines from 5 minutes ago on are ERROR %r" % (d["metadata"]["name"], message)


def cert_expiring(cluster, f, args):
    """cert-expiring NAMESPACE/NAME [DAYS]: the Certificate's Secret holds a certificate with DAYS
    (5) left, and cert-manager's renewal failed just now (it retries in an hour)."""
    ns, _, name = args[0].rpartition("/")
    crt = cluster.store.get("certificates.cert-manager.io", ns or NS, name)
    if crt is None:
        raise LookupError('certificate "%s" not found in %s' % (name, ns or NS))
    days = float(args[1]) if len(args) > 1 else 5.0
    cluster.controller.certs.expiring(crt, days, time.time())
    return "certificate %s/%s: %g days left, its renewal failed (retried in an hour)" % (ns or NS, name, days)


DAPR_COMPONENTS = ("operator", "placement", "sentry", "injector")


def dapr_stuck(cluster, f, args):
    """dapr-stuck COMPONENT: the Dapr control plane's COMPONENT pods that run now stay Running
    and Ready but fail at their work: they log their component's error (from 5 minutes ago
    on), and a stuck injector injects no daprd into new pods. A new pod (a restart) works."""
    if args[0] not in DAPR_COMPONENTS:
        raise ValueError("unknown Dapr component %r (one of %s)" % (args[0], ", ".join(DAPR_COMPONENTS)))
    pods = [p for p in cluster.store.list("pods", "dapr-system")
            if p["metadata"].get("labels", {}).get("app.kubernetes.io/component") == args[0]
            and not p["metadata"].get("deletionTimestamp")]
    if not pods:
        raise LookupError("no %s pod runs in dapr-system" % args[0])
    for p in pods:
        workload.DAPR_STUCK[p["metadata"]["uid"]] = time.time() - 300
    return "dapr %s: pods %s are stuck (errors in their logs%s) until they are replaced" % (
        args[0], ", ".join(p["metadata"]["name"] for p in pods),
        "; new Dapr-enabled pods get no daprd" if args[0] == "injector" else "")


# Appends to an old rotated log until /var/log is $0 percent full; the file is $1.
FILL = ('set -- "$0" "$1" $(df -Pk /var/log | tail -n 1); want=$(($4 * $1 / 100 - $5)); '
        'if [ "$want" -gt 0 ]; then head -c "${want}K" /dev/zero >>"$2" || exit; fi; touch -d "14 days ago" "$2"')


def running_pods(store, d):
    sel = d["spec"]["selector"].get("matchLabels", {})
    return [p for p in store.list("pods", d["metadata"]["namespace"])
            if p.get("status", {}).get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")
            and all(p["metadata"].get("labels", {}).get(k) == v for k, v in sel.items())]


def disk_full(cluster, f, args):
    """disk-full DEPLOYMENT [PERCENT]: in each running pod, an old rotated log (APP.log.14,
    14 days old) fills /var/log to PERCENT (95) full."""
    if not podexec.can_unshare():   # the command would run on this machine's own /var/log
        raise ValueError("disk-full needs user namespaces (the pods' own /var/log), which this machine refuses")
    d = find_deployment(cluster.store, args[0])
    pct = int(args[1]) if len(args) > 1 and args[1].isdigit() else 95 if len(args) == 1 else 0
    if not 1 <= pct <= 100:
        raise ValueError("bad percentage %r (use 1 to 100)" % args[1])
    app = d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") or app_container(d)["name"]
    pods = running_pods(cluster.store, d)
    if not pods:
        raise LookupError("deployment %s has no running pod" % d["metadata"]["name"])
    for p in pods:
        argv, cwd = podexec.pod_command(cluster.store, cluster.state_dir, p, ["sh", "-c", FILL, str(pct), "/var/log/%s.log.14" % app])
        r = subprocess.run(argv, cwd=cwd, capture_output=True, timeout=60)
        if r.returncode != 0:
            raise ValueError("filling /var/log in pod %s failed: %s" % (p["metadata"]["name"], r.stderr.decode(errors="replace")))
    return "deployment %s: /var/log is %d%% full in pods %s (%s.log.14)" % (
        d["metadata"]["name"], pct, ", ".join(p["metadata"]["name"] for p in pods), app)


def metric_target(cluster, text):
    """APP:TAG is one image version of an app (backend:v1.5.0); anything else names a deployment."""
    if ":" in text:
        app, tag = text.split(":", 1)
        if not app or not tag:
            raise ValueError("bad target %r (use DEPLOYMENT or APP:VERSION, e.g. backend:v1.5.0)" % text)
        return ("version", app, tag)
    d = find_deployment(cluster.store, text)
    return ("deployment", d["metadata"]["namespace"], d["metadata"]["name"])


def metrics(cluster, f, args):
    """metrics errors|latency|capacity|rate-limit|memory|pool|scrape-fail|reminder-failures|reset ...: the pods' /metrics."""
    mf = cluster.metrics.faults
    cmd, rest = args[0], args[1:]
    need = {"errors": 2, "latency": 2, "capacity": 2, "rate-limit": 2, "memory": 2, "pool": 2, "scrape-fail": 1, "reminder-failures": 1, "reset": 0}
    if cmd not in need:
        raise ValueError("unknown metrics fault %r; known: %s" % (cmd, ", ".join(sorted(need))))
    if len(rest) != need[cmd]:
        raise ValueError("metrics %s needs %d argument(s)" % (cmd, need[cmd]))
    if cmd == "reset":
        mf.reset()
        return "metric faults cleared"
    if cmd == "reminder-failures":
        mf.reminder_failures = share(rest[0])
        return "%.0f%% of reminder deliveries fail" % (mf.reminder_failures * 100)
    target = metric_target(cluster, rest[0])
    if cmd == "scrape-fail":
        mf.scrape_fail.add(target)
        return "scrapes of %s's pods fail with 503" % rest[0]
    if cmd == "errors":
        mf.errors[target] = share(rest[1])
        return "%s: %.1f%% of requests answer 500" % (rest[0], mf.errors[target] * 100)
    if cmd == "pool":
        mf.pool[target] = share(rest[1])
        return "%s: database pool %.0f%% in use" % (rest[0], mf.pool[target] * 100)
    if cmd == "capacity":
        try:
            mf.capacity[target] = float(rest[1])
        except ValueError:
            mf.capacity[target] = 0
        if mf.capacity[target] <= 0:
            raise ValueError("bad capacity %r (requests per second per pod, e.g. 5)" % rest[1])
        return "%s: a pod serving more than %g requests/s slows down" % (rest[0], mf.capacity[target])
    if cmd == "rate-limit":
        try:
            mf.rate_limit[target] = float(rest[1])
        except ValueError:
            mf.rate_limit[target] = 0
        if mf.rate_limit[target] <= 0:
            raise ValueError("bad rate limit %r (requests per second per API key, e.g. 10)" % rest[1])
        return "%s: %g requests/s per API key, the rest answer 429" % (rest[0], mf.rate_limit[target])
    if cmd == "latency":
        mf.latency[target] = duration(rest[1])
        if mf.latency[target] <= 0:
            raise ValueError("latency must be above 0")
        return "%s: median latency %gs" % (rest[0], mf.latency[target])
    mib = float(rest[1]) if rest[1].replace(".", "", 1).isdigit() else -1
    if mib <= 0:
        raise ValueError("bad growth %r (MiB per second, e.g. 2)" % rest[1])
    mf.memory[target] = (mib, time.time())
    return "%s: memory grows by %g MiB/s from now" % (rest[0], mib)


def reset(cluster, f, args):
    cluster.metrics.faults.reset()
    workload.LOG_ERRORS.clear()
    workload.DAPR_STUCK.clear()
    if args[:1] == ["--world"]:
        cluster.reseed()
        return "world reseeded, faults cleared"
    for (ns, name), (faulted, spec) in f.template_undo.items():
        d = cluster.store.get("deployments.apps", ns, name)
        if d and d["spec"]["template"]["spec"] == faulted:
            new = copy.deepcopy(d)
            new["spec"]["template"]["spec"] = spec
            cluster.api.commit(lookup_res("deployments"), d, new, {}, "sandbox-fault")
    for ns, claim in f.claims:
        cluster.store.remove("persistentvolumeclaims", ns, claim)
    for ns, name in f.evicted:
        cluster.store.remove("pods", ns, name)
    for (ns, name), image in f.bad_image_undo.items():
        d = cluster.store.get("deployments.apps", ns, name)
        if d and d["spec"]["template"]["spec"]["containers"][0]["image"] in f.bad_images:
            new = copy.deepcopy(d)
            new["spec"]["template"]["spec"]["containers"][0]["image"] = image
            cluster.api.commit(lookup_res("deployments"), d, new, {}, "sandbox-fault")
    f.reset()
    return "faults cleared"


def pause(cluster, f, args):
    cluster.controller.paused = True    # under the store lock, which a tick holds throughout
    return "controllers paused: no object changes by itself until resume"


def resume(cluster, f, args):
    cluster.controller.paused = False
    return "controllers resumed"


def status(cluster, f, args):
    return dict(f.describe(), metrics=cluster.metrics.faults.describe(),
                log_errors=sorted("%s/%s: %s" % (ns, app, v[1]) for (ns, app), v in workload.LOG_ERRORS.items()),
                dapr_stuck=sorted(p["metadata"]["name"] for p in cluster.store.list("pods", "dapr-system")
                                  if p["metadata"]["uid"] in workload.DAPR_STUCK))


def lookup_res(name):
    import resources
    return resources.lookup("apps", "v1", name)


def populate(cluster, f, args):
    import populate as P
    return P.populate(cluster, args)


def depopulate(cluster, f, args):
    import populate as P
    return P.depopulate(cluster, args)


def requests(cluster, f, args):
    """requests [reset]: the API requests served since the last reset, by kind."""
    counts = dict(cluster.requests, total=sum(cluster.requests.values()))
    if args[:1] == ["reset"]:
        cluster.requests.clear()
    return counts


COMMANDS = {"crashloop": (crashloop, 1), "oom": (oom, 1), "bad-image": (bad_image, 1),
            "node-notready": (node_notready, 1), "api-errors": (api_errors, 1),
            "api-latency": (api_latency, 1), "reset": (reset, 0), "status": (status, 0),
            "pause": (pause, 0), "resume": (resume, 0), "metrics": (metrics, 1),
            "exec-protocol": (exec_protocol, 1), "log-errors": (log_errors, 1), "disk-full": (disk_full, 1),
            "dapr-stuck": (dapr_stuck, 1), "cert-expiring": (cert_expiring, 1),
            "unschedulable": (unschedulable, 1), "evicted": (evicted, 1), "pvc-pending": (pvc_pending, 1), "pull-secret": (pull_secret, 1),
            "helm-upgrade": (helm_upgrade, 2),
            "populate": (populate, 2), "depopulate": (depopulate, 1), "requests": (requests, 0)}


def run(cluster, cmd, args):
    if cmd not in COMMANDS:
        return 404, {"error": "unknown command %r; known: %s" % (cmd, ", ".join(sorted(COMMANDS)))}
    fn, nargs = COMMANDS[cmd]
    if len(args) < nargs:
        return 400, {"error": "%s needs %d argument(s)" % (cmd, nargs)}
    try:
        with cluster.store.lock:
            return 200, {"result": fn(cluster, cluster.controller.faults, args)}
    except (LookupError, ValueError) as e:
        return 400, {"error": str(e).strip("'\"")}
