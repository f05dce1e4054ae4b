-- Row state, shared by every row script (prepended by scripts.py). A row is its input index: a
-- small decimal index is a bit of two bitmaps, any other index a field of a hash of flags.
-- KEYS[1] claimed bitmap   KEYS[2] done bitmap   KEYS[3] rows hash (index -> flags: 1 claimed, 2 done)
-- A slot is "17" (bit 17) or "s<index>" (hash field <index>): keys.slot() in Python.
-- claimed=1 done=0: queued or in flight     claimed=1 done=1: published, not collected yet
-- claimed=0 done=1: collected (on disk)     claimed=0 done=0: never sent, or given back
local ROW_FLAG = {claimed = 1, done = 2}
local ROW_BITMAP = {claimed = KEYS[1], done = KEYS[2]}

local function row_get(slot, flag)
  if string.byte(slot, 1) == 115 then
    local v = tonumber(redis.call('HGET', KEYS[3], string.sub(slot, 2)) or '0')
    return math.floor(v / ROW_FLAG[flag]) % 2
  end
  return redis.call('GETBIT', ROW_BITMAP[flag], tonumber(slot))
end

-- Set a flag to 0 or 1; return its previous value.
local function row_set(slot, flag, value)
  if string.byte(slot, 1) == 115 then
    local field = string.sub(slot, 2)
    local v = tonumber(redis.call('HGET', KEYS[3], field) or '0')
    local old = math.floor(v / ROW_FLAG[flag]) % 2
    if old ~= value then
      v = v + (value - old) * ROW_FLAG[flag]
      if v == 0 then redis.call('HDEL', KEYS[3], field) else redis.call('HSET', KEYS[3], field, v) end
    end
    return old
  end
  return redis.call('SETBIT', ROW_BITMAP[flag], tonumber(slot), value)
end

local function redis_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
