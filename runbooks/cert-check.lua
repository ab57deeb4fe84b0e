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
-- copy) and the workloads that mount it are restarted. cert-manager's
-- Certificates (kubectl get certificate; describe) get a row each: Ready, the
-- certificate in their Secret, the renewal time and a failed renewal. With
-- renew (names, or "expiring": those within warn_days), each is renewed as
-- `cmctl renew` does (its Issuing condition set; cert-manager issues a new
-- Secret), without seed 004's window in which the Secret is deleted, and the
-- new certificate is waited for and read back.
--
--   runbook run cert-check
--   runbook run cert-check -p renew=expiring --step
--   runbook run cert-check -p endpoints=api.example.com:443,10.0.0.5:8443@api.example.com -p warn_days=21
--   runbook run cert-check -p renew_secret=todo-chatbot-tls -p cert_file=tls.crt -p key_file=tls.key --step

name = "cert-check"
description = "TLS Secrets and endpoints: expiry, names and chain against thresholds; optionally a Secret renewed from PEM files and its users restarted"
version = "1.1.0"
replaces = { "001-15", "004-14" }
on_failure = "undo"

param "namespace" (steps.params.namespace)
param "all_namespaces" { type = "boolean", default = false, help = "every namespace's TLS Secrets (kubectl -A)" }
param "endpoints" { type = "list", default = "", help = "HOST:PORT[@NAME],... live TLS endpoints; NAME is the SNI and the name the certificate must cover (default HOST)" }
param "warn_days" { type = "integer", default = 30, help = "warn when a certificate expires within this many days" }
param "critical_days" { type = "integer", default = 7, help = "fail when a certificate expires within this many days" }
param "timeout" { type = "duration", default = "10s", help = "per endpoint: connect and TLS handshake" }
param "renew_secret" { help = "the TLS Secret to renew (in namespace) from cert_file and key_file" }
param "cert_file" { help = "PEM certificate (with its chain) for renew_secret" }
param "key_file" { help = "PEM private key for renew_secret" }
param "renew" { type = "list", default = "", help = "cert-manager Certificates to renew now (cmctl renew): NAME,... or expiring (those within warn_days)" }
param "renew_timeout" { type = "duration", default = "5m", help = "how long cert-manager may take to issue each renewed certificate" }
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

-- The Ready condition's and the other conditions of a cert-manager object, by type.
local function conditions(o)
  local out = {}
  for _, c in ipairs((o.status or {}).conditions or {}) do out[c.type] = c end
  return out
end

step "Check the Certificates" {
  description = "kubectl get certificate; describe: each cert-manager Certificate Ready, the certificate in its Secret, its renewal time, a renewal that failed",
  run = function(ctx)
    local scope = ctx.params.all_namespaces and { all_namespaces = true } or { namespace = ctx.params.namespace }
    local ok, items = pcall(k8s.list, "certificates.cert-manager.io", scope)
    if not ok then
      if type(items) == "table" and items.code == "unknown_resource" then
        log.info("cert-manager is not installed (no certificates.cert-manager.io)")
        return { rows = {}, renew = {} }
      end
      error(items, 0)
    end
    local hosts, rows, renew = ingress_hosts(ctx), {}, {}
    local wanted = {}
    for _, n in ipairs(ctx.params.renew) do wanted[n] = true end
    for _, c in ipairs(items) do
      local ns, st, cond = c.metadata.namespace, c.status or {}, conditions(c)
      local sid = ns .. "/" .. c.spec.secretName
      local s = k8s.get("secret/" .. c.spec.secretName, { namespace = ns, missing_ok = true })
      local cert, err
      if s then
        local good, parsed = pcall(secret_cert, s)
        if good then cert = parsed else err = parsed end
      else err = ("its secret %s does not exist"):format(c.spec.secretName) end
      local row = verdict(ctx, "certificate " .. ns .. "/" .. c.metadata.name, cert, hosts[sid] or c.spec.dnsNames or {}, err)
      row.certificate, row.secret, row.namespace, row.revision = c.metadata.name, c.spec.secretName, ns, st.revision
      local ready, issuing = cond.Ready or {}, cond.Issuing or {}
      local notes = {}
      if ready.status ~= "True" then notes[#notes + 1] = ("not Ready: %s"):format(tostring(ready.message or ready.reason)) end
      if issuing.status == "False" and issuing.reason == "Failed" then
        notes[#notes + 1] = ("its last renewal failed at %s: %s"):format(tostring(st.lastFailureTime), tostring(issuing.message))
        if row.verdict == "ok" then row.verdict = "warn" end
      elseif issuing.status == "True" then notes[#notes + 1] = "being issued: " .. tostring(issuing.message) end
      if st.renewalTime then notes[#notes + 1] = "cert-manager renews it at " .. st.renewalTime end
      if #notes > 0 then row.reason = row.reason .. "; " .. table.concat(notes, "; ") end
      if wanted[c.metadata.name] or (wanted.expiring and row.days_left and row.days_left < ctx.params.warn_days) then
        renew[#renew + 1] = { name = c.metadata.name, namespace = ns, secret = c.spec.secretName, revision = st.revision or 0,
          sha256 = row.sha256 }
        wanted[c.metadata.name] = nil
      end
      rows[#rows + 1] = row
    end
    wanted.expiring = nil
    for n in pairs(wanted) do error(("param renew: no Certificate %s in %s"):format(n, ctx.params.namespace), 0) end
    log.info("%d cert-manager Certificates; %d to renew", #rows, #renew)
    return { rows = rows, renew = renew }
  end,
}

step "Check the endpoints" {
  description = "Each HOST:PORT[@NAME]: the certificate it presents (verified or not), its chain, expiry and names",
  run = function(ctx)
    local rows = {}
    for _, entry in ipairs(ctx.params.endpoints) do
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
  needs = { "Check the TLS Secrets", "Check the Certificates", "Check the endpoints" },
  run = function(ctx)
    local rows, counts, failing = {}, { ok = 0, warn = 0, critical = 0 }, {}
    -- a Secret that a Certificate manages is its Certificate's row; one being renewed does not fail the run
    local managed, renewing = {}, {}
    for _, r in ipairs(ctx.outputs["Check the Certificates"].rows) do managed[r.namespace .. "/" .. r.secret] = true end
    for _, c in ipairs(ctx.outputs["Check the Certificates"].renew) do renewing[c.namespace .. "/" .. c.secret] = true end
    for _, s in ipairs { "Check the TLS Secrets", "Check the Certificates", "Check the endpoints" } do
      for _, r in ipairs(ctx.outputs[s].rows) do
        if not (s == "Check the TLS Secrets" and managed[r.source:match("^secret (.*)$")]) then rows[#rows + 1] = r end
      end
    end
    log.info("%-8s %5s  %-16s  %-50s %s", "VERDICT", "DAYS", "NOT AFTER", "CERTIFICATE", "NAMES / REASON")
    for _, r in ipairs(rows) do
      counts[r.verdict] = counts[r.verdict] + 1
      local line = ("%-8s %5s  %-16s  %-50s %s%s"):format(r.verdict:upper(), r.days_left or "-", r.not_after or "-", r.source,
        r.names and (r.names .. ": ") or "", r.reason)
      log.info("%s", line)
      local renewed = r.certificate and renewing[r.namespace .. "/" .. r.secret] or r.secret and r.secret == ctx.params.renew_secret
      if r.verdict == "critical" and not renewed then failing[#failing + 1] = r.source end
    end
    log.info("%d ok, %d warnings, %d critical", counts.ok, counts.warn, counts.critical)
    if #failing > 0 then
      local managed_failing = table.concat(failing, " "):find("certificate ", 1, true)
      error(("%d certificates need action now: %s%s"):format(#failing, table.concat(failing, ", "),
        managed_failing and " (cert-manager's: -p renew=expiring renews them)" or ""), 0)
    end
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

step "Renew the Certificates" {
  description = "cmctl renew of each Certificate of param renew: its Issuing condition set (reason ManuallyTriggered); wait until cert-manager has issued the new certificate, Ready",
  needs = { "Report", "Check the Certificates" },
  when = function(ctx) return #ctx.params.renew > 0 end,
  confirm = true,
  run = function(ctx)
    local done = {}
    for _, c in ipairs(ctx.outputs["Check the Certificates"].renew) do
      local obj = k8s.get("certificates.cert-manager.io/" .. c.name, { namespace = c.namespace })
      local conds, keep = conditions(obj), {}
      if (conds.Issuing or {}).status == "True" then
        log.info("certificate %s/%s is being issued already", c.namespace, c.name)
      else
        for _, cond in ipairs((obj.status or {}).conditions or {}) do
          if cond.type ~= "Issuing" then keep[#keep + 1] = cond end
        end
        keep[#keep + 1] = { type = "Issuing", status = "True", reason = "ManuallyTriggered",
          message = "Certificate re-issuance manually triggered", observedGeneration = obj.metadata.generation,
          lastTransitionTime = os.date("!%Y-%m-%dT%H:%M:%SZ") }
        k8s.patch("certificates.cert-manager.io/" .. c.name, { status = { conditions = keep } },
          { namespace = c.namespace, type = "merge", subresource = "status" })
      end
      done[#done + 1] = c
    end
    if not ctx.dry_run then
      for _, c in ipairs(done) do
        time.wait_until({ timeout = ctx.params.renew_timeout, what = ("cert-manager to issue certificate %s/%s"):format(c.namespace, c.name) },
          function()
            local obj = k8s.get("certificates.cert-manager.io/" .. c.name, { namespace = c.namespace })
            local conds = conditions(obj)
            return ((obj.status or {}).revision or 0) > c.revision and (conds.Ready or {}).status == "True"
              and (conds.Issuing or {}).status ~= "True"
          end)
        log.info("certificate %s/%s: issued again", c.namespace, c.name)
      end
    end
    return { renewed = done }
  end,
}

-- The Secrets renewed by this run: renew_secret's, and those of the Certificates renewed.
local function renewed_secrets(ctx)
  local out = {}
  if not ctx.skipped("Replace the certificate") then out[#out + 1] = { namespace = ctx.params.namespace, name = ctx.params.renew_secret } end
  if not ctx.skipped("Renew the Certificates") then
    for _, c in ipairs(ctx.outputs["Renew the Certificates"].renewed) do out[#out + 1] = { namespace = c.namespace, name = c.secret } end
  end
  return out
end

step "Restart the workloads that mount it" {
  description = "The deployments, statefulsets and daemonsets whose pods read a renewed Secret (volumes, envFrom, env): a rolling restart each, waited for",
  uses = { "Replace the certificate", "Renew the Certificates" },
  when = function(ctx) return ctx.params.renew_secret ~= nil or #ctx.params.renew > 0 end,
  confirm = true,
  run = function(ctx)
    local restarted = {}
    for _, s in ipairs(renewed_secrets(ctx)) do
      for _, u in ipairs(k8s.users_of("secret/" .. s.name, { namespace = s.namespace })) do
        if u.restartable then
          k8s.rollout_restart(u.kind .. "/" .. u.name, { namespace = s.namespace })
          restarted[#restarted + 1] = { namespace = s.namespace, ref = u.kind .. "/" .. u.name }
        else
          log.info("%s/%s reads it too: its next run gets the new certificate", u.kind, u.name)
        end
      end
    end
    local names = {}
    for _, r in ipairs(restarted) do
      k8s.rollout_status(r.ref, { namespace = r.namespace, timeout = ctx.params.rollout_timeout, fail_fast = true })
      names[#names + 1] = r.ref
    end
    restarted = names
    log.info("restarted: %s", #restarted > 0 and table.concat(restarted, ", ") or "(nothing mounts it)")
    return { restarted = restarted }
  end,
}

step "Verify the renewal" {
  description = "Each renewed Secret holds the new certificate, and it passes the thresholds",
  uses = { "Replace the certificate", "Renew the Certificates" },
  needs = { "Restart the workloads that mount it", "Check the Certificates" },
  run = function(ctx)
    for _, s in ipairs(renewed_secrets(ctx)) do
      if ctx.dry_run then log.info("would read secret %s/%s back and check it holds a new certificate", s.namespace, s.name)
      else
        local cert = secret_cert(k8s.get("secret/" .. s.name, { namespace = s.namespace }))
        local replaced = s.name == ctx.params.renew_secret and s.namespace == ctx.params.namespace
          and not ctx.skipped("Replace the certificate") and ctx.outputs["Replace the certificate"].sha256
        local before
        for _, c in ipairs(ctx.outputs["Check the Certificates"].renew) do
          if c.namespace == s.namespace and c.secret == s.name then before = c.sha256 end
        end
        if (replaced and cert.sha256 ~= replaced) or (not replaced and cert.sha256 == before) then
          error(("secret %s/%s does not hold the new certificate"):format(s.namespace, s.name), 0)
        end
        local row = verdict(ctx, "secret " .. s.namespace .. "/" .. s.name, cert, {})
        if row.verdict ~= "ok" then error(("secret %s/%s: the new certificate %s"):format(s.namespace, s.name, row.reason), 0) end
        log.info("secret %s/%s: the new certificate, %d days left", s.namespace, s.name, cert.days_left)
      end
    end
  end,
}
