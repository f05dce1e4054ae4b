-- Give a row back unanswered (its job was stopped), so that a later submit enqueues it again.
-- KEYS[1] claimed bitmap   KEYS[2] done bitmap   KEYS[3] job meta hash
-- ARGV[1] seq
-- Returns 1 when released, 0 when the row was done or not claimed (nothing to give back).
local seq = tonumber(ARGV[1])
if redis.call('GETBIT', KEYS[2], seq) == 1 or redis.call('GETBIT', KEYS[1], seq) == 0 then
  return 0
end
redis.call('SETBIT', KEYS[1], seq, 0)
redis.call('HINCRBY', KEYS[3], 'released', 1)
return 1
