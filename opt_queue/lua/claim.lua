-- Claim rows for enqueueing, so that no row is ever enqueued twice, even by concurrent submits.
-- KEYS[1] claimed bitmap   KEYS[2] done bitmap   KEYS[3] answered bitmap   KEYS[4] job meta hash
-- ARGV    seq, mode, seq, mode, ...   mode "m": the row is missing from output.jsonl
--                                     mode "n": the row is null in output.jsonl (retry it)
-- Returns the list of claimed seqs; the caller enqueues exactly those.
local claimed = {}
for i = 1, #ARGV, 2 do
  local seq = tonumber(ARGV[i])
  local done = redis.call('GETBIT', KEYS[2], seq)
  if ARGV[i + 1] == 'n' and done == 1 and redis.call('GETBIT', KEYS[3], seq) == 0 then
    -- its last result was a null: run it again
    redis.call('SETBIT', KEYS[2], seq, 0)
    redis.call('SETBIT', KEYS[1], seq, 1)
    claimed[#claimed + 1] = seq
  elseif done == 0 and redis.call('SETBIT', KEYS[1], seq, 1) == 0 then
    claimed[#claimed + 1] = seq
  end
end
if #claimed > 0 then
  redis.call('HINCRBY', KEYS[4], 'claimed', #claimed)
end
return claimed
