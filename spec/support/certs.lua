--- Certificates for specs, made with the openssl CLI (an independent tool):
-- certs.make(dir, name, {cn =, sans = "DNS:a,IP:127.0.0.1", days = 30 | expired = true, ca = other})
-- -> {cert = path, key = path, pem = text}; a cert with `ca` is signed by it
-- (its pem is then the chain: the leaf, then the CA). certs.openssl(args) runs
-- openssl and returns its output; certs.serve(cert) serves one on a free local
-- TLS port (openssl s_server) -> port, stop().
local cli = require("spec.support.cli")
local sb = require("spec.sandbox.sandbox_helper")

local M = {}
local q = cli.quote

function M.openssl(args)
  local p = io.popen("openssl " .. args .. " 2>&1")
  local out = p:read("a")
  local ok = p:close()
  assert(ok, "openssl " .. args .. ": " .. out)
  return out
end

local CA_CONF = [[
[ca]
default_ca = d
[d]
database = DIR/index.txt
new_certs_dir = DIR
serial = DIR/serial
default_md = sha256
policy = p
copy_extensions = copy
unique_subject = no
[p]
commonName = supplied
]]

-- A certificate whose validity ended a while ago: only `openssl ca` takes explicit dates.
local function expired(dir, name, csr, key)
  cli.write(dir .. "/ca.cnf", (CA_CONF:gsub("DIR", (dir:gsub("%%", "%%%%")))))
  cli.write(dir .. "/index.txt", "")
  cli.write(dir .. "/serial", "01\n")
  M.openssl(("ca -batch -config %s -selfsign -keyfile %s -in %s -out %s -startdate 20250101000000Z "
    .. "-enddate 20250201000000Z -notext"):format(q(dir .. "/ca.cnf"), q(key), q(csr), q(dir .. "/" .. name .. ".crt")))
end

function M.make(dir, name, o)
  local key, csr, crt = dir .. "/" .. name .. ".key", dir .. "/" .. name .. ".csr", dir .. "/" .. name .. ".crt"
  local ext = o.sans and (" -addext " .. q("subjectAltName=" .. o.sans)) or ""
  if o.is_ca then ext = ext .. " -addext basicConstraints=critical,CA:TRUE" end
  M.openssl(("req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout %s -out %s -subj %s%s"):format(
    q(key), q(csr), q("/CN=" .. o.cn), ext))
  if o.expired then
    expired(dir, name, csr, key)
  elseif o.ca then
    M.openssl(("x509 -req -in %s -CA %s -CAkey %s -CAcreateserial -days %d -copy_extensions copy -out %s"):format(
      q(csr), q(o.ca.cert), q(o.ca.key), o.days or 30, q(crt)))
  else
    M.openssl(("x509 -req -in %s -signkey %s -days %d -copy_extensions copy -out %s"):format(
      q(csr), q(key), o.days or 30, q(crt)))
  end
  local pem = cli.slurp(crt)
  if o.ca then
    pem = pem .. cli.slurp(o.ca.cert)
    cli.write(crt, pem)
  end
  return { cert = crt, key = key, pem = pem }
end

--- notAfter of a certificate file as epoch seconds, read by openssl and date.
function M.not_after(path)
  local text = M.openssl("x509 -noout -enddate -in " .. q(path)):match("notAfter=(.-)%s*$")
  return tonumber((sb.sh("date -u -d " .. q(text) .. " +%s"):match("%d+")))
end

--- The SANs as `openssl x509 -ext subjectAltName` prints them: {"DNS:a", "IP Address:1.2.3.4"}.
function M.sans(path)
  local out = M.openssl("x509 -noout -ext subjectAltName -in " .. q(path))
  local list = {}
  for s in (out:match("\n%s*(.-)%s*$") or ""):gmatch("[^,]+") do list[#list + 1] = s:match("^%s*(.-)%s*$") end
  return list
end

local function up(port)
  return select(2, sb.sh(("bash -c 'exec 3<>/dev/tcp/127.0.0.1/%d'"):format(port)))
end

--- A local port nothing listens on (perl: python3 may start slowly here).
function M.free_port()
  return tonumber((sb.sh([[perl -MIO::Socket::INET -e 'print IO::Socket::INET->new(LocalAddr => "127.0.0.1:0", Listen => 1)->sockport']]):match("%d+")))
end

--- Serves cert on 127.0.0.1 with openssl s_server until stop(); waits until it accepts.
function M.serve(cert)
  local port = M.free_port()
  local pid = sb.sh(("openssl s_server -quiet -www -accept 127.0.0.1:%d -cert %s -key %s -cert_chain %s </dev/null >/dev/null 2>&1 & echo $!")
    :format(port, q(cert.cert), q(cert.key), q(cert.cert))):match("%d+")
  local stop = function() os.execute("kill " .. pid .. " 2>/dev/null") end
  if not sb.wait_until(20, function() return up(port) end) then stop(); error("openssl s_server did not start", 2) end
  return port, stop
end

--- A local port that accepts connections and never answers -> port, stop().
function M.silent()
  local port = M.free_port()
  local pid = sb.sh(([[perl -MIO::Socket::INET -e '$s = IO::Socket::INET->new(LocalAddr => "127.0.0.1:%d", Listen => 8, ReuseAddr => 1); sleep 120' >/dev/null 2>&1 & echo $!]]):format(port)):match("%d+")
  local stop = function() os.execute("kill " .. pid .. " 2>/dev/null") end
  if not sb.wait_until(20, function() return up(port) end) then stop(); error("the silent listener did not start", 2) end
  return port, stop
end

return M
