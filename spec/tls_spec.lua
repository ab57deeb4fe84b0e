-- tls: certificates made and served by the openssl CLI, read by tls.parse and
-- tls.certificate, compared with what `openssl x509` says about the same files.
local tls = require("tls")
local cli = require("spec.support.cli")
local certs = require("spec.support.certs")

local function raises(f)
  local ok, err = pcall(f)
  assert.is_false(ok, "expected an error")
  assert.is_table(err, "expected a structured error, got " .. tostring(err))
  assert.are.equal("tls", err.module)
  return err
end

-- luaossl says "IP", openssl's text "IP Address".
local function openssl_style(sans)
  local out = {}
  for i, s in ipairs(sans) do out[i] = (s:gsub("^IP:", "IP Address:")) end
  return out
end

describe("tls", function()
  local dir, ca, leaf, old, plain
  setup(function()
    dir = cli.tmpdir()
    ca = certs.make(dir, "ca", { cn = "Spec Root CA", is_ca = true, days = 365 })
    leaf = certs.make(dir, "leaf", { cn = "api.example.test", sans = "DNS:api.example.test,DNS:*.apps.example.test,IP:127.0.0.1",
      days = 5, ca = ca })
    old = certs.make(dir, "old", { cn = "old.example.test", sans = "DNS:old.example.test", expired = true })
    plain = certs.make(dir, "plain", { cn = "nosan.example.test", days = 90 })
  end)
  teardown(cli.cleanup)

  describe("parse", function()
    it("reads notAfter, subject, issuer and SANs as openssl x509 does, and the whole chain", function()
      local c = tls.parse(leaf.pem, "leaf.crt")
      assert.are.equal(certs.not_after(leaf.cert), c.not_after)
      assert.are.same(certs.sans(leaf.cert), openssl_style(c.sans))
      assert.are.same({ "api.example.test", "*.apps.example.test", "127.0.0.1" }, c.names)
      assert.are.equal(certs.openssl("x509 -noout -subject -nameopt oneline,-space_eq -in " .. cli.quote(leaf.cert))
        :match("subject=(.-)%s*$"):gsub("=", " = "), c.subject)
      assert.are.equal("CN = Spec Root CA", c.issuer)
      assert.are.equal("api.example.test", c.common_name)
      assert.are.equal(certs.openssl("x509 -noout -serial -in " .. cli.quote(leaf.cert)):match("serial=(%x+)"), c.serial)
      assert.are.equal(certs.openssl("x509 -noout -fingerprint -sha256 -in " .. cli.quote(leaf.cert))
        :match("Fingerprint=([%x:]+)"):gsub(":", ""), c.sha256)
      assert.is_true(c.days_left == 4 or c.days_left == 5, tostring(c.days_left))
      assert.is_false(c.expired)
      assert.are.equal(2, #c.chain)
      assert.are.equal("CN = Spec Root CA", c.chain[2].subject)
      assert.are.equal(certs.not_after(ca.cert), c.chain[2].not_after)
    end)

    it("says an expired certificate is expired, with negative days left", function()
      local c = tls.parse(old.pem)
      assert.are.equal(certs.not_after(old.cert), c.not_after)
      assert.is_true(c.expired)
      assert.is_true(c.days_left < 0)
    end)

    it("matches host names against SANs (a wildcard is one label), else the CN", function()
      local c = tls.parse(leaf.pem)
      for name, want in pairs { ["api.example.test"] = true, ["API.Example.Test"] = true, ["x.apps.example.test"] = true,
        ["apps.example.test"] = false, ["a.b.apps.example.test"] = false, ["127.0.0.1"] = true, ["other.example.test"] = false,
        ["Spec Root CA"] = false } do
        assert.are.equal(want, tls.covers(c, name), name)
      end
      assert.is_true(tls.covers(tls.parse(plain.pem), "nosan.example.test"))
    end)

    it("tells whether a private key is the certificate's", function()
      assert.is_true(tls.key_matches(leaf.pem, cli.slurp(leaf.key)))
      assert.is_false(tls.key_matches(leaf.pem, cli.slurp(old.key)))
      local err = raises(function() tls.key_matches(leaf.pem, "junk", "key.pem") end)
      assert.are.equal("bad_key", err.code)
      assert.are.equal("key.pem: the key is not a PEM private key", err.message)
    end)

    for _, case in ipairs {
      { "no PEM block", "hello", "secret x/y: no certificate in it" },
      { "a broken block", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        "secret x/y: certificate 1 of 1 is not a valid X.509 certificate" },
      { "not a string", 42, "secret x/y: expected PEM text, got number" },
    } do
      it("refuses " .. case[1] .. " with an error naming where", function()
        local err = raises(function() tls.parse(case[2], "secret x/y") end)
        assert.are.equal("bad_pem", err.code)
        assert.truthy(err.message:find(case[3], 1, true), err.message)
      end)
    end
  end)

  describe("certificate", function()
    it("reads the chain a live server presents, even one no client would verify", function()
      local port, stop = certs.serve(leaf)
      local ok, c = pcall(tls.certificate, "127.0.0.1", port, { timeout = 10 })
      stop()
      assert(ok, tostring(c))
      assert.are.equal(certs.not_after(leaf.cert), c.not_after)
      assert.are.same(certs.sans(leaf.cert), openssl_style(c.sans))
      assert.are.equal("CN = Spec Root CA", c.issuer)
      assert.are.equal(port, c.port)
      port, stop = certs.serve(old)
      ok, c = pcall(tls.certificate, "localhost", port, { timeout = 10 })
      stop()
      assert(ok, tostring(c))
      assert.is_true(c.expired)
    end)

    it("names host:port and why: refused, not TLS, timeout, unknown host", function()
      local port, stop = certs.silent()
      local t0 = os.time()
      local err = raises(function() tls.certificate("127.0.0.1", port, { timeout = 1 }) end)
      stop()
      assert.are.equal("timeout", err.code)
      assert.truthy(err.message:find("127.0.0.1:" .. port .. ": TLS handshake timed out after 1s", 1, true), err.message)
      assert.is_true(os.time() - t0 < 10)
      port = certs.free_port()
      err = raises(function() tls.certificate("127.0.0.1", port, { timeout = 2 }) end)
      assert.are.equal("connection_refused", err.code)
      assert.truthy(err.message:find("127.0.0.1:" .. port .. ": connecting: Connection refused", 1, true), err.message)
      local http_port = os.getenv("PROMETHEUS_URL"):match(":(%d+)")
      err = raises(function() tls.certificate("127.0.0.1", http_port, { timeout = 5 }) end)
      assert.are.equal("not_tls", err.code)
      assert.truthy(err.message:find("127.0.0.1:" .. http_port .. ": TLS handshake failed (not a TLS server?)", 1, true), err.message)
      err = raises(function() tls.certificate("nothing.invalid", 443, { timeout = 5 }) end)
      assert.are.equal("cannot_resolve", err.code)
    end)

    it("checks its arguments", function()
      assert.has_error(function() tls.certificate("127.0.0.1", "https") end,
        "tls.certificate: port must be a number, got https")
      assert.has_error(function() tls.certificate("127.0.0.1", 443, { timeout = -1 }) end)
    end)
  end)
end)
