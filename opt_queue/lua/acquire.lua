-- Admit one request on the bucket (key or key group) with the most headroom, or say how long to wait.
-- Sliding log per window: a sorted set of admissions scored by Redis' own clock (TIME, in ms).
-- A new admission is *reserved*: scored in the future (now + reserve) so that it counts, and never
-- expires, until lua/stamp.lua scores it with the moment its request is sent.
-- Token windows keep their running sum in the bucket's state hash (field "tsum:<period>"); members
-- are "<uid>:<tokens>" so that expired entries give their tokens back.
-- KEYS    for each bucket: its state hash, then one sorted set per window (request windows first)
-- ARGV[1] tokens this request is estimated to use   ARGV[2] safety margin in ms
-- ARGV[3] unique id of this admission                ARGV[4] number of buckets n
-- ARGV[5] reserve in ms (how long an unsent admission holds its place)
-- ARGV[6] probe in ms: a bucket that has not answered lately ("answered_until" in its state, set by
--         the workers) admits one request at a time, which holds "probe_until" this long at most
--         (0: no probes)
-- ARGV[7..] for each bucket: nreq, ntok, then per window: limit, period_ms, learn (1: the limit
--           learned from the server's x-ratelimit-limit-* header caps this window)
-- Returns {1, b, now_ms} admitted on bucket b (1-based)
--         {0, wait_ms, now_ms}   no bucket can admit now; the earliest may in wait_ms
--         {-1, 0, now_ms}        no bucket can ever admit a request this large
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local need_tokens = tonumber(ARGV[1])
local margin = tonumber(ARGV[2])
local uid = ARGV[3]
local n = tonumber(ARGV[4])
local reserve = tonumber(ARGV[5])
local probe = tonumber(ARGV[6])

local function weight(member)
  return tonumber(string.match(member, ':(%d+)$')) or 0
end

-- Drop expired entries of a token window and return the tokens still in it.
local function token_sum(state, key, field, horizon)
  local old = redis.call('ZRANGEBYSCORE', key, '-inf', horizon)
  local sum = tonumber(redis.call('HGET', state, field) or '0')
  if #old > 0 then
    for _, m in ipairs(old) do sum = sum - weight(m) end
    redis.call('ZREMRANGEBYSCORE', key, '-inf', horizon)
  end
  if sum < 0 or redis.call('ZCARD', key) == 0 then sum = 0 end
  redis.call('HSET', state, field, sum)
  return sum
end

-- Milliseconds until enough of the oldest token entries expire to fit `need` under `limit`.
local function token_wait(key, sum, need, limit, period)
  local excess = sum + need - limit
  local start = 0
  while true do
    local batch = redis.call('ZRANGE', key, start, start + 99, 'WITHSCORES')
    if #batch == 0 then return period end
    for i = 1, #batch, 2 do
      excess = excess - weight(batch[i])
      -- a reserved entry will be stamped about now: it frees a period after that
      if excess <= 0 then return math.min(tonumber(batch[i + 1]), now) + period + margin - now + 1 end
    end
    start = start + 100
  end
end

local best, best_room, best_windows, best_state, best_probing = nil, -1, nil, nil, false
local min_wait, never = nil, 0
local k, a = 1, 7
for b = 1, n do
  local state = KEYS[k]
  k = k + 1
  local nreq, ntok = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  a = a + 2
  local st = redis.call('HMGET', state, 'cool_until', 'learn_requests', 'learn_tokens', 'answered_until',
                       'probe_until')
  local cool = tonumber(st[1] or '0')
  local learned = {tonumber(st[2] or '0'), tonumber(st[3] or '0')}
  local room, wait, too_large = 1.0, 0, false
  local windows = {}
  for w = 1, nreq + ntok do
    local key = KEYS[k]
    local limit, period = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
    local is_tok = w > nreq
    if ARGV[a + 2] == '1' then
      local l = learned[is_tok and 2 or 1]
      if l > 0 and l < limit then limit = l end
    end
    k, a = k + 1, a + 3
    local horizon = now - period - margin
    local used, need
    if is_tok then
      need = need_tokens
      used = token_sum(state, key, 'tsum:' .. period, horizon)
      if need > limit then
        too_large = true
      elseif used + need > limit then
        wait = math.max(wait, token_wait(key, used, need, limit, period))
      end
    else
      need = 1
      redis.call('ZREMRANGEBYSCORE', key, '-inf', horizon)
      used = redis.call('ZCARD', key)
      if used + 1 > limit then
        local oldest = redis.call('ZRANGE', key, used - limit, used - limit, 'WITHSCORES')
        wait = math.max(wait, math.min(tonumber(oldest[2]), now) + period + margin - now + 1)
      end
    end
    room = math.min(room, (limit - used - need) / limit)
    windows[#windows + 1] = {key, is_tok, period}
  end
  if cool > now then wait = math.max(wait, cool - now) end
  local probing = probe > 0 and tonumber(st[4] or '0') <= now
  if probing and tonumber(st[5] or '0') > now then
    -- its probe is still out: look again soon (its answer, or its expiry, frees the bucket)
    wait = math.max(wait, math.min(tonumber(st[5]) - now, 250))
  end
  if too_large then
    never = never + 1
  elseif wait > 0 then
    if min_wait == nil or wait < min_wait then min_wait = wait end
  elseif room > best_room then
    best, best_room, best_windows, best_state, best_probing = b, room, windows, state, probing
  end
end

if best == nil then
  if never == n then return {-1, 0, now} end
  return {0, min_wait or 1000, now}
end
for _, w in ipairs(best_windows) do
  if w[2] then
    redis.call('ZADD', w[1], now + reserve, uid .. ':' .. need_tokens)
    redis.call('HINCRBY', best_state, 'tsum:' .. w[3], need_tokens)
  else
    redis.call('ZADD', w[1], now + reserve, uid)
  end
end
if best_probing then
  redis.call('HSET', best_state, 'probe_until', now + probe)
end
return {1, best, now}
