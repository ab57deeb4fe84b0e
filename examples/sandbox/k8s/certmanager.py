"""cert-manager, as far as its Certificate resources go (cert-manager.io/v1).

A Certificate is issued (its Secret written: kubernetes.io/tls with tls.crt, tls.key
and ca.crt, signed by the sandbox's own issuer CA, valid spec.duration) when its
Secret does not exist, when its Issuing condition is True (`cmctl renew` sets it:
reason ManuallyTriggered), or once status.renewalTime has passed (notAfter minus
spec.renewBefore, default a third of the duration), unless an issuance failed less
than an hour ago (cert-manager backs off after a failure; `ctl k8s cert-expiring`
plays one). Status as cert-manager writes it: the Ready condition, notBefore,
notAfter, renewalTime, revision; events Issuing and Issued.
"""
import base64
import os
import re
import shutil
import subprocess
import tempfile
import time

from store import clone, now_iso, parse_iso

KEY = "certificates.cert-manager.io"
BACKOFF = 3600.0   # the first retry after a failed issuance; cert-manager doubles it up to 32 h
DEFAULT_DURATION = 90 * 86400
ISSUER_CN = "Sandbox ACME Issuer (letsencrypt)"
FAILURE = ('The certificate request has failed to complete and will be retried: Failed to wait for order resource '
           '"%s-1-2730125693" to become ready: order is in "invalid" state: 403 urn:ietf:params:acme:error:unauthorized: '
           'Invalid response from http://%s/.well-known/acme-challenge/')


def go_duration(text):
    """A Go duration as cert-manager's fields take them ("2160h", "720h0m0s", "90m") in seconds; None when unset."""
    if not text:
        return None
    parts = re.findall(r'([\d.]+)(h|ms|m|s)', str(text))
    if not parts or "".join(n + u for n, u in parts) != str(text):
        raise ValueError("bad duration %r" % text)
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1, "ms": 0.001}[u] for n, u in parts)


def openssl_time(t):
    return time.strftime("%Y%m%d%H%M%SZ", time.gmtime(t))


def openssl(*args, cwd=None):
    r = subprocess.run(["openssl"] + list(args), cwd=cwd, capture_output=True, timeout=30)
    if r.returncode != 0:
        raise RuntimeError("openssl %s: %s" % (args[0], r.stderr.decode(errors="replace").strip()))


class CertManager:
    def __init__(self, controller, state_dir):
        self.ctl, self.store = controller, controller.store
        self.dir = os.path.join(state_dir or tempfile.gettempdir(), "k8s", "issuer")

    def issuer(self):
        """The issuer's CA (made once): (cert path, key path)."""
        crt, key = os.path.join(self.dir, "ca.crt"), os.path.join(self.dir, "ca.key")
        if not os.path.exists(crt):
            os.makedirs(self.dir, mode=0o700, exist_ok=True)
            openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-days", "3650", "-subj", "/CN=" + ISSUER_CN, "-keyout", key, "-out", crt)
        return crt, key

    def issue(self, cn, names, start, end):
        """A key and a certificate for cn and names (DNS), valid from start to end: (crt, key, ca) PEM."""
        ca_crt, ca_key = self.issuer()
        d = tempfile.mkdtemp(prefix="issue-")
        try:
            with open(os.path.join(d, "ca.cnf"), "w") as f:
                f.write("[ca]\ndefault_ca = issuer\n[issuer]\ndatabase = index.txt\nnew_certs_dir = .\n"
                        "serial = serial\ndefault_md = sha256\npolicy = any\ncopy_extensions = copy\n"
                        "[any]\ncommonName = supplied\n")
            open(os.path.join(d, "index.txt"), "w").close()
            with open(os.path.join(d, "serial"), "w") as f:
                f.write("%032x\n" % int.from_bytes(os.urandom(15), "big"))
            san = ",".join("DNS:" + n for n in names)
            openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", "tls.key", "-out", "tls.csr", "-subj", "/CN=" + cn,
                    *(["-addext", "subjectAltName=" + san] if san else []), cwd=d)
            openssl("ca", "-batch", "-config", "ca.cnf", "-cert", ca_crt, "-keyfile", ca_key, "-in", "tls.csr",
                    "-out", "tls.crt", "-notext", "-startdate", openssl_time(start), "-enddate", openssl_time(end), cwd=d)
            read = lambda name: open(os.path.join(d, name)).read()
            return read("tls.crt"), read("tls.key"), open(ca_crt).read()
        finally:
            shutil.rmtree(d, ignore_errors=True)

    def due(self, crt, now):
        """Why crt must be issued now (the Issuing event's message), or None."""
        spec, st = crt["spec"], crt.get("status") or {}
        if self.store.get("secrets", crt["metadata"]["namespace"], spec.get("secretName", "")) is None:
            return "Issuing certificate as Secret does not exist"
        issuing = next((c for c in st.get("conditions", []) if c["type"] == "Issuing"), {})
        if issuing.get("status") == "True":
            return issuing.get("message") or "Certificate re-issuance triggered"
        renewal, failed = parse_iso(st.get("renewalTime")), parse_iso(st.get("lastFailureTime"))
        wait = BACKOFF * 2 ** max(0, st.get("failedIssuanceAttempts", 1) - 1)
        if renewal and now >= renewal and not (failed and now < failed + wait):
            return "Renewing certificate as renewal was scheduled at " + st["renewalTime"]
        return None

    def sync(self, crt, now):
        why = self.due(crt, now)
        if why:
            self.ctl.emit(crt, "Normal", "Issuing", why, now, "cert-manager-certificates-trigger")
            self.write(crt, now, now)
            self.ctl.emit(crt, "Normal", "Issued", "The certificate has been successfully issued", now,
                          "cert-manager-certificates-issuing")

    def write(self, crt, now, start, end=None, failed=None):
        """Issue crt's Secret (valid from start for its duration, or until end) and its status.
        failed: the time of an issuance that failed after this one (the cert-expiring fault)."""
        spec, md = crt["spec"], crt["metadata"]
        duration = go_duration(spec.get("duration")) or DEFAULT_DURATION
        before = go_duration(spec.get("renewBefore")) or duration / 3
        end = end or start + duration
        names = spec.get("dnsNames") or []
        cn = spec.get("commonName") or (names[0] if names else md["name"])
        pem, key, ca = self.issue(cn, names, start - 60, end)
        issuer = spec.get("issuerRef") or {}
        old = self.store.get("secrets", md["namespace"], spec["secretName"])
        secret = clone(old) if old else {"kind": "Secret", "apiVersion": "v1",
                                          "metadata": {"name": spec["secretName"], "namespace": md["namespace"],
                                                       "creationTimestamp": now_iso(now)}}
        secret["type"] = "kubernetes.io/tls"
        secret["metadata"].setdefault("labels", {})["controller.cert-manager.io/fao"] = "true"
        secret["metadata"].setdefault("annotations", {}).update({
            "cert-manager.io/certificate-name": md["name"], "cert-manager.io/common-name": cn,
            "cert-manager.io/alt-names": ",".join(names), "cert-manager.io/issuer-name": issuer.get("name", ""),
            "cert-manager.io/issuer-kind": issuer.get("kind", "Issuer"),
            "cert-manager.io/issuer-group": issuer.get("group", "cert-manager.io")})
        secret["data"] = {k: base64.b64encode(v.encode()).decode() for k, v in
                          (("tls.crt", pem), ("tls.key", key), ("ca.crt", ca))}
        self.store.put("secrets", secret)
        new = clone(crt)
        st = new.setdefault("status", {})
        ready = {"type": "Ready", "status": "True", "reason": "Ready", "observedGeneration": md.get("generation", 1),
                 "message": "Certificate is up to date and has not expired", "lastTransitionTime": now_iso(now)}
        st["conditions"] = [ready]
        st.update(notBefore=now_iso(start - 60), notAfter=now_iso(end), renewalTime=now_iso(end - before),
                  revision=st.get("revision", 0) + 1)
        st.pop("lastFailureTime", None)
        st.pop("failedIssuanceAttempts", None)
        if failed:
            host = names[0] if names else cn
            st["conditions"].append({"type": "Issuing", "status": "False", "reason": "Failed",
                                     "observedGeneration": md.get("generation", 1), "lastTransitionTime": now_iso(failed),
                                     "message": FAILURE % (md["name"], host)})
            st.update(lastFailureTime=now_iso(failed), failedIssuanceAttempts=1)
        self.store.put(KEY, new)

    def expiring(self, crt, days, now):
        """The cert-expiring fault: crt's Secret holds a certificate with `days` left, issued a
        duration ago, and its renewal failed just now (so cert-manager waits before retrying)."""
        duration = go_duration(crt["spec"].get("duration")) or DEFAULT_DURATION
        end = now + days * 86400
        self.write(crt, now, end - duration, end, failed=now)
        self.ctl.emit(crt, "Warning", "Failed", FAILURE % (crt["metadata"]["name"], (crt["spec"].get("dnsNames") or ["?"])[0]),
                      now, "cert-manager-certificates-issuing")
