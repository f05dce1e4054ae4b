-- Give back an admission whose request was never sent (the row turned out done, or the call failed
-- before reaching the network), so that its reserved place does not sit idle until it expires.
-- KEYS[1] the bucket's state hash   KEYS[2..] its windows (sorted sets), request windows first
-- ARGV[1] admission uid   ARGV[2] tokens reserved   ARGV[3] number of request windows
-- ARGV[4..] the period (ms) of each token window, in KEYS order
-- Returns how many window entries were removed.
local nreq = tonumber(ARGV[3])
local removed = 0
for i = 2, #KEYS do
  if i - 1 <= nreq then
    removed = removed + redis.call('ZREM', KEYS[i], ARGV[1])
  elseif redis.call('ZREM', KEYS[i], ARGV[1] .. ':' .. ARGV[2]) == 1 then
    redis.call('HINCRBY', KEYS[1], 'tsum:' .. ARGV[4 + (i - 2 - nreq)], -tonumber(ARGV[2]))
    removed = removed + 1
  end
end
return removed
