-- Publish a row's final result once, however often its task is delivered, and end its lease.
-- KEYS[1..3] row state (_rows.lua)   KEYS[4] job meta hash   KEYS[5] results stream
-- KEYS[6] leases (sorted set)   KEYS[7] lease owners (hash)   KEYS[8] copies hash (lua/dedupe.lua)
-- ARGV[1] slot   ARGV[2] index   ARGV[3] 1 if answered, 0 if null
-- ARGV[4] prompt tokens   ARGV[5] completion tokens   ARGV[6..] field, value, ... of the stream entry
-- Returns 1 when published, 0 when the row already had a result (another copy of its task).
-- The row's copies (rows of the job with the identical request) get the same result, as stream
-- entries with the extra field "copy" = their index; they cost nothing, so no tokens are added.
local slot, index = ARGV[1], ARGV[2]
redis.call('ZREM', KEYS[6], index)
redis.call('HDEL', KEYS[7], index)
if row_get(slot, 'done') == 1 then
  return 0
end
row_set(slot, 'done', 1)
if row_set(slot, 'claimed', 1) == 0 then
  -- a copy of a row that was given back meanwhile: it awaits collection like any other
  redis.call('HINCRBY', KEYS[4], 'claimed', 1)
end
redis.call('HINCRBY', KEYS[4], 'reported', 1)
if ARGV[3] == '0' then
  redis.call('HINCRBY', KEYS[4], 'nulls', 1)
end
redis.call('HINCRBY', KEYS[4], 'prompt_tokens', tonumber(ARGV[4]))
redis.call('HINCRBY', KEYS[4], 'completion_tokens', tonumber(ARGV[5]))
local fields = {}
for i = 6, #ARGV do
  fields[#fields + 1] = ARGV[i]
end
redis.call('XADD', KEYS[5], '*', unpack(fields))
local copies = redis.call('HGET', KEYS[8], index)
if copies then
  redis.call('HDEL', KEYS[8], index)
  fields[#fields + 1] = 'copy'
  fields[#fields + 1] = ''
  for _, entry in ipairs(cjson.decode(copies)) do
    local sep = string.find(entry, '\n', 1, true)
    local cslot, cindex = string.sub(entry, 1, sep - 1), string.sub(entry, sep + 1)
    if row_get(cslot, 'done') == 0 then
      row_set(cslot, 'done', 1)
      if row_set(cslot, 'claimed', 1) == 0 then
        redis.call('HINCRBY', KEYS[4], 'claimed', 1)
      end
      redis.call('HINCRBY', KEYS[4], 'reported', 1)
      if ARGV[3] == '0' then
        redis.call('HINCRBY', KEYS[4], 'nulls', 1)
      end
      fields[#fields] = cindex
      redis.call('XADD', KEYS[5], '*', unpack(fields))
    end
  end
end
return 1
