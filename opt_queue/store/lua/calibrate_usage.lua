-- Learn how a scope's server counts prompt tokens from what it billed for one request, where its
-- token window counts what it bills (Gemini: input tokens per minute; it sends no rate-limit
-- headers to read the window from). One reading is exact for its request: the factor is the
-- billed prompt over opt-queue's estimate, taken as it is the first time, then followed in log
-- space by ARGV[3] of the way (no burst makes such a reading ambiguous).
-- KEYS[1] the scope's state hash
-- ARGV[1] the prompt tokens the server billed   ARGV[2] opt-queue's estimate of that prompt
-- ARGV[3] the weight of a later reading (0..1)   ARGV[4] the time in ms (0: Redis' TIME)
-- ARGV[5] how long a factor stays current without a reading, ms
-- Returns the factor, as a string ("" when the reading says nothing: no estimate).
local now = tonumber(ARGV[4])
if now == 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local billed, estimate = tonumber(ARGV[1]), tonumber(ARGV[2])
if estimate <= 0 or billed <= 0 then return '' end
local seen = math.min(20, math.max(0.05, billed / estimate))
local old = tonumber(redis.call('HGET', KEYS[1], 'tok_factor') or '0')
if now - tonumber(redis.call('HGET', KEYS[1], 'tok_factor_at') or '0') > tonumber(ARGV[5]) then old = 0 end
local f = seen
if old > 0 then
  local w = tonumber(ARGV[3])
  f = math.exp((1 - w) * math.log(old) + w * math.log(seen))
end
redis.call('HSET', KEYS[1], 'tok_factor', tostring(f), 'tok_factor_at', now, 'tok_factor_seen', tostring(seen))
redis.call('HINCRBY', KEYS[1], 'tok_factor_n', 1)
return tostring(f)
