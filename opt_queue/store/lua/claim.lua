-- Claim rows for enqueueing, so that no row is ever enqueued twice, even by concurrent submits.
-- KEYS[1..3] row state (_rows.lua)   KEYS[4] job meta hash
-- ARGV    slots of rows that output.jsonl lacks or holds as null (the file is the truth)
-- Returns {claimed slots, rows queued or in flight, rows published but not collected yet,
--          claimed slots that had been collected before}.
-- A row that was collected (claimed=0 done=1) and is now missing or null on disk is sent again.
local out, busy, pending, redone = {}, 0, 0, {}
for i = 1, #ARGV do
  local slot = ARGV[i]
  local claimed, done = row_get(slot, 'claimed'), row_get(slot, 'done')
  if claimed == 1 and done == 0 then
    busy = busy + 1
  elseif claimed == 1 then
    pending = pending + 1
  else
    if done == 1 then
      row_set(slot, 'done', 0)
      redone[#redone + 1] = slot
    end
    row_set(slot, 'claimed', 1)
    out[#out + 1] = slot
  end
end
if #out > 0 then
  redis.call('HINCRBY', KEYS[4], 'claimed', #out)
end
return {out, busy, pending, redone}
