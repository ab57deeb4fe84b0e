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
local x509 = require("openssl.x509")
local pkey = require("openssl.pkey")
local native = require("runbook.tls")
local host = require("runbook.host")

local M = {}
local raise = host.raiser "tls"

local BLOCK = "%-%-%-%-%-BEGIN CERTIFICATE%-%-%-%-%-.-%-%-%-%-%-END CERTIFICATE%-%-%-%-%-"
local DAY = 86400

--- Whether a PEM block's body is one DER SEQUENCE of the length it declares.
-- Only such text is handed to luaossl: its error path reads the file name of
-- OpenSSL's error record after clearing the record, which frees it under
-- OpenSSL 3 (a use after free, caught by AddressSanitizer).
local function der_sequence(pem)
  local body = type(pem) == "string" and pem:match("^%s*%-%-%-%-%-BEGIN [^\n]-%-%-%-%-%-(.-)%-%-%-%-%-END ")
  local der = body and require("base64").decode(body)
  if not der or #der < 2 or der:byte(1) ~= 0x30 then return false end
  local len, head = der:byte(2), 2
  if len >= 0x80 then
    local k = len - 0x80
    if k < 1 or k > 4 or #der < 2 + k then return false end
    len = 0
    for i = 1, k do len = len * 256 + der:byte(2 + i) end
    head = 2 + k
  end
  return head + len == #der
end

--- luaossl's `new(text, "PEM")` of `pem`, or nil when it is not one.
local function openssl_new(kind, pem)
  if not der_sequence(pem) then return nil end
  local ok, v = pcall(kind.new, pem, "PEM")
  return ok and v or nil
end

-- "CN = a, O = b" as `openssl x509 -subject` prints it, and the CN.
local function name_text(name)
  local parts, cn = {}, nil
  for k, v in pairs(name) do
    parts[#parts + 1] = ("%s = %s"):format(k, v)
    if k == "CN" then cn = cn or v end
  end
  return table.concat(parts, ", "), cn
end

--- A DER length at `i` of `der`: the length, and where its content starts.
local function der_length(der, i)
  local n = der:byte(i) or 0
  if n < 0x80 then return n, i + 1 end
  local len = 0
  for j = 1, n - 0x80 do len = len * 256 + (der:byte(i + j) or 0) end
  return len, i + 1 + (n - 0x80)
end

--- An iPAddress name's text: a.b.c.d, or IPv6 as inet_ntop writes it.
local function ip_text(raw)
  if #raw == 4 then return ("%d.%d.%d.%d"):format(raw:byte(1, 4)) end
  local groups = {}
  for i = 1, #raw - 1, 2 do groups[#groups + 1] = ("%x"):format(raw:byte(i) * 256 + raw:byte(i + 1)) end
  local text = ":" .. table.concat(groups, ":") .. ":"
  local longest
  for run in text:gmatch(":0:[0:]*") do
    if not longest or #run > #longest then longest = run end
  end
  if longest and #longest > 3 then text = text:gsub(longest:gsub("%p", "%%%0"), "::", 1) end
  return (text:gsub("^:([^:])", "%1"):gsub("([^:]):$", "%1"))
end

-- GeneralName's context tags (RFC 5280) of the names a certificate check reads.
local SAN_KINDS = { [0x81] = "email", [0x82] = "DNS", [0x86] = "URI", [0x87] = "IP" }

--- The subjectAltName of certificate `c` in order, as {kind, value} pairs,
-- read from the extension's DER: luaossl's own getSubjectAlt leaves what it
-- decodes unfreed (a leak a certificate).
local function subject_alt(c)
  local ok, ext = pcall(c.getExtension, c, "subjectAltName")
  local der, out = ok and ext and ext:getData() or "", {}
  if der:byte(1) ~= 0x30 then return out end
  local len, i = der_length(der, 2)
  local stop = math.min(i + len, #der + 1)
  while i < stop do
    local tag = der:byte(i)
    local n, at = der_length(der, i + 1)
    local kind, v = SAN_KINDS[tag], der:sub(at, at + n - 1)
    if kind then out[#out + 1] = { kind, kind == "IP" and ip_text(v) or v } end
    i = at + n
  end
  return out
end

local function describe(c, now)
  local not_before, not_after = c:getLifetime()
  local sans, names = {}, {}
  for _, san in ipairs(subject_alt(c)) do
    local kind, v = san[1], san[2]
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
    local c = openssl_new(x509, block)
    if not c then
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
  opts = opts or {}
  if type(opts) ~= "table" then error("tls.certificate: options must be a table", 2) end
  local o = { servername = opts.servername,
    timeout = opts.timeout ~= nil and require("duration").check(opts.timeout, "tls.certificate timeout") or nil }
  local cert = parse_chain(native.peer_chain(hostname, n, o), ("%s:%d"):format(hostname, n))
  cert.host, cert.port = hostname, n
  return cert
end

function M.key_matches(pem, key_pem, where)
  where = where or "PEM text"
  local block = type(pem) == "string" and pem:match(BLOCK)
  local cert = openssl_new(x509, block)
  if not cert then raise { op = "key_matches", code = "bad_pem", message = where .. ": no valid certificate in it" } end
  local key = openssl_new(pkey, key_pem)
  if not key then raise { op = "key_matches", code = "bad_key", message = where .. ": the key is not a PEM private key" } end
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
