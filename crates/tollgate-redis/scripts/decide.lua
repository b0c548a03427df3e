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
--                "s" sliding window       p1 = limit,    p2 = window length ns (exact)
--                "a" sliding window       p1 = limit,    p2 = window length ns (approximate)
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

local EXACT = 9007199254740992 -- 2^53

local function num(x) -- reply value: integer when exact, else decimal string
  if x < 0 then x = 0 end
  if x < EXACT then return x end
  return string.format('%.0f', x)
end

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

-- Sliding window: a log of admissions, src/algorithm/sliding_window.rs.
-- State "w <newest> (<age> <cost>)*": the newest entry's instant (ns since
-- the epoch), then every entry oldest first as its age relative to the
-- newest (ns) and its cost. An entry counts while now < at + T.
local EXACT_ENTRIES = 1024 -- MAX_EXACT_LIMIT
local APPROX_ENTRIES = 16 -- APPROXIMATE_ENTRIES

local function sliding(raw, cost, limit, t, approximate)
  -- live entries as ns since their instant (negative after a clock step
  -- back) and cost, oldest first
  local since, costs = {}, {}
  if raw and string.sub(raw, 1, 2) == 'w ' then
    local newest_str, rest = string.match(raw, '^w (%d+)(.*)$')
    local d0 = diff(now, parse(newest_str))
    for a, c in string.gmatch(rest, '(%d+) (%d+)') do
      local s = d0 + tonumber(a)
      if s < t then
        since[#since + 1] = s
        costs[#costs + 1] = tonumber(c)
      end
    end
  elseif raw and string.sub(raw, 1, 2) == 's ' then
    -- A state of the former 16-bucket ring ("s head width counts..."): its
    -- cost, taken as admitted now, while any of its buckets can still count.
    local f = {}
    for v in string.gmatch(string.sub(raw, 3), '%S+') do f[#f + 1] = tonumber(v) end
    local old_cur = divmod(now_str, f[2])
    if old_cur - f[1] < 16 then
      local total = 0
      for i = 3, #f do total = total + f[i] end
      if total > 0 then since[1], costs[1] = 0, total end
    end
  end
  local n = #since
  local used = 0
  for i = 1, n do used = used + costs[i] end
  local reset = 0
  if n > 0 then reset = t - since[n] end
  if cost > limit then
    return false, true, math.max(limit - used, 0), reset, 0, nil, nil
  end
  if used + cost <= limit then
    if cost > 0 then
      local merge = false
      if n > 0 then
        if since[n] <= 0 then
          merge = true -- same instant, or a newer one (the clock stepped back)
        elseif n >= (approximate and APPROX_ENTRIES or EXACT_ENTRIES) then
          merge = true
        elseif approximate then
          -- same sub-window of g = ceil(T / 15) ns, aligned on the epoch
          local _, into = divmod(now_str, idiv(t + 14, 15))
          merge = since[n] <= into
        end
      end
      if merge then
        since[n] = math.min(since[n], 0)
        costs[n] = costs[n] + cost
      else
        n = n + 1
        since[n], costs[n] = 0, cost
      end
      reset = t - since[n]
    end
    local next = nil
    if n > 0 then
      local newest = since[n]
      local parts = { 'w ' .. fmt(add(now, -newest)) }
      for i = 1, n do
        parts[#parts + 1] = string.format('%.0f %.0f', since[i] - newest, costs[i])
      end
      next = table.concat(parts, ' ')
    end
    return true, false, limit - used - cost, reset, 0, next or false, reset
  end
  local excess = used + cost - limit
  local freed, retry = 0, 0
  for i = 1, n do
    freed = freed + costs[i]
    if freed >= excess then
      retry = t - since[i]
      break
    end
  end
  return false, false, limit - math.min(used, limit), reset, retry, nil, nil
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
  if kind == 's' then return sliding(raw, cost, tonumber(p1), tonumber(p2), false) end
  if kind == 'a' then return sliding(raw, cost, tonumber(p1), tonumber(p2), true) end
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
