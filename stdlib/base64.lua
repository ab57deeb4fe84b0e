--- base64 (RFC 4648): Kubernetes Secret data, kubeconfig *-data fields,
-- binary Kafka keys in backups, MIME headers.
--
--   base64.encode(bytes) -> text
--   base64.decode(text) -> bytes | nil   (whitespace ignored; the URL-safe
--                                         alphabet accepted; nil when not base64)
local M = {}

local ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
local VALUE = {}
for i = 1, 64 do VALUE[ALPHABET:byte(i)] = i - 1 end
VALUE[("-"):byte()], VALUE[("_"):byte()] = 62, 63

function M.encode(s)
  return (s:gsub("..?.?", function(c)
    local a, b, d = c:byte(1, 3)
    local n = a * 65536 + (b or 0) * 256 + (d or 0)
    local out = {}
    for i = 1, 4 do
      local idx = (n >> (6 * (4 - i))) & 63
      out[i] = ALPHABET:sub(idx + 1, idx + 1)
    end
    if not b then out[3], out[4] = "=", "=" elseif not d then out[4] = "=" end
    return table.concat(out)
  end))
end

function M.decode(s)
  s = s:gsub("%s", ""):gsub("=+$", "")
  local out, bits, nbits = {}, 0, 0
  for i = 1, #s do
    local v = VALUE[s:byte(i)]
    if not v then return nil end
    bits, nbits = ((bits << 6) | v) & 0xffffff, nbits + 6
    if nbits >= 8 then
      nbits = nbits - 8
      out[#out + 1] = string.char((bits >> nbits) & 0xff)
    end
  end
  return table.concat(out)
end

return M
