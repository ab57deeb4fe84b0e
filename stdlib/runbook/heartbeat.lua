--- Work that must go on while a run waits, such as renewing a held Kubernetes
-- Lease. The engine beats between steps; time.sleep, time.wait_until and the
-- k8s module's waits beat while they wait, at least every `M.every` seconds.
-- A hook that raises (a lease lost to another holder) fails the step or wait
-- that beat.
local M = { every = 1 }

local hooks = {}

function M.add(fn)
  hooks[#hooks + 1] = fn
end

function M.beat()
  for _, fn in ipairs(hooks) do fn() end
end

--- host.sleep(seconds), beating at least every M.every seconds.
function M.sleep(host, seconds)
  local done = host.now() + seconds
  while true do
    M.beat()
    local left = done - host.now()
    if left <= 0 then return end
    host.sleep(#hooks > 0 and math.min(left, M.every) or left)
  end
end

return M
