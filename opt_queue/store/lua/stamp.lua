-- Score a reserved admission with the moment its request was sent, on Redis' clock, so that its
-- windows run from when the server can first see it, however long the request waited for the
-- event loop or a connection after admission.
-- KEYS    the bucket's windows (sorted sets), request windows first
-- ARGV[1] admission uid   ARGV[2] tokens reserved   ARGV[3] number of request windows
-- ARGV[4] (optional) when the request was sent, ms on Redis' clock as the worker reads it
-- ARGV[5] (optional) when it was admitted (ms): the stamp is never earlier
-- ARGV[6] (optional) 1: ARGV[4] is the time itself (tests control time), taken as is
-- ARGV[7] (optional) number of token windows, after the request windows; the windows after them
--         are output-token windows, whose entries hold ARGV[8] tokens (without ARGV[7] every
--         window after the request windows is a token window)
-- Without ARGV[4] the stamp is now (TIME). A sent time is kept between the admission and now.
-- Returns the stamp (ms).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local stamp = now
local sent = tonumber(ARGV[4])
if ARGV[6] == '1' then
  stamp = sent
elseif sent ~= nil and sent < now then
  stamp = math.max(sent, tonumber(ARGV[5]) or sent)
end
local nreq = tonumber(ARGV[3])
local ntok = tonumber(ARGV[7]) or (#KEYS - nreq)
for i = 1, #KEYS do
  local member = ARGV[1]
  if i > nreq + ntok then
    member = member .. ':' .. ARGV[8]
  elseif i > nreq then
    member = member .. ':' .. ARGV[2]
  end
  redis.call('ZADD', KEYS[i], 'XX', stamp, member)
end
return stamp
