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

-- Folds the new events' values into one bucket hash: one HMGET and one HSET for all
-- the fields the batch touches. Returns whether a bucket field was created.
local function add_to_buckets(key, resolution, events)
  local width = resolution.width
  local fields, order = {}, {}
  for _, event in ipairs(events) do
    if event.recorded + width > now - resolution.retention then -- else the bucket expired already
      local bucket = string.format('%d', math.floor(event.recorded / width))
      for _, metric in ipairs(event.metrics) do
        local field = bucket .. ':' .. metric.name
        if fields[field] == nil then
          fields[field] = {}
          table.insert(order, field)
        end
        table.insert(fields[field], metric)
      end
    end
  end
  if #order == 0 then
    return false
  end
  local current = redis.call('HMGET', key, unpack(order))
  local updates, created = {}, false
  for i, field in ipairs(order) do
    local count, sum, min_text, max_text = 0, 0, nil, nil
    if current[i] then
      local c, s, mn, mx = string.match(current[i], '^(%S+) (%S+) (%S+) (%S+)$')
      count, sum, min_text, max_text = tonumber(c), tonumber(s), mn, mx
    else
      created = true
    end
    for _, metric in ipairs(fields[field]) do
      count = count + 1
      sum = sum + metric.value
      if min_text == nil or metric.value < tonumber(min_text) then
        min_text = metric.text
      end
      if max_text == nil or metric.value > tonumber(max_text) then
        max_text = metric.text
      end
    end
    table.insert(updates, field)
    table.insert(updates, string.format('%d %.17g %s %s', count, sum, min_text, max_text))
  end
  redis.call('HSET', key, unpack(updates))
  return created
end

-- Deletes the buckets that fell out of the retention, at most once a minute per key,
-- and lets the whole hash expire when the device stops sending. Needed only when a
-- bucket field was created: the expiry set then outlasts every older bucket.
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

-- The events of this call, parsed once.
local function parse_events()
  local events, max_seq = {}, 0
  local i = FIRST_EVENT
  while i <= #ARGV do
    local event = { id = ARGV[i], recorded_text = ARGV[i + 1], recorded = tonumber(ARGV[i + 1]), metrics = {} }
    local seq = tonumber(ARGV[i + 2])
    local first_metric = i + 4
    i = first_metric + 2 * tonumber(ARGV[i + 3])
    for m = first_metric, i - 1, 2 do
      table.insert(event.metrics, { name = ARGV[m], text = ARGV[m + 1], value = tonumber(ARGV[m + 1]) })
    end
    if seq > max_seq then
      max_seq = seq
    end
    table.insert(events, event)
  end
  return events, max_seq
end

local EVENTS, MAX_SEQ = parse_events()

local function apply_generation(device, applied, buckets)
  local new = {}
  for _, event in ipairs(EVENTS) do
    if redis.call('ZADD', applied, 'NX', now, event.id) == 1 then
      table.insert(new, event)
    end
  end
  -- Read every field the new events touch at once, fold in locals, write the changed
  -- fields at once. Field names are built once per metric, values kept as numbers.
  local metrics, metric_of = {}, {}
  local wanted = { 'as_of_seq', 'first_seen', 'last_seen', 'sample_count' }
  for _, event in ipairs(new) do
    for _, metric in ipairs(event.metrics) do
      if not metric_of[metric.name] then
        local field = 'm:' .. metric.name .. ':'
        local state = {
          name = metric.name,
          first = #wanted + 1,
          count_field = field .. 'count', sum_field = field .. 'sum',
          min_field = field .. 'min', max_field = field .. 'max',
          last_field = field .. 'last', last_at_field = field .. 'last_at',
        }
        wanted[#wanted + 1] = state.count_field
        wanted[#wanted + 1] = state.sum_field
        wanted[#wanted + 1] = state.min_field
        wanted[#wanted + 1] = state.max_field
        wanted[#wanted + 1] = state.last_field
        wanted[#wanted + 1] = state.last_at_field
        metric_of[metric.name] = state
        metrics[#metrics + 1] = state
      end
    end
  end
  local values = redis.call('HMGET', device, unpack(wanted))
  for _, state in ipairs(metrics) do
    local at = state.first
    state.count = tonumber(values[at]) or 0
    state.sum = tonumber(values[at + 1]) or 0
    state.min_text, state.max_text = values[at + 2], values[at + 3]
    state.min, state.max = tonumber(state.min_text), tonumber(state.max_text)
    state.last_text, state.last_at_text = values[at + 4], values[at + 5]
    state.last, state.last_at = tonumber(state.last_text), tonumber(state.last_at_text)
  end
  local as_of_seq = tonumber(values[1]) or 0
  if MAX_SEQ > as_of_seq then
    as_of_seq = MAX_SEQ
  end
  local first_seen, last_seen = tonumber(values[2]), tonumber(values[3])
  local first_seen_text, last_seen_text = nil, nil
  for _, event in ipairs(new) do
    local recorded = event.recorded
    if first_seen == nil or recorded < first_seen then
      first_seen, first_seen_text = recorded, event.recorded_text
    end
    if last_seen == nil or recorded > last_seen then
      last_seen, last_seen_text = recorded, event.recorded_text
    end
    for _, metric in ipairs(event.metrics) do
      local state = metric_of[metric.name]
      local value = metric.value
      if state.count == 0 or value < state.min then
        state.min, state.min_text, state.min_changed = value, metric.text, true
      end
      if state.count == 0 or value > state.max then
        state.max, state.max_text, state.max_changed = value, metric.text, true
      end
      state.count = state.count + 1
      state.sum = state.sum + value
      if state.last_at == nil or recorded > state.last_at or (recorded == state.last_at and value > state.last) then
        state.last, state.last_text = value, metric.text
        state.last_at, state.last_at_text, state.last_changed = recorded, event.recorded_text, true
      end
    end
  end
  local writes = { 'updated_at', now, 'as_of_seq', string.format('%d', as_of_seq) }
  if #new > 0 then
    writes[#writes + 1] = 'sample_count'
    writes[#writes + 1] = tostring((tonumber(values[4]) or 0) + #new)
  end
  if first_seen_text then
    writes[#writes + 1] = 'first_seen'
    writes[#writes + 1] = first_seen_text
  end
  if last_seen_text then
    writes[#writes + 1] = 'last_seen'
    writes[#writes + 1] = last_seen_text
  end
  for _, state in ipairs(metrics) do
    writes[#writes + 1] = state.count_field
    writes[#writes + 1] = tostring(state.count)
    writes[#writes + 1] = state.sum_field
    writes[#writes + 1] = string.format('%.17g', state.sum)
    if state.min_changed then
      writes[#writes + 1] = state.min_field
      writes[#writes + 1] = state.min_text
    end
    if state.max_changed then
      writes[#writes + 1] = state.max_field
      writes[#writes + 1] = state.max_text
    end
    if state.last_changed then
      writes[#writes + 1] = state.last_field
      writes[#writes + 1] = state.last_text
      writes[#writes + 1] = state.last_at_field
      writes[#writes + 1] = state.last_at_text
    end
  end
  redis.call('HSET', device, unpack(writes))
  for _, resolution in ipairs(resolutions) do
    if add_to_buckets(buckets[resolution.key], resolution, new) then
      prune(buckets[resolution.key], resolution)
    end
  end
  redis.call('ZREMRANGEBYSCORE', applied, '-inf', now - horizon)
  redis.call('PEXPIRE', applied, horizon)
  return #new
end

local result = nil
for g = 1, #KEYS, 4 do
  local applied_count = apply_generation(KEYS[g], KEYS[g + 1], { KEYS[g + 2], KEYS[g + 3] })
  result = result or applied_count
end
return result or 0
