-- Cool a bucket down after a 429 and learn the server's limits when they are lower than ours.
-- KEYS[1] the bucket's state hash
-- ARGV[1] cooldown in ms   ARGV[2] server's request limit (0: unknown)   ARGV[3] token limit (0: unknown)
-- Returns the cooldown left in ms, on Redis' clock.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cool = tonumber(redis.call('HGET', KEYS[1], 'cool_until') or '0')
local until_ms = now + tonumber(ARGV[1])
if until_ms > cool then
  redis.call('HSET', KEYS[1], 'cool_until', until_ms)
  cool = until_ms
end
for i, field in ipairs({'learn_requests', 'learn_tokens'}) do
  local v = tonumber(ARGV[i + 1])
  if v > 0 then
    local cur = tonumber(redis.call('HGET', KEYS[1], field) or '0')
    if cur == 0 or v < cur then redis.call('HSET', KEYS[1], field, v) end
  end
end
redis.call('HINCRBY', KEYS[1], 'rate_limited', 1)
return cool - now
