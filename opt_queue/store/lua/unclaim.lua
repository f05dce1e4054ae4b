-- Undo the claim of rows that turned out to be on disk: a collector wrote and acknowledged them
-- between the submit's read of output.jsonl and its claim, so the claim took them for rows whose
-- line had gone missing (claim.lua's "redone"). They become collected again: nothing is sent.
-- KEYS[1..3] row state (_rows.lua)   KEYS[4] job meta hash
-- ARGV    slots of rows this caller claimed a moment ago and has not enqueued
-- Returns the number of rows given back to the collected state.
local n = 0
for i = 1, #ARGV do
  local slot = ARGV[i]
  if row_get(slot, 'claimed') == 1 and row_get(slot, 'done') == 0 then
    row_set(slot, 'claimed', 0)
    row_set(slot, 'done', 1)
    n = n + 1
  end
end
if n > 0 then
  redis.call('HINCRBY', KEYS[4], 'claimed', -n)
end
return n
