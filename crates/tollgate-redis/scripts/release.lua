-- tollgate: release one request's concurrency leases.
--
-- KEYS[i]  lease counters (same layout and hash tag as decide.lua)
-- ARGV[1]  now in ns since the epoch as decimal digits, or "" for TIME
-- ARGV[2]  lease owner "<store instance>:<lease id>" given to decide.lua
-- Returns the number of leases released.
--
-- Expired leases are pruned on the way; a counter left with no live lease is
-- deleted, otherwise rewritten with a TTL that ends with its last lease.

local E9 = 1000000000

local function parse(s)
  local n = #s
  if n <= 9 then return { 0, tonumber(s) } end
  return { tonumber(string.sub(s, 1, n - 9)), tonumber(string.sub(s, n - 8)) }
end

local function fmt(a)
  if a[1] > 0 then return string.format('%d%09d', a[1], a[2]) end
  return string.format('%d', a[2])
end

local function diff(a, b) return (a[1] - b[1]) * E9 + (a[2] - b[2]) end

local now_str = ARGV[1]
if now_str == '' then
  local t = redis.call('TIME')
  now_str = fmt({ tonumber(t[1]), tonumber(t[2]) * 1000 })
end
local now = parse(now_str)
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
