-- What the server said about a scope's limits: a response's x-ratelimit-limit-* headers, a 429, or a
-- 503 slow_down.
-- KEYS[1] the scope's state hash   KEYS[2] its request window of the header period (sorted set)
-- ARGV[1] "ok" (a response's headers), "429" (refused), "429tok" (refused on tokens per minute: a
--         scope's token factor grows by ARGV[7]) or "slow" (503 slow_down)
-- ARGV[2] cooldown in ms (429)
-- ARGV[3] the server's request limit, ARGV[4] its token limit, per header period (0: not given)
-- ARGV[5] the time in ms (0: Redis' TIME)   ARGV[6] the header period in ms
-- ARGV[7] what a tokens-per-minute 429 multiplies the scope's token factor by
-- ARGV[8] (optional) the server's output-token limit per header period (0: not given)
-- A limit the headers give replaces the learned one, up or down, and is stamped (it holds for the
-- configured time, then it must be read again). A 429 without one teaches half the requests the
-- window held when the server refused (a multiplicative decrease: a burst far above the limit is
-- brought under it in a few windows). A slow_down halves the factor every per-minute limit is
-- multiplied by (it ramps back in acquire.lua).
-- Returns the cooldown left in ms.
local now = tonumber(ARGV[5])
if now == 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local state, kind = KEYS[1], ARGV[1]
local told = false
for i, dim in ipairs({'req', 'tok', 'out'}) do
  local v = tonumber(ARGV[i == 3 and 8 or 2 + i] or '0')
  if v > 0 then
    redis.call('HSET', state, 'learned:' .. dim, v, 'learned_at:' .. dim, now, 'source:' .. dim, 'headers')
    told = true
  end
end
if kind == '429tok' then
  -- refused on tokens where the limiter saw room: the server counts more than the scope's factor
  -- says (a reading the burst made ambiguous, another client): count more from now on
  local f = tonumber(redis.call('HGET', state, 'tok_factor') or '0')
  if f > 0 then redis.call('HSET', state, 'tok_factor', tostring(math.min(20, f * tonumber(ARGV[7])))) end
  kind = '429'
end
if kind == '429' then
  local cool = tonumber(redis.call('HGET', state, 'cool_until') or '0')
  local until_ms = now + tonumber(ARGV[2])
  if until_ms > cool then redis.call('HSET', state, 'cool_until', until_ms) end
  redis.call('HINCRBY', state, 'rate_limited', 1)
  if not told then
    local held = redis.call('ZCOUNT', KEYS[2], now - tonumber(ARGV[6]), '+inf')
    local taught = math.max(1, math.floor(held / 2))
    local cur = tonumber(redis.call('HGET', state, 'learned:req') or '0')
    local at = tonumber(redis.call('HGET', state, 'learned_at:req') or '0')
    if cur == 0 or taught < cur or at + 2 * tonumber(ARGV[6]) < now then
      redis.call('HSET', state, 'learned:req', taught, 'learned_at:req', now, 'source:req', '429')
    end
  end
elseif kind == 'slow' then
  local f0 = tonumber(redis.call('HGET', state, 'slow_factor') or '1')
  local at = tonumber(redis.call('HGET', state, 'slow_at') or '0')
  local f = math.min(1, f0 + (1 - f0) * (now - at) / (2 * tonumber(ARGV[6])))
  redis.call('HSET', state, 'slow_factor', math.max(0.05, f / 2), 'slow_at', now)
  redis.call('HINCRBY', state, 'slowed_down', 1)
end
local cool = tonumber(redis.call('HGET', state, 'cool_until') or '0')
return math.max(0, cool - now)
