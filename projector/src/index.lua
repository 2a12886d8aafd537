-- Keeps the devices index of one generation (see contract::read_model::DevicesIndex):
-- moves a device to a later last_seen granule, keeping the superseded entry as retired
-- for walks already under way, and deletes entries retired longer than the listing TTL.
--
-- KEYS[1] log (sorted set: entry -> granule), KEYS[2] created (hash: entry -> ms),
-- KEYS[3] retired (sorted set: entry -> ms), KEYS[4] current (hash: device -> granule)
-- ARGV[1] listing TTL (ms; 0 for a generation being built, which no walk reads, so that
-- an entry a move supersedes goes at once), then pairs of device id and granule (ms)
-- A guarded call (guard.lua) has the meta hash as KEYS[5] and the fields as read as
-- its last four arguments, after the pairs.
--
-- Stamps (created, retired, and the expiry's now) are Redis's TIME in ms when the call
-- runs, not the projector's clock when it sent the call: a walk through the list
-- (query's devices_page.lua) takes its snapshot from the same clock, so a call that runs
-- after a walk's first page is never stamped before it. A move stamps the new entry's
-- created and the old entry's retired with the same value (see devices_page.lua for
-- the visibility rule that makes a device visible at exactly one place).
--
-- Idempotent: a granule not later than the device's current one changes nothing.
-- Returns { STALE } when a guarded call finds the generations changed (nothing
-- written), else { entries expired }.

local ttl = tonumber(ARGV[1])
local pairs_end = #ARGV
if #KEYS == 5 then
  if generations_changed() then
    return { STALE }
  end
  pairs_end = #ARGV - 4
end

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)

for i = 2, pairs_end, 2 do
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
