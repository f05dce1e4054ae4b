-- Renew the leases an owner holds, or give them up.
-- KEYS[1] leases (sorted set)   KEYS[2] lease owners (hash)
-- ARGV[1] owner   ARGV[2] new length in ms (0: give the leases up)   ARGV[3..] indices
-- Returns the indices whose lease another owner holds now (taken over after it expired). A lease
-- that is gone (the row was published or given up since the owner listed it) is not lost.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local length = tonumber(ARGV[2])
local lost = {}
for i = 3, #ARGV do
  local index = ARGV[i]
  local owner = redis.call('HGET', KEYS[2], index)
  if owner == ARGV[1] then
    if length > 0 then
      redis.call('ZADD', KEYS[1], now + length, index)
    else
      redis.call('ZREM', KEYS[1], index)
      redis.call('HDEL', KEYS[2], index)
    end
  elseif owner and length > 0 then
    lost[#lost + 1] = index
  end
end
return lost
