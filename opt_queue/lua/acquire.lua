-- Admit one request on the scope (a key or key group, for one model) with the most headroom, or say
-- how long to wait. Sliding log per window: a sorted set of admissions scored by Redis' clock (ms).
-- A new admission is *reserved*: scored in the future (now + reserve) so that it counts, and never
-- expires, until lua/stamp.lua scores it with the moment its request is sent.
-- Token windows keep their running sum in the scope's state hash (field "tsum:<period>"); members
-- are "<uid>:<tokens>" so that expired entries give their tokens back.
-- KEYS    for each scope: its state hash, then one sorted set per window (request windows first)
-- ARGV[1] tokens this request is estimated to use    ARGV[2] unique id of this admission
-- ARGV[3] number of scopes n                         ARGV[4] reserve in ms (an unsent admission's hold)
-- ARGV[5] probe in ms: a scope that has not answered lately ("answered_until" in its state, set by
--         the workers) admits one request at a time, which holds "probe_until" this long at most
--         (0: no probes)
-- ARGV[6] the time in ms (0: Redis' TIME; tests control time with it)
-- ARGV[7] how long a learned limit holds, ms      ARGV[8] request limit per header period from
--         which a pacing window applies            ARGV[9] the header period, ms
-- ARGV[10] the job budget's share of this request in nano-dollars (-1: no budget check); when 0 or
--         more, the last KEY is the job's meta hash, whose max_cost_nano / max_tokens_total (absent
--         or 0: no limit) must hold spent + reserved + this request, which is then reserved
-- ARGV[11] the request's tokens for max_tokens_total
-- ARGV[12..] for each scope: the number of windows, then per window: is_tokens (0/1), limit,
--           period_ms, mode, margin_ms. Modes (limiter.py): 0 configured; 1 configured, of the header
--           period (a learned limit lowers it); 2 discovered (the learned limit, else `limit`, 0 for
--           none); 3 pacing (limit/60 of the header window of its dimension, when that is large)
-- Returns {1, b, now_ms} admitted on scope b (1-based)
--         {0, wait_ms, now_ms}   no scope can admit now; the earliest may in wait_ms
--         {-1, 0, now_ms}        no scope can ever admit a request this large
--         {-2, wait_ms, now_ms}  the job's budget has no room while requests are in flight (their
--                                real cost may leave some)
--         {-3, 0, now_ms}        the job's budget has no room for this request, none in flight
local now = tonumber(ARGV[6])
if now == 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local need_tokens = tonumber(ARGV[1])
local uid = ARGV[2]
local n = tonumber(ARGV[3])
local reserve = tonumber(ARGV[4])
local probe = tonumber(ARGV[5])
local refresh = tonumber(ARGV[7])
local pace_above = tonumber(ARGV[8])
local header_period = tonumber(ARGV[9])
local budget_cost, budget_tokens = tonumber(ARGV[10]), tonumber(ARGV[11])
local budget = nil
if budget_cost >= 0 then
  budget = KEYS[#KEYS]
  local b = redis.call('HMGET', budget, 'max_cost_nano', 'spent_nano', 'reserved_nano',
                       'max_tokens_total', 'spent_tokens', 'reserved_tokens')
  local max_cost, max_tokens = tonumber(b[1] or '0'), tonumber(b[4] or '0')
  local reserved_cost, reserved_tokens = tonumber(b[3] or '0'), tonumber(b[6] or '0')
  if (max_cost > 0 and tonumber(b[2] or '0') + reserved_cost + budget_cost > max_cost)
      or (max_tokens > 0 and tonumber(b[5] or '0') + reserved_tokens + budget_tokens > max_tokens) then
    if reserved_cost > 0 or reserved_tokens > 0 then return {-2, 250, now} end
    return {-3, 0, now}
  end
end

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
local function token_wait(key, sum, need, limit, period, margin)
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

-- The slow-down factor after a 503 slow_down: halved, then back to 1 over two header periods.
local function slow_factor(f0, at)
  if f0 >= 1 then return 1 end
  return math.min(1, f0 + (1 - f0) * (now - at) / (2 * header_period))
end

local best, best_room, best_windows, best_state, best_probing = nil, -1, nil, nil, false
local min_wait, never = nil, 0
local k, a = 1, 12
for b = 1, n do
  local state = KEYS[k]
  k = k + 1
  local nwin = tonumber(ARGV[a])
  a = a + 1
  local st = redis.call('HMGET', state, 'cool_until', 'answered_until', 'probe_until', 'learned:req',
                       'learned_at:req', 'learned:tok', 'learned_at:tok', 'slow_factor', 'slow_at')
  local cool = tonumber(st[1] or '0')
  local learned = {}
  for i, dim in ipairs({'req', 'tok'}) do
    local v, at = tonumber(st[2 + 2 * i] or '0'), tonumber(st[3 + 2 * i] or '0')
    if v > 0 and at + refresh > now then learned[dim] = v end
  end
  local factor = slow_factor(tonumber(st[8] or '1'), tonumber(st[9] or '0'))
  local probing = probe > 0 and tonumber(st[2] or '0') <= now
  local header_limit = {}
  local room, wait, too_large = 1.0, 0, false
  local windows = {}
  for w = 1, nwin do
    local key = KEYS[k]
    local is_tok = ARGV[a] == '1'
    local dim = is_tok and 'tok' or 'req'
    local limit, period, mode, margin = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]),
                                        tonumber(ARGV[a + 4])
    k, a = k + 1, a + 5
    if mode == 1 then
      if learned[dim] and learned[dim] < limit then limit = learned[dim] end
    elseif mode == 2 then
      limit = learned[dim] or limit
    elseif mode == 3 then
      local h = header_limit[dim]
      limit = 0
      if h and h >= pace_above then limit = math.ceil(h * period / header_period) end
    end
    if limit > 0 and mode > 0 and factor < 1 then limit = math.max(1, math.floor(limit * factor)) end
    if mode == 1 or mode == 2 then header_limit[dim] = limit end
    -- A pacing window of a small limit is not kept (it costs nothing; it starts empty when the
    -- limit grows past the threshold, so its first sub-window may burst). A discovered request
    -- window is kept before its limit is known (a 429 without headers learns from how many it
    -- held); a discovered token window only while the scope is probed, so that the probe counts
    -- once the first answer tells the limit (a server that never tells one costs nothing).
    if limit > 0 or (mode == 2 and (not is_tok or probing)) then
      local horizon = now - period - margin
      local need = is_tok and need_tokens or 1
      local used
      if is_tok then
        used = token_sum(state, key, 'tsum:' .. period, horizon)
      else
        redis.call('ZREMRANGEBYSCORE', key, '-inf', horizon)
        used = redis.call('ZCARD', key)
      end
      if limit > 0 then
        if need > limit and not (mode == 3 and used == 0) then
          too_large = true
        elseif used + need > limit and not (mode == 3 and used == 0) then
          if is_tok then
            wait = math.max(wait, token_wait(key, used, need, limit, period, margin))
          else
            local oldest = redis.call('ZRANGE', key, used - limit, used - limit, 'WITHSCORES')
            wait = math.max(wait, math.min(tonumber(oldest[2]), now) + period + margin - now + 1)
          end
        end
        room = math.min(room, (limit - used - need) / limit)
      end
      windows[#windows + 1] = {key, is_tok, period}
    end
  end
  if cool > now then wait = math.max(wait, cool - now) end
  if probing and tonumber(st[3] or '0') > now then
    -- its probe is still out: look again soon (its answer, or its expiry, frees the scope)
    wait = math.max(wait, math.min(tonumber(st[3]) - now, 250))
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
if budget then
  redis.call('HINCRBY', budget, 'reserved_nano', budget_cost)
  redis.call('HINCRBY', budget, 'reserved_tokens', budget_tokens)
end
return {1, best, now}
