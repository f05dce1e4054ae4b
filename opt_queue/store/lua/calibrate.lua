-- Learn how a scope's server counts prompt tokens, from a response's x-ratelimit-*-tokens headers.
-- The server said it had counted `limit - remaining` tokens in its window when this request
-- arrived; the limiter's log says what it admitted in the same window (the admissions stamped in
-- the header period up to this request's stamp), each with its prompt's estimate and its
-- completion's cap (in its uid: "<hex>.<prompt>.<cap>"). The server's count of the prompts is then
-- (counted - caps), and its ratio to the estimates is one observation of the scope's factor.
-- Requests sent within `slack` ms of this one, or of the window's start, may have reached the
-- server in either order, and admissions not stamped yet may have been sent: when such requests
-- hold more than a tenth of the window's prompts (a burst), the reading is ambiguous and skipped.
-- The first observation is taken as it is; later ones move the factor part of the way, in log
-- space, so that it follows a change without jumping on one noisy reading.
-- KEYS[1] the scope's state hash   KEYS[2] its token window of the header period (sorted set)
-- ARGV[1] the server's token limit   ARGV[2] its remaining tokens   ARGV[3] the request's stamp, ms
-- ARGV[4] the header period, ms      ARGV[5] the weight of a later observation (0..1)
-- ARGV[6] the time in ms (0: Redis' TIME)   ARGV[7] the request's uid   ARGV[8] slack, ms
-- ARGV[9] the tokens the request was admitted with: once the factor is known, the request's own
--         entry in the window is counted again with it (the scope's first request, a probe, was
--         admitted on the estimate alone and would hold its window's room until it expires)
-- ARGV[10] how long a factor stays current without a reading, ms: an older one is replaced by the
--         next reading as it is (a scope silent that long is probed again: a new job, other text)
-- ARGV[11] (optional) how far the server's rounding of `remaining` may be off (half its step). A
--         first such reading takes the high end (too high costs a little room, too low costs 429s);
--         later ones their middle, weighed against the factor by how precise each is (a reading
--         in a nearly empty window is off by much more, relatively, than one in a full window):
--         the factor's relative error is kept in "tok_factor_err"
-- Returns the factor, as a string ("" when nothing was learned: no admission with an estimate in
-- the window, or one from an older version).
local now = tonumber(ARGV[6])
if now == 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local counted = tonumber(ARGV[1]) - tonumber(ARGV[2])
local stamp, period = tonumber(ARGV[3]), tonumber(ARGV[4])
local own, slack = ARGV[7], tonumber(ARGV[8])
local prompts, caps, unsure = 0, 0, 0
local got = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. (stamp - period - slack), stamp + slack, 'WITHSCORES')
for i = 1, #got, 2 do
  local m, score = got[i], tonumber(got[i + 1])
  local p, c = string.match(m, '%.(%d+)%.(%d+):%d+$')
  if p and string.sub(m, 1, #own + 1) ~= own .. ':' then
    p = tonumber(p)
    if math.abs(score - stamp) < slack or math.abs(score - (stamp - period)) < slack then unsure = unsure + p end
    if score > stamp - period and score <= stamp then prompts, caps = prompts + p, caps + tonumber(c) end
  elseif p then
    prompts, caps = prompts + tonumber(p), caps + tonumber(c)
  end
end
-- admissions not stamped yet (scored in the future) may have been sent, and counted, already
for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. now, '+inf')) do
  local p = string.match(m, '%.(%d+)%.%d+:%d+$')
  if p then unsure = unsure + tonumber(p) end
end
local off = tonumber(ARGV[11] or '0')
if prompts <= 0 or unsure > prompts / 10 then return '' end
local seen = math.min(20, math.max(0.05, (counted - caps) / prompts))
local old = tonumber(redis.call('HGET', KEYS[1], 'tok_factor') or '0')
if now - tonumber(redis.call('HGET', KEYS[1], 'tok_factor_at') or '0') > tonumber(ARGV[10]) then old = 0 end
-- A first reading is taken as it is, up to 3x the estimate: above that it more likely counts traffic
-- the limiter never saw (an earlier run on another Redis, another client of the key) than a server
-- that counts so much more; later readings and tokens-per-minute 429s raise it further if need be.
local f = seen
local err = nil  -- the factor's relative error, when its readings are rounded
if old == 0 then
  if off > 0 then
    f = math.min(20, (counted + off - caps) / prompts)
    err = off / math.max(counted, 1)
  end
  if f > 3 then f = 3 end
elseif off > 0 then
  -- precision-weighted: the reading's weight is the factor's error over both errors together
  local e_old = tonumber(redis.call('HGET', KEYS[1], 'tok_factor_err') or '0.05')
  local e_new = off / math.max(counted, 1)
  local w = e_old / (e_old + e_new)
  f = math.exp((1 - w) * math.log(old) + w * math.log(seen))
  err = math.max(0.05, 1 / (1 / e_old + 1 / e_new))  -- never so sure that it stops following
else
  -- a reading below the factor moves it half as far as one above: a reading is more often too
  -- low (a request the server had not counted yet) than too high, and too low costs 429s
  local w = tonumber(ARGV[5])
  if seen < old then w = w / 2 end
  f = math.exp((1 - w) * math.log(old) + w * math.log(seen))
end
if err then redis.call('HSET', KEYS[1], 'tok_factor_err', tostring(err)) end
redis.call('HSET', KEYS[1], 'tok_factor', tostring(f), 'tok_factor_at', now, 'tok_factor_seen', tostring(seen))
redis.call('HINCRBY', KEYS[1], 'tok_factor_n', 1)
local p, c = string.match(own, '%.(%d+)%.(%d+)$')
local was = tonumber(ARGV[9])
if p and was then
  local now_counted = tonumber(c) + math.ceil(tonumber(p) * f - 1e-9)
  local member = own .. ':' .. was
  local score = redis.call('ZSCORE', KEYS[2], member)
  if score and now_counted ~= was then
    redis.call('ZREM', KEYS[2], member)
    redis.call('ZADD', KEYS[2], score, own .. ':' .. now_counted)
    redis.call('HINCRBY', KEYS[1], 'tsum:' .. period, now_counted - was)
  end
end
return tostring(f)
