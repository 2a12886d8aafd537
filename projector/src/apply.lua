-- Applies a batch of one device's telemetry.recorded events to its read model, atomically,
-- skipping every event already applied (redeliveries, republishes, a second projector).
--
-- KEYS[1]  the device hash            <prefix>device:{<id>}
-- KEYS[2]  the applied-events set     <prefix>device:{<id>}:applied
-- ARGV[1]  now, ms since the epoch
-- ARGV[2]  dedup horizon, ms: how long an applied event id is remembered
-- ARGV[3..] per event: event_id, recorded_at (ms), stream sequence, metric count n,
--           then n pairs of metric name and value (shortest round-trip decimal)
--
-- Returns the number of events applied; the others were already there.
-- Every aggregate is commutative, so the order events arrive in does not matter:
-- count, sum, min, max, and "last" as the value with the latest recorded_at
-- (on a tie, the larger value).

local device, applied = KEYS[1], KEYS[2]
local now = tonumber(ARGV[1])
local horizon = tonumber(ARGV[2])
local applied_count = 0
local as_of_seq = tonumber(redis.call('HGET', device, 'as_of_seq')) or 0

local i = 3
while i <= #ARGV do
  local event_id = ARGV[i]
  local recorded_text = ARGV[i + 1]
  local recorded = tonumber(recorded_text)
  local seq = tonumber(ARGV[i + 2])
  local metric_count = tonumber(ARGV[i + 3])
  local first_metric = i + 4
  i = first_metric + 2 * metric_count
  if seq > as_of_seq then
    as_of_seq = seq
  end
  if redis.call('ZADD', applied, 'NX', now, event_id) == 1 then
    applied_count = applied_count + 1
    redis.call('HINCRBY', device, 'sample_count', 1)
    local seen = redis.call('HMGET', device, 'first_seen', 'last_seen')
    local first_seen, last_seen = tonumber(seen[1]), tonumber(seen[2])
    if first_seen == nil or recorded < first_seen then
      redis.call('HSET', device, 'first_seen', recorded_text)
    end
    if last_seen == nil or recorded > last_seen then
      redis.call('HSET', device, 'last_seen', recorded_text)
    end
    for m = first_metric, i - 1, 2 do
      local field = 'm:' .. ARGV[m] .. ':'
      local value_text = ARGV[m + 1]
      local value = tonumber(value_text)
      local current = redis.call('HMGET', device,
        field .. 'count', field .. 'sum', field .. 'min', field .. 'max', field .. 'last', field .. 'last_at')
      local count = tonumber(current[1]) or 0
      local sum = (tonumber(current[2]) or 0) + value
      local updates = { field .. 'count', count + 1, field .. 'sum', string.format('%.17g', sum) }
      if count == 0 or value < tonumber(current[3]) then
        table.insert(updates, field .. 'min')
        table.insert(updates, value_text)
      end
      if count == 0 or value > tonumber(current[4]) then
        table.insert(updates, field .. 'max')
        table.insert(updates, value_text)
      end
      local last_at = tonumber(current[6])
      if last_at == nil or recorded > last_at or (recorded == last_at and value > tonumber(current[5])) then
        table.insert(updates, field .. 'last')
        table.insert(updates, value_text)
        table.insert(updates, field .. 'last_at')
        table.insert(updates, recorded_text)
      end
      redis.call('HSET', device, unpack(updates))
    end
  end
end

redis.call('HSET', device, 'updated_at', now, 'as_of_seq', as_of_seq)
redis.call('ZREMRANGEBYSCORE', applied, '-inf', now - horizon)
redis.call('PEXPIRE', applied, horizon)
return applied_count
