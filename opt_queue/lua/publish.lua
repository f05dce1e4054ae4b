-- Publish a row's final result once, however often its task is delivered.
-- KEYS[1] done bitmap   KEYS[2] answered bitmap   KEYS[3] job meta hash   KEYS[4] results stream
-- ARGV[1] seq   ARGV[2] 1 if answered, 0 if null   ARGV[3] prompt tokens   ARGV[4] completion tokens
-- ARGV[5..] field, value, ... of the stream entry
-- Returns 1 when published, 0 when the row already had a result (a redelivered task).
local seq = tonumber(ARGV[1])
if redis.call('GETBIT', KEYS[1], seq) == 1 then
  return 0
end
redis.call('SETBIT', KEYS[1], seq, 1)
redis.call('SETBIT', KEYS[2], seq, tonumber(ARGV[2]))
redis.call('HINCRBY', KEYS[3], 'reported', 1)
if ARGV[2] == '0' then
  redis.call('HINCRBY', KEYS[3], 'nulls', 1)
end
redis.call('HINCRBY', KEYS[3], 'prompt_tokens', tonumber(ARGV[3]))
redis.call('HINCRBY', KEYS[3], 'completion_tokens', tonumber(ARGV[4]))
local fields = {}
for i = 5, #ARGV do
  fields[#fields + 1] = ARGV[i]
end
redis.call('XADD', KEYS[4], '*', unpack(fields))
return 1
