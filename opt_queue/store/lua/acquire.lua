-- Admit requests, in order, each on the scope (a key or key group, for one model) with the most
-- headroom, or say how long the first that does not fit must wait. One worker's waiting rows are
-- admitted by one call (engine's admission queue); a row alone asks for itself (one request).
-- Sliding log per window: a sorted set of admissions scored by Redis' clock (ms).
-- A new admission is *reserved*: scored in the future (now + reserve) so that it counts, and never
-- expires, until lua/stamp.lua scores it with the moment its request is sent.
-- Token windows keep their running sum in the scope's state hash (field "tsum:<period>"); members
-- are "<uid>:<tokens>" so that expired entries give their tokens back.
-- KEYS    for each scope: its state hash, then one sorted set per window (request windows first);
--         then, when ARGV[9] is 1, the job's meta hash (its budget)
-- ARGV[1] number of requests k                        ARGV[2] number of scopes n
-- ARGV[3] reserve in ms (an unsent admission's hold)
-- ARGV[4] probe in ms: a scope that has not answered lately ("answered_until" in its state, set by
--         the workers) admits one request at a time, which holds "probe_until" this long at most
--         (0: no probes)
-- ARGV[5] the time in ms (0: Redis' TIME; tests control time with it)
-- ARGV[6] how long a learned limit holds, ms      ARGV[7] request limit per header period from
--         which a pacing window applies            ARGV[8] the header period, ms
-- ARGV[9] 1: the requests share the job budget in the last KEY, whose max_cost_nano /
--         max_tokens_total (absent or 0: no limit) must hold spent + reserved + each request,
--         which is then reserved
-- ARGV[10..] for each request: tokens it is estimated to use, its unique id, its budget share in
--         nano-dollars, its tokens for max_tokens_total, the part of its tokens that is the
--         prompt's estimate (the scope's learned "tok_factor" scales that part: lua/calibrate.lua),
--         1 when that estimate is exact (the model's tokenizer), 0 when it is an upper bound
--         (a model whose tokenizer opt-queue does not have), and the output tokens an output
--         window holds for it (the completion's cap; settled to the real output: settle_out.lua;
--         on a scope whose server counts output only as it is written, "out_written" in its state
--         (lua/out_mode.lua), one token: it must find the window not full). On a scope that has not learned how
--         its server counts, an upper bound larger than a token window is no reason to refuse the
--         request for ever: it goes alone, in an empty window, charged the whole window, and its
--         answer teaches the scope (its server may count far less).
-- then for each scope: the number of windows, then per window: its dimension (0 requests, 1
--         tokens, 2 output tokens: their running sum is "osum:<period>"), limit, period_ms, mode,
--         margin_ms. Modes (limiter.py): 0 configured; 1 configured, of the header period (a
--         learned limit lowers it); 2 discovered (the learned limit, else `limit`, 0 for none);
--         3 pacing (limit/60 of the header window of its dimension, when that is large)
-- Returns {now_ms, s1, v1, t1, o1, s2, v2, t2, o2, ...}: a status, a value, the tokens counted (the
-- scope's, admitted; else the estimate) and the output tokens held (admitted) for each request in
-- order, up to and including the first that has to wait (the ones after it are not looked at):
--   1, b        admitted on scope b (1-based)
--   0, wait_ms  no scope can admit it now; the earliest may in wait_ms
--  -1, 0        no scope can ever admit a request this large (the next request is looked at)
--  -2, wait_ms  the job's budget has no room while requests are in flight (their real cost may
--               leave some)
--  -3, 0        the job's budget has no room for this request, none in flight
local now = tonumber(ARGV[5])
if now == 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local k = tonumber(ARGV[1])
local n = tonumber(ARGV[2])
local reserve = tonumber(ARGV[3])
local probe = tonumber(ARGV[4])
local refresh = tonumber(ARGV[6])
local pace_above = tonumber(ARGV[7])
local header_period = tonumber(ARGV[8])
local budget = nil
if ARGV[9] == '1' then budget = KEYS[#KEYS] end
local OUT_POLL = 100  -- ms: the longest wait for room in an output-token window

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

-- Milliseconds until the slow-down factor, ramping back from f0 (set at `at`), reaches `target`.
local function ramp_wait(f0, at, target)
  if f0 >= 1 or target <= f0 then return 1 end
  return math.max(1, math.ceil(at + (math.min(target, 1) - f0) / (1 - f0) * 2 * header_period - now) + 1)
end

-- Read every scope once: its state, and for each window that counts, its limit now and its use.
-- Admissions made by this call keep `used` in step, so each request is judged without reading
-- the scopes again.
local scopes = {}
local PER_REQUEST = 7
local kk, a = 1, 10 + PER_REQUEST * k
for b = 1, n do
  local state = KEYS[kk]
  kk = kk + 1
  local nwin = tonumber(ARGV[a])
  a = a + 1
  local st = redis.call('HMGET', state, 'cool_until', 'answered_until', 'probe_until', 'learned:req',
                       'learned_at:req', 'learned:tok', 'learned_at:tok', 'slow_factor', 'slow_at',
                       'tok_factor', 'learned:out', 'learned_at:out', 'out_written')
  local learned = {}
  for dim, at_field in pairs({req = 4, tok = 6, out = 11}) do
    local v, at = tonumber(st[at_field] or '0'), tonumber(st[at_field + 1] or '0')
    if v > 0 and at + refresh > now then learned[dim] = v end
  end
  local slow_f0, slow_at = tonumber(st[8] or '1'), tonumber(st[9] or '0')
  local factor = slow_factor(slow_f0, slow_at)
  local probing = probe > 0 and tonumber(st[2] or '0') <= now
  local header_limit, header_full = {}, {}
  local windows = {}
  for w = 1, nwin do
    local key = KEYS[kk]
    local kind = tonumber(ARGV[a])
    local is_tok = kind == 1
    local dim = ({'req', 'tok', 'out'})[kind + 1]
    local limit, period, mode, margin = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]),
                                        tonumber(ARGV[a + 4])
    kk, a = kk + 1, a + 5
    local full  -- the window's limit without a slow-down: what a request can never exceed
    if mode == 1 then
      if learned[dim] and learned[dim] < limit then limit = learned[dim] end
    elseif mode == 2 then
      limit = learned[dim] or limit
    elseif mode == 3 then
      local h, hf = header_limit[dim], header_full[dim]
      limit, full = 0, 0
      if h and h >= pace_above then limit = math.ceil(h * period / header_period) end
      if hf and hf >= pace_above then full = math.ceil(hf * period / header_period) end
    end
    full = full or limit
    if limit > 0 and mode > 0 and factor < 1 then limit = math.max(1, math.floor(limit * factor)) end
    if mode == 1 or mode == 2 then header_limit[dim], header_full[dim] = limit, full end
    -- A pacing window of a small limit is not kept (it costs nothing; it starts empty when the
    -- limit grows past the threshold, so its first sub-window may burst). A discovered request
    -- window is kept before its limit is known (a 429 without headers learns from how many it
    -- held); a discovered token window only while the scope is probed, so that the probe counts
    -- once the first answer tells the limit (a server that never tells one costs nothing).
    if limit > 0 or (mode == 2 and (kind == 0 or probing)) then
      local horizon = now - period - margin
      local used
      if kind > 0 then
        used = token_sum(state, key, (is_tok and 'tsum:' or 'osum:') .. period, horizon)
      else
        redis.call('ZREMRANGEBYSCORE', key, '-inf', horizon)
        used = redis.call('ZCARD', key)
      end
      windows[#windows + 1] = {key = key, kind = kind, is_tok = is_tok, period = period, limit = limit,
                               full = full, mode = mode, margin = margin, used = used}
    end
  end
  local busy = 0  -- until when the scope admits nothing (a cooldown, its probe still out)
  local cool = tonumber(st[1] or '0')
  if cool > now then busy = cool end
  if probing and tonumber(st[3] or '0') > now then
    -- its probe is still out: look again soon (its answer, or its expiry, frees the scope)
    busy = math.max(busy, now + math.min(tonumber(st[3]) - now, 250))
  end
  local tok_cap = nil  -- the smallest token window: what an unsure request larger than it is charged
  for _, w in ipairs(windows) do
    if w.is_tok and w.limit > 0 and (tok_cap == nil or w.limit < tok_cap) then tok_cap = w.limit end
  end
  scopes[b] = {state = state, windows = windows, probing = probing, busy = busy, judged = {},
               slow_f0 = slow_f0, slow_at = slow_at,
               tok_factor = tonumber(st[10] or '1'), calibrated = st[10] ~= false, tok_cap = tok_cap,
               out_written = st[13] == '1', out_refuted = st[13] == '0'}
end

-- A request of `need_tokens` (and `need_out` output tokens) on scope s: 'never' (larger than a
-- window), or its wait (ms, 0: it fits now) and the headroom it would leave. Kept per size until
-- the scope admits a request.
local function judge_now(s, need_tokens, need_out, unsure)
  local room, wait = 1.0, 0
  if s.busy > now then wait = s.busy - now end
  for _, w in ipairs(s.windows) do
    local limit, used = w.limit, w.used
    if limit > 0 then
      local need = ({1, need_tokens, need_out})[w.kind + 1]
      local first = w.mode == 3 and used == 0  -- an empty pacing window takes any request
      if w.is_tok and need > limit and unsure then need, first = limit, used == 0 end
      -- max_tokens above an output window may still pass a server that counts output as written:
      -- until the scope knows (a refutation says it does not), such a request goes alone
      if w.kind == 2 and need > limit and not s.out_refuted then need, first = limit, used == 0 end
      if need > limit and not first then
        -- larger than the window only while a slow-down lowers it: it fits once the limit ramps back
        if need > w.full then return 'never' end
        wait = math.max(wait, ramp_wait(s.slow_f0, s.slow_at, need / w.full))
      elseif used + need > limit and not first then
        if w.kind == 2 then
          -- an output window frees as answers come back (each gives back its max_tokens less what
          -- it wrote: settle_out.lua), long before its entries expire: look again soon
          wait = math.max(wait, math.min(token_wait(w.key, used, need, limit, w.period, w.margin), OUT_POLL))
        elseif w.kind > 0 then
          wait = math.max(wait, token_wait(w.key, used, need, limit, w.period, w.margin))
        else
          local oldest = redis.call('ZRANGE', w.key, used - limit, used - limit, 'WITHSCORES')
          wait = math.max(wait, math.min(tonumber(oldest[2]), now) + w.period + w.margin - now + 1)
        end
      end
      room = math.min(room, (limit - used - need) / limit)
    end
  end
  return wait, room
end

local function judge(s, need_tokens, need_out, unsure)
  local memo = need_tokens .. '/' .. need_out .. (unsure and 'u' or '')
  local got = s.judged[memo]
  if got == nil then
    got = {judge_now(s, need_tokens, need_out, unsure)}
    s.judged[memo] = got
  end
  return got[1], got[2]
end

local function admit(s, uid, need_tokens, need_out)
  s.judged = {}
  for _, w in ipairs(s.windows) do
    if w.kind > 0 then
      local amount = w.is_tok and need_tokens or need_out
      redis.call('ZADD', w.key, now + reserve, uid .. ':' .. amount)
      redis.call('HINCRBY', s.state, (w.is_tok and 'tsum:' or 'osum:') .. w.period, amount)
      w.used = w.used + amount
    else
      redis.call('ZADD', w.key, now + reserve, uid)
      w.used = w.used + 1
    end
  end
  if s.probing then
    redis.call('HSET', s.state, 'probe_until', now + probe)
    s.busy = now + math.min(probe, 250)
  end
end

-- The output tokens a request holds on scope s from its admission: its cap, or one token where the
-- server counts output only as it is written (the window must not be full).
local function held_out(s, need_out)
  if s.out_written and need_out > 1 then return 1 end
  return need_out
end

-- The tokens a request counts on scope s: its prompt's estimate times what the scope learned of
-- how its server counts, and the rest (the completion's cap) as is.
local function counted(s, tokens, prompt)
  if prompt <= 0 or s.tok_factor == 1 then return tokens end
  return tokens - prompt + math.ceil(prompt * s.tok_factor - 1e-9)
end

local out = {now}
for r = 1, k do
  local base = 10 + PER_REQUEST * (r - 1)
  local tokens, uid = tonumber(ARGV[base]), ARGV[base + 1]
  local need_out = tonumber(ARGV[base + 6])
  local budget_cost, budget_tokens = tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3])
  local prompt = tonumber(ARGV[base + 4])
  -- an upper bound of a prompt: unsure, unless the completion's cap alone fills a window
  local upper = ARGV[base + 5] == '0' and prompt > 0
  local status, value, charged, held = nil, 0, tokens, need_out
  if budget then
    local b = redis.call('HMGET', budget, 'max_cost_nano', 'spent_nano', 'reserved_nano',
                         'max_tokens_total', 'spent_tokens', 'reserved_tokens')
    local max_cost, max_tokens = tonumber(b[1] or '0'), tonumber(b[4] or '0')
    local reserved_cost, reserved_tokens = tonumber(b[3] or '0'), tonumber(b[6] or '0')
    if (max_cost > 0 and tonumber(b[2] or '0') + reserved_cost + budget_cost > max_cost)
        or (max_tokens > 0 and tonumber(b[5] or '0') + reserved_tokens + budget_tokens > max_tokens) then
      if reserved_cost > 0 or reserved_tokens > 0 then status, value = -2, 250 else status = -3 end
    end
  end
  if status == nil then
    local best, best_room, min_wait, never = nil, -1, nil, 0
    for b = 1, n do
      local s = scopes[b]
      local unsure = upper and not s.calibrated and s.tok_cap ~= nil and tokens - prompt < s.tok_cap
      local wait, room = judge(s, counted(s, tokens, prompt), held_out(s, need_out), unsure)
      if wait == 'never' then
        never = never + 1
      elseif wait > 0 then
        if min_wait == nil or wait < min_wait then min_wait = wait end
      elseif room > best_room then
        best, best_room = b, room
      end
    end
    if best ~= nil then
      local s = scopes[best]
      charged = counted(s, tokens, prompt)
      if upper and not s.calibrated and s.tok_cap ~= nil and charged > s.tok_cap
          and tokens - prompt < s.tok_cap then
        charged = s.tok_cap
      end
      held = held_out(s, need_out)
      admit(s, uid, charged, held)
      if budget then
        redis.call('HINCRBY', budget, 'reserved_nano', budget_cost)
        redis.call('HINCRBY', budget, 'reserved_tokens', budget_tokens)
      end
      status, value = 1, best
    elseif never == n then
      status = -1
    else
      status, value = 0, min_wait or 1000
    end
  end
  out[#out + 1] = status
  out[#out + 1] = value
  out[#out + 1] = charged
  out[#out + 1] = held
  if status == 0 or status == -2 or status == -3 then break end
end
return out
