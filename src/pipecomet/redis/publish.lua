-- pipecomet: one publish on one topic, atomically (EVALSHA).
--
-- KEYS[1] topic meta hash (fields: epoch, offset)
-- KEYS[2] topic stream (entry id "<offset>-0"; fields e=event, d=data, t=ms)
-- KEYS[3] idempotency key of this publish, or "" for none
-- ARGV[1] event   ARGV[2] data (compact JSON)   ARGV[3] stream MAXLEN (~)
-- ARGV[4] history age in ms (entries older are trimmed)
-- ARGV[5] idempotency TTL in s   ARGV[6] pub/sub channel   ARGV[7] topic
-- ARGV[8] a fresh epoch, used when the topic has none (history lost)
-- ARGV[9] seconds the topic's keys live after its last publish
--
-- Returns {id, duplicate (0|1), processes reached by PUBLISH}.
local meta, stream, idem = KEYS[1], KEYS[2], KEYS[3]
if idem ~= '' then
  local seen = redis.call('GET', idem)
  if seen then
    return {seen, 1, 0}
  end
end
local epoch = redis.call('HGET', meta, 'epoch')
if not epoch then
  -- No epoch: the topic is new or its history was lost (restart without
  -- persistence, eviction, expiry).  Its offsets start again in a new epoch.
  epoch = ARGV[8]
  redis.call('DEL', stream)
  redis.call('HSET', meta, 'epoch', epoch, 'offset', 0)
end
local offset = redis.call('HINCRBY', meta, 'offset', 1)
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local maxlen = tonumber(ARGV[3])
if maxlen > 0 then
  redis.call('XADD', stream, 'MAXLEN', '~', maxlen, offset .. '-0',
             'e', ARGV[1], 'd', ARGV[2], 't', ms)
  -- The age bound: drop the oldest entries past it (a few per publish).
  local cutoff = ms - tonumber(ARGV[4])
  local oldest = redis.call('XRANGE', stream, '-', '+', 'COUNT', 16)
  local keep = nil
  for _, entry in ipairs(oldest) do
    local fields = entry[2]
    local t = nil
    for i = 1, #fields, 2 do
      if fields[i] == 't' then t = tonumber(fields[i + 1]) end
    end
    if t ~= nil and t > cutoff then
      keep = entry[1]
      break
    end
  end
  if keep == nil and #oldest > 0 then
    -- all of these are stale: trim them, the rest at the next publish
    keep = string.match(oldest[#oldest][1], '^(%d+)') .. '-1'
  end
  if keep ~= nil then
    redis.call('XTRIM', stream, 'MINID', keep)
  end
  redis.call('EXPIRE', stream, ARGV[9])
end
redis.call('EXPIRE', meta, ARGV[9])
local id = epoch .. ':' .. offset
if idem ~= '' then
  redis.call('SET', idem, id, 'EX', ARGV[5])
end
local reached = redis.call('PUBLISH', ARGV[6],
  ARGV[7] .. '\n' .. id .. '\n' .. ARGV[1] .. '\n' .. ms .. '\n' .. ARGV[2])
return {id, 0, reached}
