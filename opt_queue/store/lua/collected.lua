-- The collector stored these results on disk: acknowledge and delete their stream entries and mark
-- their rows collected (claimed=0 done=1), so that a row whose line later disappears from
-- output.jsonl, or turns null, is sent again by the next submit.
-- KEYS[1..3] row state (_rows.lua)   KEYS[4] results stream
-- ARGV[1] consumer group   ARGV[2] number of entry ids n   ARGV[3..2+n] entry ids   ARGV[3+n..] slots
-- Returns the number of entries acknowledged.
local n = tonumber(ARGV[2])
local ids = {}
for i = 3, 2 + n do ids[#ids + 1] = ARGV[i] end
local acked = 0
if n > 0 then
  acked = redis.call('XACK', KEYS[4], ARGV[1], unpack(ids))
  redis.call('XDEL', KEYS[4], unpack(ids))
end
for i = 3 + n, #ARGV do
  if row_get(ARGV[i], 'done') == 1 then row_set(ARGV[i], 'claimed', 0) end
end
return acked
