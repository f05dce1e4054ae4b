-- Forget the identical-request entries (lua/dedupe.lua) that can no longer make a copy: their
-- primary is published or given back. A dedupe entry is worth keeping only while its row is in
-- flight, so the requests hash holds about as many entries as the job has rows queued.
-- KEYS[1..3] row state (_rows.lua)   KEYS[4] requests hash
-- ARGV[1] HSCAN cursor   ARGV[2] entries to look at in this call
-- Returns the next cursor ("0" when the scan is over).
local scan = redis.call('HSCAN', KEYS[4], ARGV[1], 'COUNT', tonumber(ARGV[2]))
local entries = scan[2]
for i = 1, #entries, 2 do
  local primary = entries[i + 1]
  local sep = string.find(primary, '\n', 1, true)
  local pslot = string.sub(primary, 1, sep - 1)
  if row_get(pslot, 'done') == 1 or row_get(pslot, 'claimed') == 0 then
    redis.call('HDEL', KEYS[4], entries[i])
  end
end
return scan[1]
