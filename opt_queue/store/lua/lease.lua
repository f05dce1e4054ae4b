-- Take the lease of rows about to be worked on: a row holds one lease at a time, so a second copy
-- of its task (redelivery, hand-back, recovery) never calls the API while the first works on it.
-- KEYS[1..3] row state (_rows.lua)   KEYS[4] job meta hash   KEYS[5] leases   KEYS[6] lease owners
-- ARGV[1] owner (worker process)   ARGV[2] lease length in ms   ARGV[3..] index, slot, index, slot, ...
-- Returns {job status, code per row}: status "running", "stopped" or "unknown" (no such job: it
-- was reset or expired; row codes are then absent); code 1 taken (or already ours),
-- 0 held by another live owner, 2 the row is done.
local status = redis.call('HGET', KEYS[4], 'status')
if not status then return {'unknown'} end
if status == 'stopped' then return {'stopped'} end
local now = redis_ms()
local out = {status}
for i = 3, #ARGV, 2 do
  local index, slot = ARGV[i], ARGV[i + 1]
  local code = 1
  if row_get(slot, 'done') == 1 then
    code = 2
  else
    local expires = tonumber(redis.call('ZSCORE', KEYS[5], index) or '0')
    if expires > now and redis.call('HGET', KEYS[6], index) ~= ARGV[1] then
      code = 0
    else
      redis.call('ZADD', KEYS[5], now + tonumber(ARGV[2]), index)
      redis.call('HSET', KEYS[6], index, ARGV[1])
    end
  end
  out[#out + 1] = code
end
return out
