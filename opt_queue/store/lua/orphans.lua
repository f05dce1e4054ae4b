-- Which rows of a running job nobody works on: not done and without a live lease.
-- KEYS[1..3] row state (_rows.lua)   KEYS[4] job meta hash   KEYS[5] leases
-- ARGV index, slot, index, slot, ...
-- Returns those indices ({} when the job is not running: a stopped job's rows are given back by
-- whoever runs them, and an unknown job's rows are dropped).
if redis.call('HGET', KEYS[4], 'status') ~= 'running' then return {} end
local now = redis_ms()
local out = {}
for i = 1, #ARGV, 2 do
  local index, slot = ARGV[i], ARGV[i + 1]
  if row_get(slot, 'done') == 0 and tonumber(redis.call('ZSCORE', KEYS[5], index) or '0') <= now then
    out[#out + 1] = index
  end
end
return out
