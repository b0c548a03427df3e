-- tollgate: give back what decide.lua took in one hash slot, when a later
-- slot of the same request refused it (Redis Cluster, limits of one request
-- in several slots; see the crate docs, "Guarantees").
--
-- KEYS[i]  the counters of the checks that admitted in that slot's call
-- ARGV[1]  now, ns since the epoch as decimal digits, or "" for TIME
-- ARGV[2]  the `now` that slot's decide.lua call returned (same clock)
-- ARGV[3]  lease owner "<store instance>:<lease id>" given to decide.lua
-- ARGV[4 + 4(i-1) .. 7 + 4(i-1)]  check i: kind, cost, p1, p2 as for decide.lua
-- Returns the number of counters given back to.
--
-- Never gives back more than the decision took, so a refund cannot
-- over-admit:
--   g  token bucket: the bucket's TAT moves back by cost × interval minus the
--      time since the decision (what refilled meanwhile may already have been
--      absorbed by a full bucket; keeping it back is the safe side).
--   s/a sliding window: cost leaves the log entry holding the admission, if
--      that entry is provably it (stamped at the decision's instant, or in
--      its sub-window for the approximate log).
--   c  calendar window: cost leaves the count, if the window is the same.
--   l  concurrency: the owner's lease is removed.
-- Keys keep their TTL (a smaller count never needs a longer one), or are
-- deleted when back to their fresh state.

local at_str = ARGV[2]
local at = parse(at_str)
local owner = ARGV[3]
local refunded = 0

local function keep(k, v) -- rewrite, keeping the key's TTL
  redis.call('SET', k, v, 'KEEPTTL')
end

for i = 1, #KEYS do
  local a = 4 + 4 * (i - 1)
  local kind, cost, p1, p2 = ARGV[a], tonumber(ARGV[a + 1]), ARGV[a + 2], ARGV[a + 3]
  local k = KEYS[i]
  local raw = redis.call('GET', k)
  if raw and cost > 0 and kind == 'g' and string.sub(raw, 1, 1) == 'g' then
    local back = cost * tonumber(p2) - math.max(diff(now, at), 0)
    if back > 0 then
      local ahead = diff(parse(string.sub(raw, 2)), now) - back
      if ahead > 0 then
        redis.call('SET', k, 'g' .. fmt(add(now, ahead)), 'PX',
          string.format('%.0f', math.ceil(ahead / 1000000)))
      else
        redis.call('DEL', k)
      end
      refunded = refunded + 1
    end
  elseif raw and cost > 0 and (kind == 's' or kind == 'a') and string.sub(raw, 1, 2) == 'w ' then
    -- The log "w <newest> (<age> <cost>)*" (decide.lua). The admission at
    -- `at` sits in the first entry stamped at or after `at`: merges only ever
    -- restamp an entry later. Give back only when that entry provably holds
    -- it: stamped exactly `at` (exact), or in the same sub-window of
    -- g = ceil(T / 15) (approximate). Otherwise (merged past its sub-window,
    -- or already expired) keep the cost: under-admission only.
    local newest_str, rest = string.match(raw, '^w (%d+)(.*)$')
    local d = diff(parse(newest_str), at)
    local ages, costs = {}, {}
    for a, c in string.gmatch(rest, '(%d+) (%d+)') do
      ages[#ages + 1] = tonumber(a)
      costs[#costs + 1] = tonumber(c)
    end
    local hit = nil
    if d >= 0 then
      for j = 1, #ages do
        if ages[j] <= d then hit = j break end
      end
    end
    if hit then
      local stamp = add(parse(newest_str), -ages[hit])
      local same
      if kind == 's' then
        same = diff(stamp, at) == 0
      else
        local g = math.floor((tonumber(p2) + 14) / 15)
        same = divmod(fmt(stamp), g) == divmod(at_str, g)
      end
      if same then
        costs[hit] = costs[hit] - math.min(cost, costs[hit])
        local parts, last = {}, nil
        for j = #ages, 1, -1 do
          if costs[j] > 0 then last = j break end
        end
        if last == nil then
          redis.call('DEL', k)
        else
          parts[1] = 'w ' .. fmt(add(parse(newest_str), -ages[last]))
          for j = 1, last do
            if costs[j] > 0 then
              parts[#parts + 1] = string.format('%.0f %.0f', ages[j] - ages[last], costs[j])
            end
          end
          keep(k, table.concat(parts, ' '))
        end
        refunded = refunded + 1
      end
    end
  elseif raw and cost > 0 and kind == 'c' and string.sub(raw, 1, 1) == 'c' then
    local s_end, s_count = string.match(raw, '^c (%d+) (%d+)$')
    if s_end == fmt(parse(p2)) then
      local count = tonumber(s_count) - math.min(cost, tonumber(s_count))
      if count == 0 then
        redis.call('DEL', k)
      else
        keep(k, string.format('c %s %.0f', s_end, count))
      end
      refunded = refunded + 1
    end
  elseif raw and kind == 'l' and string.sub(raw, 1, 1) == 'l' then
    local parts, ttl, found = { 'l' }, 0, false
    for o, x, c in string.gmatch(string.sub(raw, 2), '(%S+) (%d+) (%d+)') do
      local d = diff(parse(x), now)
      if o == owner then
        found = true
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
    if found then refunded = refunded + 1 end
  end
end
return refunded
