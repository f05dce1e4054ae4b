-- After a call: correct an admission's tokens in the scope's token windows.
-- * A usage above the estimate raises it (the caller only asks when it is larger: the server never
--   gives tokens back for a smaller one), unless the scope has learned how its server counts
--   (a "tok_factor": the headers, not the bill, say what its windows hold).
-- * A request the server refused (a 429: it counted nothing) keeps its place, but no longer takes
--   part in calibration (lua/calibrate.lua): its member loses the estimate in its uid.
-- KEYS[1] the bucket's state hash   KEYS[2..] the bucket's token windows (sorted sets)
-- ARGV[1] admission uid   ARGV[2] tokens counted at admission   ARGV[3] real tokens
-- ARGV[4] 1: refused by the server   ARGV[5..] the period (ms) of each token window, in KEYS order
-- Returns how many windows were changed (expired ones need no correction).
local refused = ARGV[4] == '1'
local delta = tonumber(ARGV[3]) - tonumber(ARGV[2])
if refused or delta < 0 or redis.call('HEXISTS', KEYS[1], 'tok_factor') == 1 then delta = 0 end
if delta == 0 and not refused then return 0 end
local old = ARGV[1] .. ':' .. ARGV[2]
local uid = ARGV[1]
if refused then uid = string.match(uid, '^[^.]*') end
local new = uid .. ':' .. (tonumber(ARGV[2]) + delta)
local fixed = 0
for i = 2, #KEYS do
  local score = redis.call('ZSCORE', KEYS[i], old)
  if score then
    redis.call('ZREM', KEYS[i], old)
    redis.call('ZADD', KEYS[i], score, new)
    if delta ~= 0 then redis.call('HINCRBY', KEYS[1], 'tsum:' .. ARGV[i + 3], delta) end
    fixed = fixed + 1
  end
end
return fixed
