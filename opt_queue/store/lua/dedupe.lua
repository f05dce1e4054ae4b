-- Identical requests of a job are paid once: the first row with a request (its *primary*) is sent,
-- the others become its *copies* and get its result when it is published (lua/publish.lua).
-- KEYS[1..3] row state (_rows.lua)   KEYS[4] requests hash (request hash -> "slot\nindex" of the
-- primary)   KEYS[5] copies hash (primary index -> JSON list of "slot\nindex")
-- ARGV    triples: request hash, slot, index, of rows just claimed
-- Returns the indices of the rows that became copies (they are not enqueued). A row whose primary
-- is already published (or not claimed) becomes the primary itself: it is sent.
local copies = {}
for i = 1, #ARGV, 3 do
  local h, slot, index = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local primary = redis.call('HGET', KEYS[4], h)
  local copied = false
  if primary then
    local sep = string.find(primary, '\n', 1, true)
    local pslot, pindex = string.sub(primary, 1, sep - 1), string.sub(primary, sep + 1)
    if pindex ~= index and row_get(pslot, 'claimed') == 1 and row_get(pslot, 'done') == 0 then
      local list = cjson.decode(redis.call('HGET', KEYS[5], pindex) or '[]')
      list[#list + 1] = slot .. '\n' .. index
      redis.call('HSET', KEYS[5], pindex, cjson.encode(list))
      copies[#copies + 1] = index
      copied = true
    end
  end
  if not copied then
    redis.call('HSET', KEYS[4], h, slot .. '\n' .. index)
  end
end
return copies
