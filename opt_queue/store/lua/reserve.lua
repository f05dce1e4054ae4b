-- Reserve a batch's worst case in its job's budget (the batch lane's admission), or say why not.
-- KEYS[1] the job's meta hash: max_cost_nano / max_tokens_total (absent or 0: no limit) must hold
--         spent + reserved + this batch
-- ARGV[1] the batch's worst-case cost in nano-dollars   ARGV[2] its worst-case tokens
-- Returns 1 reserved; 0 no room while other requests or batches hold reservations (their real
--         cost may leave some: wait); -1 no room and nothing else reserved (the budget is reached)
local b = redis.call('HMGET', KEYS[1], 'max_cost_nano', 'spent_nano', 'reserved_nano',
                     'max_tokens_total', 'spent_tokens', 'reserved_tokens')
local max_cost, max_tokens = tonumber(b[1] or '0'), tonumber(b[4] or '0')
local reserved_cost, reserved_tokens = tonumber(b[3] or '0'), tonumber(b[6] or '0')
local cost, tokens = tonumber(ARGV[1]), tonumber(ARGV[2])
if (max_cost > 0 and tonumber(b[2] or '0') + reserved_cost + cost > max_cost)
    or (max_tokens > 0 and tonumber(b[5] or '0') + reserved_tokens + tokens > max_tokens) then
  if reserved_cost > 0 or reserved_tokens > 0 then return 0 end
  return -1
end
redis.call('HINCRBY', KEYS[1], 'reserved_nano', cost)
redis.call('HINCRBY', KEYS[1], 'reserved_tokens', tokens)
return 1
