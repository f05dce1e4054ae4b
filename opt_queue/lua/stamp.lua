-- Score a reserved admission with the moment its request is sent (Redis' clock), so that its windows
-- run from when the server can first see it, however long the request waited for a thread or a
-- connection after admission.
-- KEYS    the bucket's windows (sorted sets), request windows first
-- ARGV[1] admission uid   ARGV[2] tokens reserved   ARGV[3] number of request windows
-- Returns the stamp (ms).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local nreq = tonumber(ARGV[3])
for i = 1, #KEYS do
  local member = ARGV[1]
  if i > nreq then member = member .. ':' .. ARGV[2] end
  redis.call('ZADD', KEYS[i], 'XX', now, member)
end
return now
