--- tls: X.509 certificates of TLS Secrets and live endpoints, read with
-- Debian's lua-luaossl (the handshake itself in modules/tls.c).
--
--   tls.parse(pem, where) -> cert       the first certificate of a PEM text (a
--       chain's leaf), with cert.chain = every certificate in it, leaf first;
--       `where` names the text in errors ("secret todo-chatbot/api-tls")
--   tls.certificate(host, port, {timeout = 10, servername = host}) -> cert
--       the certificate the server presents, valid or not (expired,
--       self-signed, another name), with cert.chain as the server sent it
--   tls.covers(cert, name) -> boolean    a SAN (or, with no SANs, the CN)
--       matches the host name or IP address, a wildcard for one label
--   tls.key_matches(pem, key_pem, where) -> boolean   the private key is the
--       certificate's (its public half is the certificate's public key)
--
-- A cert is {subject, issuer, common_name, sans = {"DNS:a.example", "IP:10.0.0.1"},
-- names = {"a.example", "10.0.0.1"}, serial (hex, as `openssl x509 -serial`),
-- not_before, not_after (epoch seconds), days_left (whole days until not_after,
-- negative once expired), expired, sha256 (fingerprint, hex)}.
--
-- Errors are structured (module "tls"): op "parse", code "bad_pem", naming
-- `where` and which certificate; op "peer_chain" (see modules/tls.c) naming
-- host:port, code "connection_refused", "timeout", "not_tls", ...
local x509 = require "openssl.x509"
local pkey = require "openssl.pkey"
local native = require "runbook.tls"
local host = require "runbook.host"

local M = {}
local raise = host.raiser "tls"

local BLOCK = "%-%-%-%-%-BEGIN CERTIFICATE%-%-%-%-%-.-%-%-%-%-%-END CERTIFICATE%-%-%-%-%-"
local DAY = 86400

-- "CN = a, O = b" as `openssl x509 -subject` prints it, and the CN.
local function name_text(name)
  local parts, cn = {}, nil
  for k, v in pairs(name) do
    parts[#parts + 1] = ("%s = %s"):format(k, v)
    if k == "CN" then cn = cn or v end
  end
  return table.concat(parts, ", "), cn
end

local function describe(c, now)
  local not_before, not_after = c:getLifetime()
  local sans, names = {}, {}
  for kind, v in pairs(c:getSubjectAlt() or {}) do
    sans[#sans + 1] = kind .. ":" .. v
    if kind == "DNS" or kind == "IP" then names[#names + 1] = v end
  end
  local subject, cn = name_text(c:getSubject())
  return {
    subject = subject, issuer = (name_text(c:getIssuer())), common_name = cn,
    sans = sans, names = names, serial = c:getSerial():toHex():upper(),
    not_before = math.floor(not_before), not_after = math.floor(not_after),
    days_left = math.floor((not_after - now) / DAY), expired = not_after <= now,
    sha256 = c:digest("sha256", "x"):upper(),
  }
end

local function parse_chain(blocks, where)
  local now, chain = os.time(), {}
  for i, block in ipairs(blocks) do
    local ok, c = pcall(x509.new, block, "PEM")
    if not ok then
      raise { op = "parse", code = "bad_pem", message = ("%s: certificate %d of %d is not a valid X.509 certificate"):format(
        where, i, #blocks) }
    end
    chain[i] = describe(c, now)
  end
  local leaf = chain[1]
  leaf.chain = chain
  return leaf
end

function M.parse(pem, where)
  where = where or "PEM text"
  if type(pem) ~= "string" then
    raise { op = "parse", code = "bad_pem", message = ("%s: expected PEM text, got %s"):format(where, type(pem)) }
  end
  local blocks = {}
  for block in pem:gmatch(BLOCK) do blocks[#blocks + 1] = block end
  if #blocks == 0 then
    raise { op = "parse", code = "bad_pem", message = ("%s: no certificate in it (no -----BEGIN CERTIFICATE----- block)"):format(where) }
  end
  return parse_chain(blocks, where)
end

function M.certificate(hostname, port, opts)
  if type(hostname) ~= "string" or hostname == "" then error("tls.certificate: expected a host name", 2) end
  local n = math.tointeger(tonumber(port))
  if not n then error(("tls.certificate: port must be a number, got %s"):format(tostring(port)), 2) end
  local cert = parse_chain(native.peer_chain(hostname, n, opts), ("%s:%d"):format(hostname, n))
  cert.host, cert.port = hostname, n
  return cert
end

function M.key_matches(pem, key_pem, where)
  where = where or "PEM text"
  local block = type(pem) == "string" and pem:match(BLOCK)
  local ok, cert = pcall(x509.new, block or "", "PEM")
  if not ok then raise { op = "key_matches", code = "bad_pem", message = where .. ": no valid certificate in it" } end
  local ok_key, key = pcall(pkey.new, type(key_pem) == "string" and key_pem or "", "PEM")
  if not ok_key then raise { op = "key_matches", code = "bad_key", message = where .. ": the key is not a PEM private key" } end
  return cert:getPublicKey():toPEM("public") == key:toPEM("public")
end

-- One SAN or CN pattern against a name: exact (case-insensitive), or "*."
-- standing for exactly one leftmost label.
local function match(pattern, name)
  pattern, name = pattern:lower(), name:lower()
  if pattern == name then return true end
  local rest = pattern:match("^%*(%..+)$")
  return rest ~= nil and name:sub(-#rest) == rest and not name:sub(1, -#rest - 1):find("[.]") and #name > #rest
end

function M.covers(cert, name)
  local list = cert.names
  if #cert.sans == 0 and cert.common_name then list = { cert.common_name } end
  for _, pattern in ipairs(list) do
    if match(pattern, name) then return true end
  end
  return false
end

return M
