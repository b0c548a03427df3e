-- tollgate: instants and `now`, shared by decide.lua, release.lua and
-- refund.lua (each script is sent as this prelude followed by its own text;
-- see src/lib.rs).
--
-- Lua numbers are doubles, so instants (about 1.7e18 ns) are kept as
-- {seconds, nanoseconds} pairs; only differences (exact below 2^53 ns) are
-- plain numbers. ARGV[1] of every script is `now`: ns since the epoch as
-- decimal digits, or "" for the Redis server's clock (TIME).
local E9 = 1000000000

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

local now_str = ARGV[1]
if now_str == '' then
  local t = redis.call('TIME')
  now_str = fmt({ tonumber(t[1]), tonumber(t[2]) * 1000 })
end
local now = parse(now_str)

