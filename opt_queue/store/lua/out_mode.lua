-- How a scope's server counts output tokens in its output-token window (Anthropic's third window),
-- as its headers showed it. Anthropic's documentation has said both that output tokens are
-- "estimated from max_tokens at the start, adjusted at the end" and that only actual output counts:
-- a scope holds each request's max_tokens from its admission until its headers refute the first
-- (lua/acquire.lua holds one token then, "out_written"); an output-token 429 while it does so
-- refutes the reading, and for good (a server whose headers are stated after the adjustment looks
-- like the second while it counts like the first).
-- KEYS[1] the scope's state hash
-- ARGV[1] "written": the headers showed less used than this request's own max_tokens
--         "refuted": an output-token 429 while the scope held one token per request
-- Returns 1 when the scope's mode changed.
local written = redis.call('HGET', KEYS[1], 'out_written')
if ARGV[1] == 'written' then
  if written then return 0 end  -- '1' already, or '0' after a refutation: kept
  redis.call('HSET', KEYS[1], 'out_written', '1')
  return 1
end
if written == '0' then return 0 end
redis.call('HSET', KEYS[1], 'out_written', '0')
return 1
