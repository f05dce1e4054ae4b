-- Give back an admission whose request was never sent (the row turned out done, or the call failed
-- before reaching the network), so that its reserved place does not sit idle until it expires.
-- KEYS[1] the bucket's state hash   KEYS[2..] its windows (sorted sets): request windows, then token
--         windows, then output-token windows
-- ARGV[1] admission uid   ARGV[2] tokens reserved   ARGV[3] number of request windows
-- ARGV[4] number of token windows   ARGV[5] output tokens reserved
-- ARGV[6..] the period (ms) of each token and output-token window, in KEYS order
-- Returns how many window entries were removed.
local nreq, ntok = tonumber(ARGV[3]), tonumber(ARGV[4])
local removed = 0
for i = 2, #KEYS do
  local w = i - 1
  if w <= nreq then
    removed = removed + redis.call('ZREM', KEYS[i], ARGV[1])
  else
    local amount, sum = ARGV[2], 'tsum:'
    if w > nreq + ntok then amount, sum = ARGV[5], 'osum:' end
    if redis.call('ZREM', KEYS[i], ARGV[1] .. ':' .. amount) == 1 then
      redis.call('HINCRBY', KEYS[1], sum .. ARGV[6 + (w - 1 - nreq)], -tonumber(amount))
      removed = removed + 1
    end
  end
end
return removed
