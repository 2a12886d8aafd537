-- Applies a batch of one device's telemetry.recorded events to its read model, in one or
-- two generations (two while a rebuild is running), atomically, skipping every event the
-- generation already applied (redeliveries, republishes, a second projector, a replay).
--
-- KEYS     per generation, 4 keys: device hash, applied-events set, 10 s buckets, 5 min buckets
-- ARGV[1]  now, ms since the epoch
-- ARGV[2]  dedup horizon, ms: how long an applied event id is remembered
-- ARGV[3], ARGV[4]  fine buckets: width and retention, ms
-- ARGV[5], ARGV[6]  coarse buckets: width and retention, ms
-- ARGV[7..] per event: event_id, recorded_at (ms), stream sequence, metric count n,
--           then n pairs of metric name and value (shortest round-trip decimal)
--
-- Returns the number of events the first generation applied; the others were already there.
-- Every aggregate is commutative, so the order events arrive in does not matter:
-- count, sum, min, max, and "last" as the value with the latest recorded_at (on a tie,
-- the larger value). Buckets are chosen by recorded_at, so late data lands where it belongs.

local now = tonumber(ARGV[1])
local horizon = tonumber(ARGV[2])
local resolutions = {
  { width = tonumber(ARGV[3]), retention = tonumber(ARGV[4]), key = 1 },
  { width = tonumber(ARGV[5]), retention = tonumber(ARGV[6]), key = 2 },
}
local FIRST_EVENT = 7

local function add_to_bucket(key, resolution, recorded, name, value, value_text)
  local width = resolution.width
  if recorded + width <= now - resolution.retention then
    return -- the bucket has expired already
  end
  local field = string.format('%d:%s', math.floor(recorded / width), name)
  local current = redis.call('HGET', key, field)
  local text
  if current then
    local count, sum, min, max = string.match(current, '^(%S+) (%S+) (%S+) (%S+)$')
    if value < tonumber(min) then
      min = value_text
    end
    if value > tonumber(max) then
      max = value_text
    end
    text = string.format('%d %.17g %s %s', tonumber(count) + 1, tonumber(sum) + value, min, max)
  else
    text = '1 ' .. value_text .. ' ' .. value_text .. ' ' .. value_text
  end
  redis.call('HSET', key, field, text)
end

-- Deletes the buckets that fell out of the retention, at most once a minute per key,
-- and lets the whole hash expire when the device stops sending.
local function prune(key, resolution)
  local width = resolution.width
  local oldest_kept = math.floor((now - resolution.retention) / width) + 1
  local pruned = tonumber(redis.call('HGET', key, '_pruned')) or 0
  if oldest_kept - pruned >= math.max(1, math.floor(60000 / width)) then
    for _, field in ipairs(redis.call('HKEYS', key)) do
      local bucket = tonumber(string.match(field, '^(%-?%d+):'))
      if bucket and bucket < oldest_kept then
        redis.call('HDEL', key, field)
      end
    end
    redis.call('HSET', key, '_pruned', oldest_kept)
  end
  redis.call('PEXPIRE', key, resolution.retention + width)
end

local function apply_generation(device, applied, buckets)
  local applied_count = 0
  local as_of_seq = tonumber(redis.call('HGET', device, 'as_of_seq')) or 0
  local i = FIRST_EVENT
  while i <= #ARGV do
    local event_id = ARGV[i]
    local recorded_text = ARGV[i + 1]
    local recorded = tonumber(recorded_text)
    local seq = tonumber(ARGV[i + 2])
    local first_metric = i + 4
    i = first_metric + 2 * tonumber(ARGV[i + 3])
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
        local name, value_text = ARGV[m], ARGV[m + 1]
        local value = tonumber(value_text)
        local field = 'm:' .. name .. ':'
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
        for _, resolution in ipairs(resolutions) do
          add_to_bucket(buckets[resolution.key], resolution, recorded, name, value, value_text)
        end
      end
    end
  end
  redis.call('HSET', device, 'updated_at', now, 'as_of_seq', as_of_seq)
  redis.call('ZREMRANGEBYSCORE', applied, '-inf', now - horizon)
  redis.call('PEXPIRE', applied, horizon)
  for _, resolution in ipairs(resolutions) do
    prune(buckets[resolution.key], resolution)
  end
  return applied_count
end

local result = nil
for g = 1, #KEYS, 4 do
  local applied_count = apply_generation(KEYS[g], KEYS[g + 1], { KEYS[g + 2], KEYS[g + 3] })
  result = result or applied_count
end
return result or 0
