-- tollgate: release one request's concurrency leases.
--
-- KEYS[i]  lease counters (same layout and hash tag as decide.lua)
-- ARGV[1]  now in ns since the epoch as decimal digits, or "" for TIME
-- ARGV[2]  lease owner "<store instance>:<lease id>" given to decide.lua
-- Returns the number of leases released.
--
-- Expired leases are pruned on the way; a counter left with no live lease is
-- deleted, otherwise rewritten with a TTL that ends with its last lease.

local owner = ARGV[2]
local released = 0
for i = 1, #KEYS do
  local k = KEYS[i]
  local raw = redis.call('GET', k)
  if raw and string.sub(raw, 1, 1) == 'l' then
    local parts, ttl = { 'l' }, 0
    for o, x, c in string.gmatch(string.sub(raw, 2), '(%S+) (%d+) (%d+)') do
      local d = diff(parse(x), now)
      if o == owner then
        released = released + 1
      elseif d > 0 then
        parts[#parts + 1] = o .. ' ' .. x .. ' ' .. c
        ttl = math.max(ttl, d)
      end
    end
    local ms = math.ceil(ttl / 1000000)
    if #parts > 1 and ms > 0 then
      redis.call('SET', k, table.concat(parts, ' '), 'PX', string.format('%.0f', ms))
    else
      redis.call('DEL', k)
    end
  end
end
return released
