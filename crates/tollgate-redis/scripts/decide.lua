-- tollgate: decide every limit of one request, atomically (one EVALSHA).
--
-- Why one script: reading a counter, deciding and writing it back must not
-- interleave with another decision, or replicas over-admit (the read-then-
-- write race behind Kong #5311, APISIX #12592, boulder #7780). Redis runs a
-- script without interleaving, so every check of the request is read,
-- evaluated and (only if the request is admitted) written in one step.
--
-- KEYS[i]  counter of check i: "<prefix>{<scope hex>}:<counter hex>". Every
--          key of one call carries the same hash tag in a Cluster.
-- ARGV[1]  now, nanoseconds since the Unix epoch as decimal digits; ""
--          means the Redis server clock (TIME), which is what production uses
--          so that replicas with skewed clocks agree.
-- ARGV[2]  lease owner "<store instance>:<lease id>" (concurrency checks).
-- ARGV[3 + 5(i-1) .. 7 + 5(i-1)]  check i:
--          kind  "g" token bucket (GCRA)  p1 = capacity, p2 = interval ns
--                "s" sliding window       p1 = limit,    p2 = sub-bucket width ns
--                "c" calendar window      p1 = limit,    p2 = window end (ns since epoch)
--                "l" concurrency lease    p1 = limit,    p2 = lease TTL ns
--          cost, blocking ("1"/"0"), p1, p2 (all decimal).
--
-- Returns {admitted, now, then per check: flags, remaining, reset_ns, retry_after_ns}
--   admitted  1 when every blocking check admits (only then is anything written)
--   now       the instant used, decimal string
--   flags     bit 0 admit, bit 1 never (cost above the limit's capacity)
--   numbers   integers, or decimal strings when above 2^53
--
-- The math is tollgate-core's src/algorithm/*.rs, transcribed. Lua numbers are
-- doubles, so instants (about 1.7e18 ns) are never used as plain numbers:
-- they are kept as {seconds, nanoseconds} pairs, and only differences to
-- `now` (exact below 2^53 ns, 104 days) are computed as numbers.
--
-- Every key written gets a TTL in the same SET (PX): when it expires the
-- counter is back to its fresh state, so no key ever lives without a TTL.

local E9 = 1000000000
local EXACT = 9007199254740992 -- 2^53

local function parse(s) -- decimal string -> {hi, lo}
  local n = #s
  if n <= 9 then
    return { 0, tonumber(s) }
  end
  return { tonumber(string.sub(s, 1, n - 9)), tonumber(string.sub(s, n - 8)) }
end

local function fmt(a)
  if a[1] > 0 then
    return string.format('%d%09d', a[1], a[2])
  end
  return string.format('%d', a[2])
end

local function diff(a, b) -- a - b in ns
  return (a[1] - b[1]) * E9 + (a[2] - b[2])
end

local function add(a, d) -- a + d ns (d integral, may be negative)
  local q = math.floor(d / E9)
  local hi, lo = a[1] + q, a[2] + (d - q * E9)
  while lo >= E9 do hi, lo = hi + 1, lo - E9 end
  while lo < 0 do hi, lo = hi - 1, lo + E9 end
  return { hi, lo }
end

local function idiv(a, b) -- floor(a / b) for integral a >= 0, b > 0
  local q = math.floor(a / b)
  if q * b > a then q = q - 1 elseif (q + 1) * b <= a then q = q + 1 end
  return q
end

local function divmod(s, w) -- floor(s / w), s mod w for a decimal string s
  local q, r = 0, 0
  for i = 1, #s do
    r = r * 10 + string.byte(s, i) - 48
    local d = math.floor(r / w)
    r = r - d * w
    if r < 0 then d, r = d - 1, r + w elseif r >= w then d, r = d + 1, r - w end
    q = q * 10 + d
  end
  return q, r
end

local function num(x) -- reply value: integer when exact, else decimal string
  if x < 0 then x = 0 end
  if x < EXACT then return x end
  return string.format('%.0f', x)
end

-- now
local now_str = ARGV[1]
if now_str == '' then
  local t = redis.call('TIME')
  now_str = fmt({ tonumber(t[1]), tonumber(t[2]) * 1000 })
end
local now = parse(now_str)
local owner = ARGV[2]

-- Each function takes the raw stored string (or false) and the check, and
-- returns admit, never, remaining, reset, retry_after, next state, ttl ns.

local function gcra(raw, cost, cap, interval)
  local ahead = 0
  if raw and string.sub(raw, 1, 1) == 'g' then
    ahead = diff(parse(string.sub(raw, 2)), now)
    if ahead < 0 then ahead = 0 end
  end
  local tau = cap * interval
  local tokens = idiv(math.max(tau - ahead, 0), interval)
  if cost > cap then
    return false, true, tokens, ahead, 0, nil, nil
  end
  local new_ahead = ahead + cost * interval
  if new_ahead <= tau then
    return true, false, idiv(tau - new_ahead, interval), new_ahead, 0,
        'g' .. fmt(add(now, new_ahead)), new_ahead
  end
  return false, false, tokens, ahead, new_ahead - tau, nil, nil
end

local SLOTS = 16

local function sliding(raw, cost, limit, width)
  local cur, into = divmod(now_str, width) -- bucket index of now, ns into it
  local head, counts = cur, {}
  for i = 1, SLOTS do counts[i] = 0 end
  if raw and string.sub(raw, 1, 1) == 's' then
    local f = {}
    for v in string.gmatch(string.sub(raw, 3), '%S+') do f[#f + 1] = tonumber(v) end
    local old_head, old_width = f[1], f[2]
    if old_width == width then
      head = old_head
      for i = 1, SLOTS do counts[i] = f[2 + i] end
    else
      -- The window length changed (policy reload). Keep the old cost, taken
      -- as used now, unless the whole old ring is older than the new window:
      -- never hands capacity out twice (more conservative than the in-memory
      -- store's exact re-bucketing).
      local old_cur, old_into = divmod(now_str, old_width)
      local age = (old_cur - old_head) * old_width + old_into
      if age < SLOTS * width + old_width then
        local total = 0
        for i = 1, SLOTS do total = total + f[2 + i] end
        counts[(cur % SLOTS) + 1] = total
      end
    end
  end
  -- rotate to the current bucket
  if cur > head then
    if cur - head >= SLOTS then
      for i = 1, SLOTS do counts[i] = 0 end
    else
      for i = head + 1, cur do counts[(i % SLOTS) + 1] = 0 end
    end
    head = cur
  end
  local used = 0
  for i = 1, SLOTS do used = used + counts[i] end
  local function until_leaves(i) -- ns until bucket i leaves the window
    local d = (i + SLOTS - cur) * width - into
    if d < 0 then d = 0 end
    return d
  end
  local function reset_of()
    for back = 0, SLOTS - 1 do
      local i = head - back
      if i >= 0 and counts[(i % SLOTS) + 1] > 0 then return until_leaves(i) end
    end
    return 0
  end
  if cost > limit then
    return false, true, math.max(limit - used, 0), reset_of(), 0, nil, nil
  end
  if used + cost <= limit then
    local k = (head % SLOTS) + 1
    counts[k] = counts[k] + cost
    local reset = reset_of()
    local next = string.format('s %.0f %.0f', head, width)
    for i = 1, SLOTS do next = next .. string.format(' %.0f', counts[i]) end
    return true, false, limit - used - cost, reset, 0, next, reset
  end
  local excess = used + cost - limit
  local freed, retry = 0, 0
  local oldest = head - (SLOTS - 1)
  if oldest < 0 then oldest = 0 end
  for i = oldest, head do
    freed = freed + counts[(i % SLOTS) + 1]
    if freed >= excess then
      retry = until_leaves(i)
      break
    end
  end
  return false, false, limit - math.min(used, limit), reset_of(), retry, nil, nil
end

local function calendar(raw, cost, limit, end_str)
  local e = parse(end_str)
  local count = 0
  if raw and string.sub(raw, 1, 1) == 'c' then
    local s_end, s_count = string.match(raw, '^c (%d+) (%d+)$')
    local se = parse(s_end)
    -- a state from a later window (the clock stepped back) is kept as it is
    if se[1] > e[1] or (se[1] == e[1] and se[2] >= e[2]) then
      e, count = se, tonumber(s_count)
    end
  end
  local reset = math.max(diff(e, now), 0)
  local left = math.max(limit - count, 0)
  if cost > limit then
    return false, true, left, reset, 0, nil, nil
  end
  if cost <= left then
    return true, false, left - cost, reset, 0,
        string.format('c %s %.0f', fmt(e), count + cost), reset
  end
  return false, false, left, reset, reset, nil, nil
end

local function leases_of(raw) -- live leases: list of {owner, expires pair, cost}
  local list = {}
  if raw and string.sub(raw, 1, 1) == 'l' then
    for o, x, c in string.gmatch(string.sub(raw, 2), '(%S+) (%d+) (%d+)') do
      local exp = parse(x)
      if diff(exp, now) > 0 then list[#list + 1] = { o, exp, tonumber(c) } end
    end
  end
  return list
end

local function encode_leases(list) -- state string and ttl ns
  if #list == 0 then return nil, 0 end
  local parts, ttl = { 'l' }, 0
  for _, l in ipairs(list) do
    parts[#parts + 1] = string.format('%s %s %.0f', l[1], fmt(l[2]), l[3])
    ttl = math.max(ttl, diff(l[2], now))
  end
  return table.concat(parts, ' '), ttl
end

local function concurrency(raw, cost, limit, ttl)
  local list = leases_of(raw)
  local used = 0
  for _, l in ipairs(list) do used = used + l[3] end
  local left = math.max(limit - used, 0)
  if cost > limit then
    return false, true, left, 0, 0, nil, nil
  end
  if cost <= left then
    if cost > 0 then list[#list + 1] = { owner, add(now, ttl), cost } end
    local next, key_ttl = encode_leases(list)
    return true, false, left - cost, 0, 0, next or false, key_ttl
  end
  local earliest = nil
  for _, l in ipairs(list) do
    local d = diff(l[2], now)
    if earliest == nil or d < earliest then earliest = d end
  end
  local retry = math.max(math.min(earliest or 0, E9), 1)
  return false, false, left, 0, retry, nil, nil
end

local function run(kind, raw, cost, p1, p2)
  if kind == 'g' then return gcra(raw, cost, tonumber(p1), tonumber(p2)) end
  if kind == 's' then return sliding(raw, cost, tonumber(p1), tonumber(p2)) end
  if kind == 'c' then return calendar(raw, cost, tonumber(p1), p2) end
  if kind == 'l' then return concurrency(raw, cost, tonumber(p1), tonumber(p2)) end
  error('tollgate: unknown check kind ' .. tostring(kind))
end

-- Evaluate every check against the state as it is.
local n = #KEYS
local state = {}
for i = 1, n do
  local k = KEYS[i]
  if state[k] == nil then state[k] = redis.call('GET', k) end
end
local admitted = 1
local out = { 0, now_str }
local admits = {}
for i = 1, n do
  local a = 3 + 5 * (i - 1)
  local ok, never, remaining, reset, retry =
      run(ARGV[a], state[KEYS[i]], tonumber(ARGV[a + 1]), ARGV[a + 3], ARGV[a + 4])
  admits[i] = ok
  if ARGV[a + 2] == '1' and not ok then admitted = 0 end
  local flags = 0
  if ok then flags = 1 end
  if never then flags = flags + 2 end
  out[#out + 1] = flags
  out[#out + 1] = num(remaining)
  out[#out + 1] = num(reset)
  out[#out + 1] = num(retry)
end
out[1] = admitted
if admitted == 0 then
  return out -- a rejected request consumes nothing
end

-- Commit each check that admits, evaluated again on the state as it is now
-- (two checks on one counter both count), then write with a TTL.
local ttls = {}
for i = 1, n do
  if admits[i] then
    local a = 3 + 5 * (i - 1)
    local k = KEYS[i]
    local ok, _, _, _, _, next, ttl =
        run(ARGV[a], state[k], tonumber(ARGV[a + 1]), ARGV[a + 3], ARGV[a + 4])
    if ok and next ~= nil then
      state[k] = next
      ttls[k] = ttl
    end
  end
end
for k, ttl in pairs(ttls) do
  local ms = math.ceil(ttl / 1000000)
  if state[k] and ms > 0 then
    redis.call('SET', k, state[k], 'PX', string.format('%.0f', ms))
  else
    redis.call('DEL', k) -- back to its fresh state
  end
end
return out
