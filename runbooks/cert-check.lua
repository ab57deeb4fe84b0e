-- cert-check.lua: certificates before they expire, and a renewal that reaches the pods.
--
-- Replaces seed 004 "Certificate Renewal" (kubectl get/describe certificate,
-- delete the Secret) and the TLS part of seed 001 "Certificate and Secret
-- Rotation". Every TLS Secret of the namespace (or the cluster) and every
-- given endpoint: the certificate's expiry, its names against the hosts it
-- must serve (an Ingress's tls hosts for a Secret, the host or @name for an
-- endpoint), the whole chain. Below warn_days a warning, below critical_days,
-- expired, unreadable or not covering its host a failure. With renew_secret,
-- the Secret gets the certificate and key of cert_file and key_file (checked
-- first: valid, the key its own, the hosts covered; the old Secret kept as a
-- copy) and the workloads that mount it are restarted. Certificates managed
-- by cert-manager are renewed by cert-manager: this sandbox serves no
-- Certificate resource, so the renewal here is the Secret's.
--
--   runbook run cert-check
--   runbook run cert-check -p endpoints=api.example.com:443,10.0.0.5:8443@api.example.com -p warn_days=21
--   runbook run cert-check -p renew_secret=todo-chatbot-tls -p cert_file=tls.crt -p key_file=tls.key --step

name = "cert-check"
description = "TLS Secrets and endpoints: expiry, names and chain against thresholds; optionally a Secret renewed from PEM files and its users restarted"
version = "1.0.0"
replaces = { "001-15" }
on_failure = "undo"

param "namespace" (steps.params.namespace)
param "all_namespaces" { type = "boolean", default = false, help = "every namespace's TLS Secrets (kubectl -A)" }
param "endpoints" { default = "", help = "HOST:PORT[@NAME],... live TLS endpoints; NAME is the SNI and the name the certificate must cover (default HOST)" }
param "warn_days" { type = "integer", default = 30, help = "warn when a certificate expires within this many days" }
param "critical_days" { type = "integer", default = 7, help = "fail when a certificate expires within this many days" }
param "timeout" { type = "duration", default = "10s", help = "per endpoint: connect and TLS handshake" }
param "renew_secret" { help = "the TLS Secret to renew (in namespace) from cert_file and key_file" }
param "cert_file" { help = "PEM certificate (with its chain) for renew_secret" }
param "key_file" { help = "PEM private key for renew_secret" }
param "rollout_timeout" { type = "duration", default = "5m", help = "how long each restarted workload may take" }

-- The hosts an Ingress serves with each Secret: "ns/secret" -> {host...}.
local function ingress_hosts(ctx)
  local out = {}
  local items = k8s.list("ingresses", ctx.params.all_namespaces and { all_namespaces = true } or { namespace = ctx.params.namespace })
  for _, ing in ipairs(items) do
    for _, t in ipairs(ing.spec.tls or {}) do
      if t.secretName then
        local key = ing.metadata.namespace .. "/" .. t.secretName
        out[key] = out[key] or {}
        for _, h in ipairs(t.hosts or {}) do table.insert(out[key], h) end
      end
    end
  end
  return out
end

-- A finding: the certificate (or why there is none) against the thresholds and hosts.
local function verdict(ctx, source, cert, hosts, err)
  local row = { source = source, hosts = hosts }
  if err then
    row.verdict, row.reason = "critical", tostring(type(err) == "table" and err.message or err)
    return row
  end
  local first = cert
  for _, c in ipairs(cert.chain) do if c.not_after < first.not_after then first = c end end
  row.subject, row.names, row.not_after = cert.subject, table.concat(cert.names, ","), os.date("!%Y-%m-%d %H:%M", cert.not_after)
  row.days_left, row.sha256 = first.days_left, cert.sha256
  local whose = first == cert and "" or (" (chain: %s)"):format(first.subject)
  local missing = {}
  for _, h in ipairs(hosts) do if not tls.covers(cert, h) then missing[#missing + 1] = h end end
  if first.expired then
    row.verdict, row.reason = "critical", ("expired %d days ago%s"):format(-first.days_left, whose)
  elseif #missing > 0 then
    row.verdict, row.reason = "critical", ("does not cover %s"):format(table.concat(missing, ", "))
  elseif first.days_left < ctx.params.critical_days then
    row.verdict, row.reason = "critical", ("expires in %d days%s"):format(first.days_left, whose)
  elseif first.days_left < ctx.params.warn_days then
    row.verdict, row.reason = "warn", ("expires in %d days%s"):format(first.days_left, whose)
  else
    row.verdict, row.reason = "ok", ("%d days left"):format(first.days_left)
  end
  return row
end

local function secret_cert(s)
  local where = ("secret %s/%s"):format(s.metadata.namespace, s.metadata.name)
  local pem = s.data and s.data["tls.crt"]
  if not pem then error(where .. ": no tls.crt", 0) end
  return tls.parse(base64.decode(pem), where)
end

step "Check the TLS Secrets" {
  description = "Every kubernetes.io/tls Secret: tls.crt's chain, expiry and names against the Ingress hosts it serves",
  run = function(ctx)
    local scope = ctx.params.all_namespaces and { all_namespaces = true } or { namespace = ctx.params.namespace }
    local hosts, rows = ingress_hosts(ctx), {}
    for _, s in ipairs(k8s.list("secrets", scope)) do
      if s.type == "kubernetes.io/tls" then
        local id = s.metadata.namespace .. "/" .. s.metadata.name
        local ok, cert = pcall(secret_cert, s)
        rows[#rows + 1] = verdict(ctx, "secret " .. id, ok and cert, hosts[id] or {}, not ok and cert)
        rows[#rows].secret = s.metadata.name
      end
    end
    log.info("%d TLS Secrets in %s", #rows, ctx.params.all_namespaces and "the cluster" or ctx.params.namespace)
    return { rows = rows }
  end,
}

step "Check the endpoints" {
  description = "Each HOST:PORT[@NAME]: the certificate it presents (verified or not), its chain, expiry and names",
  run = function(ctx)
    local rows = {}
    for entry in ctx.params.endpoints:gmatch("[^,%s]+") do
      local hostname, port, sni = entry:match("^%[?([^%]@]-)%]?:(%d+)@?(.*)$")
      if not hostname then error(("param endpoints: %q is not HOST:PORT[@NAME]"):format(entry), 0) end
      local name = sni ~= "" and sni or hostname
      local ok, cert = pcall(tls.certificate, hostname, tonumber(port), { timeout = ctx.params.timeout, servername = name })
      rows[#rows + 1] = verdict(ctx, "endpoint " .. entry, ok and cert, { name }, not ok and cert)
    end
    return { rows = rows }
  end,
}

step "Report" {
  description = "One line per certificate: verdict, days left, expiry, names; fails on a critical one (unless it is being renewed)",
  needs = { "Check the TLS Secrets", "Check the endpoints" },
  run = function(ctx)
    local rows, counts, failing = {}, { ok = 0, warn = 0, critical = 0 }, {}
    for _, s in ipairs { "Check the TLS Secrets", "Check the endpoints" } do
      for _, r in ipairs(ctx.outputs[s].rows) do rows[#rows + 1] = r end
    end
    log.info("%-8s %5s  %-16s  %-50s %s", "VERDICT", "DAYS", "NOT AFTER", "CERTIFICATE", "NAMES / REASON")
    for _, r in ipairs(rows) do
      counts[r.verdict] = counts[r.verdict] + 1
      local line = ("%-8s %5s  %-16s  %-50s %s%s"):format(r.verdict:upper(), r.days_left or "-", r.not_after or "-", r.source,
        r.names and (r.names .. ": ") or "", r.reason)
      log.info("%s", line)
      if r.verdict == "critical" and not (r.secret and r.secret == ctx.params.renew_secret) then failing[#failing + 1] = r.source end
    end
    log.info("%d ok, %d warnings, %d critical", counts.ok, counts.warn, counts.critical)
    if #failing > 0 then error(("%d certificates need action now: %s"):format(#failing, table.concat(failing, ", ")), 0) end
    return { rows = rows, ok = counts.ok, warnings = counts.warn, critical = counts.critical }
  end,
}

local RENEW = function(ctx) return ctx.params.renew_secret ~= nil end

step "Replace the certificate" {
  description = "renew_secret gets cert_file and key_file (checked: parses, not near expiry, the key its own, the Ingress hosts covered); the old Secret is kept as NAME-before-STAMP",
  needs = { "Report" },
  when = RENEW,
  confirm = true,
  run = function(ctx)
    local p = ctx.params
    if not (p.cert_file and p.key_file) then error("renew_secret needs cert_file and key_file", 0) end
    local pem, key = fs.read(p.cert_file), secret.register(fs.read(p.key_file))
    local cert = tls.parse(pem, p.cert_file)
    if not tls.key_matches(pem, key, p.key_file) then error(("%s is not the private key of %s"):format(p.key_file, p.cert_file), 0) end
    local old = k8s.get("secret/" .. p.renew_secret, { namespace = p.namespace })
    if old.type ~= "kubernetes.io/tls" then error(("secret %s is %s, not kubernetes.io/tls"):format(p.renew_secret, old.type), 0) end
    local row = verdict(ctx, p.cert_file, cert, ingress_hosts(ctx)[p.namespace .. "/" .. p.renew_secret] or {})
    if row.verdict ~= "ok" then error(("%s: %s"):format(p.cert_file, row.reason), 0) end
    local copy = p.renew_secret .. "-before-" .. os.date("!%Y%m%d%H%M%S")
    k8s.create { apiVersion = "v1", kind = "Secret", type = old.type, data = old.data,
      metadata = { name = copy, namespace = p.namespace, annotations = { ["runbook/renewed-from"] = p.renew_secret } } }
    k8s.patch("secret/" .. p.renew_secret, { data = { ["tls.crt"] = base64.encode(pem), ["tls.key"] = base64.encode(key) } },
      { namespace = p.namespace, type = "merge" })
    log.info("secret %s: %s, %s (%d days left); the old one is kept as %s", p.renew_secret, cert.subject,
      table.concat(cert.names, ","), cert.days_left, copy)
    return { copy = copy, sha256 = cert.sha256 }
  end,
  undo = function(ctx, out)
    local copy = k8s.get("secret/" .. out.copy, { namespace = ctx.params.namespace })
    k8s.patch("secret/" .. ctx.params.renew_secret, { data = copy.data }, { namespace = ctx.params.namespace, type = "merge" })
    k8s.delete("secret/" .. out.copy, { namespace = ctx.params.namespace, missing_ok = true })
  end,
}

step "Restart the workloads that mount it" {
  description = "The deployments, statefulsets and daemonsets whose pods read the Secret (volumes, envFrom, env): a rolling restart each, waited for",
  needs = { "Replace the certificate" },
  confirm = true,
  run = function(ctx)
    local restarted = {}
    for _, u in ipairs(k8s.users_of("secret/" .. ctx.params.renew_secret, { namespace = ctx.params.namespace })) do
      if u.restartable then
        k8s.rollout_restart(u.kind .. "/" .. u.name, { namespace = ctx.params.namespace })
        restarted[#restarted + 1] = u.kind .. "/" .. u.name
      else
        log.info("%s/%s reads it too: its next run gets the new certificate", u.kind, u.name)
      end
    end
    for _, ref in ipairs(restarted) do
      k8s.rollout_status(ref, { namespace = ctx.params.namespace, timeout = ctx.params.rollout_timeout, fail_fast = true })
    end
    log.info("restarted: %s", #restarted > 0 and table.concat(restarted, ", ") or "(nothing mounts it)")
    return { restarted = restarted }
  end,
}

step "Verify the renewal" {
  description = "The Secret holds the new certificate, and it passes the thresholds",
  needs = { "Replace the certificate", "Restart the workloads that mount it" },
  run = function(ctx)
    if ctx.dry_run then log.info("would read secret %s back and check it holds the new certificate", ctx.params.renew_secret); return end
    local cert = secret_cert(k8s.get("secret/" .. ctx.params.renew_secret, { namespace = ctx.params.namespace }))
    if cert.sha256 ~= ctx.outputs["Replace the certificate"].sha256 then
      error(("secret %s does not hold the new certificate"):format(ctx.params.renew_secret), 0)
    end
    log.info("secret %s: the new certificate, %d days left", ctx.params.renew_secret, cert.days_left)
  end,
}
