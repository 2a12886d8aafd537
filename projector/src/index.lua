-- Keeps the devices index of one generation (see contract::read_model::DevicesIndex):
-- moves a device to a later last_seen granule, keeping the superseded entry as retired
-- for walks already under way, and deletes entries retired longer than the listing TTL.
--
-- KEYS[1] log (sorted set: entry -> granule), KEYS[2] created (hash: entry -> ms),
-- KEYS[3] retired (sorted set: entry -> ms), KEYS[4] current (hash: device -> granule)
-- ARGV[1] now (ms), ARGV[2] listing TTL (ms), then pairs of device id and granule (ms)
-- A guarded call (guard.lua) has the meta hash as KEYS[5] and the fields as read as
-- its last three arguments, after the pairs.
--
-- Idempotent: a granule not later than the device's current one changes nothing.
-- Returns { STALE } when a guarded call finds the generations changed (nothing
-- written), else { entries expired }.

local now = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local pairs_end = #ARGV
if #KEYS == 5 then
  if generations_changed() then
    return { STALE }
  end
  pairs_end = #ARGV - 3
end

for i = 3, pairs_end, 2 do
  local device, granule = ARGV[i], tonumber(ARGV[i + 1])
  local current = tonumber(redis.call('HGET', KEYS[4], device))
  if current == nil or granule > current then
    local entry = string.format('%d:%s', granule, device)
    redis.call('ZADD', KEYS[1], granule, entry)
    redis.call('HSET', KEYS[2], entry, now)
    redis.call('HSET', KEYS[4], device, granule)
    if current ~= nil then
      redis.call('ZADD', KEYS[3], now, string.format('%d:%s', current, device))
    end
  end
end

local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now - ttl, 'LIMIT', 0, 1000)
for _, entry in ipairs(expired) do
  redis.call('ZREM', KEYS[1], entry)
  redis.call('HDEL', KEYS[2], entry)
  redis.call('ZREM', KEYS[3], entry)
end
return { #expired }
