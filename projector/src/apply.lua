-- Applies one device's batch of telemetry.recorded events to its read model, in one or
-- two generations (two while a rebuild is running), atomically, and only events the
-- generation has not applied yet (redeliveries, republishes, a second projector, a
-- replay are skipped).
--
-- The projector has folded the batch already (apply.rs, `DeviceFold`): the script gets
-- the events' ids and, per field it touches, the figures of the batch alone, packed as
-- little-endian doubles (contract::read_model). It merges each into the stored figures
-- with the same rules as `MetricStats::merge` / `Aggregate::merge`: count and sum add,
-- min and max, and "last" as the value with the latest recorded_at (on a tie, the larger
-- value). Every rule is commutative, so the order events arrive in does not matter.
--
-- KEYS     per generation, 3 keys: device hash, applied-events set, buckets hash; then,
--          in a guarded call (guard.lua), the meta hash
-- ARGV[1]  now, ms since the epoch, as text (the applied set's score)
-- ARGV[2]  packed call header, 11 doubles: now, dedup horizon (ms), oldest 10 s bucket
--          kept, oldest 5 min bucket kept, buckets hash expiry (ms), k events, first and
--          last recorded_at (ms), highest stream sequence, M metrics, B bucket fields
-- then     k event ids
-- then     M pairs: device field `m:<metric>`, its packed figures (6 doubles)
-- then     B pairs: bucket field `f<bucket>:<metric>` or `c<bucket>:<metric>`, its
--          packed aggregate (4 doubles)
-- then     in a guarded call, the meta hash's generation, layout and building fields
--          as the projector read them
--
-- Returns STALE alone when a guarded call finds those fields changed (nothing
-- written). Otherwise one number per generation: k when the events were applied, 0
-- when every one of them was applied before (then only updated_at and as_of_seq move:
-- the view is as of this delivery), -1 when some were and some were not. Then nothing
-- was written to that generation: the batch's figures include events it has, and the
-- projector applies those events again one call each.

local pack, unpack_packed = struct.pack, struct.unpack
local call = { unpack_packed('<ddddddddddd', ARGV[2]) }
local now, horizon, oldest_fine, oldest_coarse, buckets_ttl = call[1], call[2], call[3], call[4], call[5]
local k, first_in, last_in, seq_in, M, B = call[6], call[7], call[8], call[9], call[10], call[11]
local IDS = 3
local METRICS = IDS + k
local BUCKETS = METRICS + 2 * M
local GENERATION_KEYS = #KEYS - #KEYS % 3
if GENERATION_KEYS < #KEYS and generations_changed() then
  return { STALE }
end
-- Buckets are pruned once this many 10 s buckets (5 minutes) fell out of the retention.
local PRUNE_EVERY = 30
-- Redis keeps a hash of up to 512 fields (`hash-max-listpack-entries`) as a listpack
-- and finds a field in it by scanning from the front, while the buckets a call touches
-- are the newest, at the back. Past this many fields the scans cost more than hashing
-- (Redis CPU per event as a hash table, examples/apply_cost.rs: ~165 fields -29%,
-- ~110 -16%, ~75 -7%, memory +19..30%; ~275 / ~400 fields -14% / -22..45% on an
-- earlier machine), so the hash then gets a field whose value is longer than
-- `hash-max-listpack-value` (64 bytes), which turns it into a hash table for good
-- (contract::read_model::BUCKETS_HASH_TABLE_FIELD).
local HASH_TABLE_AT = 128
local HASH_TABLE_FIELD = '~'
local HASH_TABLE_NOTE = 'turns this hash into a hash table: its fields are looked up, not scanned for'

-- Records the ids in the applied set if none of them is there: 'all' (recorded now),
-- 'none' (every one was there) or 'mixed' (nothing recorded).
local function record_applied(applied)
  if k == 1 then
    if redis.call('ZADD', applied, 'NX', ARGV[1], ARGV[IDS]) == 1 then
      return 'all'
    end
    return 'none'
  end
  local scores = redis.call('ZMSCORE', applied, unpack(ARGV, IDS, METRICS - 1))
  local present = 0
  for i = 1, k do
    if scores[i] then
      present = present + 1
    end
  end
  if present == k then
    return 'none'
  end
  if present > 0 then
    return 'mixed'
  end
  local entries = {}
  for i = IDS, METRICS - 1 do
    entries[#entries + 1] = ARGV[1]
    entries[#entries + 1] = ARGV[i]
  end
  redis.call('ZADD', applied, unpack(entries))
  return 'all'
end

-- Drops the buckets that fell out of the retention: one HKEYS pass over the hash every
-- PRUNE_EVERY 10 s buckets. Returns the oldest 10 s bucket kept from now on.
local function prune(buckets, pruned)
  if oldest_fine - pruned < PRUNE_EVERY then
    return pruned
  end
  local stale = {}
  for _, field in ipairs(redis.call('HKEYS', buckets)) do
    local tag, bucket = string.match(field, '^([fc])(%-?%d+):')
    bucket = tonumber(bucket)
    if bucket and ((tag == 'f' and bucket < oldest_fine) or (tag == 'c' and bucket < oldest_coarse)) then
      stale[#stale + 1] = field
    end
  end
  if #stale > 0 then
    redis.call('HDEL', buckets, unpack(stale))
  end
  return oldest_fine
end

-- Merges the batch's bucket aggregates into the buckets hash. Returns whether a bucket
-- field was created (then the hash may need pruning and a new expiry).
local function add_to_buckets(buckets)
  local fields = {}
  for j = 0, B - 1 do
    fields[j + 1] = ARGV[BUCKETS + 2 * j]
  end
  local stored = redis.call('HMGET', buckets, unpack(fields))
  local updates, created = {}, false
  for j = 1, B do
    local batch = ARGV[BUCKETS + 2 * j - 1]
    updates[#updates + 1] = fields[j]
    if stored[j] then
      local count, sum, min, max = unpack_packed('<dddd', stored[j])
      local b_count, b_sum, b_min, b_max = unpack_packed('<dddd', batch)
      if b_min < min then min = b_min end
      if b_max > max then max = b_max end
      updates[#updates + 1] = pack('<dddd', count + b_count, sum + b_sum, min, max)
    else
      created = true
      updates[#updates + 1] = batch
    end
  end
  if created and redis.call('HLEN', buckets) >= HASH_TABLE_AT then
    updates[#updates + 1] = HASH_TABLE_FIELD
    updates[#updates + 1] = HASH_TABLE_NOTE
  end
  redis.call('HSET', buckets, unpack(updates))
  return created
end

-- Every event was applied before: the figures stay, the view is as of now.
local function touch(device)
  local header = redis.call('HGET', device, 'h')
  if header then
    local first, last, count, seq, _, trim_at, pruned = unpack_packed('<ddddddd', header)
    if seq_in > seq then seq = seq_in end
    redis.call('HSET', device, 'h', pack('<ddddddd', first, last, count, seq, now, trim_at, pruned))
  end
end

local function apply_generation(device, applied, buckets)
  local recorded = record_applied(applied)
  if recorded == 'mixed' then
    return -1
  end
  if recorded == 'none' then
    touch(device)
    return 0
  end
  local wanted = { 'h' }
  for j = 0, M - 1 do
    wanted[j + 2] = ARGV[METRICS + 2 * j]
  end
  local stored = redis.call('HMGET', device, unpack(wanted))
  local first, last, count, seq, trim_at, pruned = first_in, last_in, 0, seq_in, 0, 0
  if stored[1] then
    local s_first, s_last, s_count, s_seq, _, s_trim_at, s_pruned = unpack_packed('<ddddddd', stored[1])
    if s_first < first then first = s_first end
    if s_last > last then last = s_last end
    if s_seq > seq then seq = s_seq end
    count, trim_at, pruned = s_count, s_trim_at, s_pruned
  end
  -- Slot 2 gets the header once the schedules below are settled.
  local writes = { 'h', false }
  for j = 1, M do
    local batch = ARGV[METRICS + 2 * j - 1]
    writes[#writes + 1] = wanted[j + 1]
    if stored[j + 1] then
      local n, sum, min, max, last_value, last_at = unpack_packed('<dddddd', stored[j + 1])
      local b_n, b_sum, b_min, b_max, b_last, b_last_at = unpack_packed('<dddddd', batch)
      if b_min < min then min = b_min end
      if b_max > max then max = b_max end
      if b_last_at > last_at or (b_last_at == last_at and b_last > last_value) then
        last_value, last_at = b_last, b_last_at
      end
      writes[#writes + 1] = pack('<dddddd', n + b_n, sum + b_sum, min, max, last_value, last_at)
    else
      writes[#writes + 1] = batch
    end
  end
  if B > 0 and add_to_buckets(buckets) then
    pruned = prune(buckets, pruned)
    redis.call('PEXPIRE', buckets, buckets_ttl)
  end
  -- The applied set is trimmed to the horizon a tenth of the horizon at a time; its
  -- expiry then outlasts every id recorded until the next trim by the horizon.
  if now >= trim_at then
    local step = math.floor(horizon / 10)
    redis.call('ZREMRANGEBYSCORE', applied, '-inf', now - horizon)
    redis.call('PEXPIRE', applied, horizon + step)
    trim_at = now + step
  end
  writes[2] = pack('<ddddddd', first, last, count + k, seq, now, trim_at, pruned)
  redis.call('HSET', device, unpack(writes))
  return k
end

local results = {}
for g = 1, GENERATION_KEYS, 3 do
  results[#results + 1] = apply_generation(KEYS[g], KEYS[g + 1], KEYS[g + 2])
end
return results
