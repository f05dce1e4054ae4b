-- Raise an admission's estimated tokens to the tokens the response really used (the caller only
-- calls this when the usage is larger: the server never gives tokens back for a smaller one).
-- KEYS[1] the bucket's state hash   KEYS[2..] the bucket's token windows (sorted sets)
-- ARGV[1] admission uid   ARGV[2] estimated tokens   ARGV[3] real tokens
-- ARGV[4..] the period (ms) of each token window, in KEYS order
-- Returns how many windows still held the admission (expired ones need no correction).
local old = ARGV[1] .. ':' .. ARGV[2]
local new = ARGV[1] .. ':' .. ARGV[3]
local delta = tonumber(ARGV[3]) - tonumber(ARGV[2])
local fixed = 0
for i = 2, #KEYS do
  local score = redis.call('ZSCORE', KEYS[i], old)
  if score then
    redis.call('ZREM', KEYS[i], old)
    redis.call('ZADD', KEYS[i], score, new)
    redis.call('HINCRBY', KEYS[1], 'tsum:' .. ARGV[i + 2], delta)
    fixed = fixed + 1
  end
end
return fixed
