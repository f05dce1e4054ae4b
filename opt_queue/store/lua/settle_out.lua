-- After an answer: an admission's output tokens in the scope's output-token windows (Anthropic's
-- third window) become what the answer wrote, up or down. A server that charged max_tokens on
-- arrival has adjusted its window to the real output by now, and one that counts output as written
-- holds just that: both end where this leaves the window.
-- KEYS[1] the bucket's state hash   KEYS[2..] its output-token windows (sorted sets)
-- ARGV[1] admission uid   ARGV[2] output tokens held at admission   ARGV[3] output tokens written
-- ARGV[4..] the period (ms) of each output window, in KEYS order
-- Returns how many windows were changed (expired entries need no correction).
local held, real = tonumber(ARGV[2]), tonumber(ARGV[3])
if held == real then return 0 end
local old, new = ARGV[1] .. ':' .. held, ARGV[1] .. ':' .. real
local fixed = 0
for i = 2, #KEYS do
  local score = redis.call('ZSCORE', KEYS[i], old)
  if score then
    redis.call('ZREM', KEYS[i], old)
    redis.call('ZADD', KEYS[i], score, new)
    redis.call('HINCRBY', KEYS[1], 'osum:' .. ARGV[i + 2], real - held)
    fixed = fixed + 1
  end
end
return fixed
