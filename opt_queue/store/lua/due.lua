-- Take the batch-lane steps that are due, or schedule one, on Redis' clock.
-- KEYS[1] the due set (sorted set: "job\nchunk" -> due time in ms)
-- ARGV[1] "take": ARGV[2] how long (ms) a taken step stays away (the taker's lease), ARGV[3] at most so many
--         "at":   ARGV[2] delay in ms, ARGV[3] member; sets its due time (never earlier than now)
-- Returns the members taken (take) or the due time set (at).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[1] == 'at' then
  local due = now + tonumber(ARGV[2])
  redis.call('ZADD', KEYS[1], due, ARGV[3])
  return due
end
local taken = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
for _, member in ipairs(taken) do
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), member)
end
return taken
