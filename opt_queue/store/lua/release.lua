-- Give a row back unanswered (its job was stopped), so that a later submit enqueues it again.
-- KEYS[1..3] row state (_rows.lua)   KEYS[4] job meta hash   KEYS[5] leases   KEYS[6] lease owners
-- KEYS[7] copies hash (lua/dedupe.lua): the row's copies are given back with it
-- ARGV[1] slot   ARGV[2] index
-- Returns 1 when released, 0 when the row was done or not claimed (nothing to give back).
redis.call('ZREM', KEYS[5], ARGV[2])
redis.call('HDEL', KEYS[6], ARGV[2])
if row_get(ARGV[1], 'done') == 1 or row_get(ARGV[1], 'claimed') == 0 then
  return 0
end
row_set(ARGV[1], 'claimed', 0)
redis.call('HINCRBY', KEYS[4], 'released', 1)
local copies = redis.call('HGET', KEYS[7], ARGV[2])
if copies then
  redis.call('HDEL', KEYS[7], ARGV[2])
  for _, entry in ipairs(cjson.decode(copies)) do
    local sep = string.find(entry, '\n', 1, true)
    local cslot = string.sub(entry, 1, sep - 1)
    if row_get(cslot, 'done') == 0 and row_set(cslot, 'claimed', 0) == 1 then
      redis.call('HINCRBY', KEYS[4], 'released', 1)
    end
  end
end
return 1
