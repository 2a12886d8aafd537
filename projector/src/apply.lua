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
-- It reads and plans every generation first and writes after (only the prune of
-- buckets past their retention comes earlier, harmless whatever follows), so a call
-- that fails on the way leaves its ids unrecorded and its retry applies it whole.
--
-- KEYS     per generation, 3 keys: device hash, applied-events set, buckets hash; then,
--          in a guarded call (guard.lua), the meta hash
-- ARGV[1]  packed call header, 13 doubles: now, dedup horizon (ms), the 10 s buckets'
--          width and retention (ms), the 5 min buckets' width and retention (ms), buckets
--          hash expiry (ms, from the batch's latest reading on, never shortened), k events, first and last recorded_at (ms), highest stream
--          sequence, M metrics, B bucket fields
-- then     k event ids
-- then     M pairs: device field `m:<metric>`, its packed figures (6 doubles)
-- then     B pairs: bucket field `f<bucket>:<metric>` or `c<bucket>:<metric>`, its
--          packed aggregate (4 doubles)
-- then     in a guarded call, the meta hash's generation, layout, building and
--          replay_last fields as the projector read them
--
-- Returns STALE alone when a guarded call finds those fields changed (nothing
-- written). Otherwise one number per generation: k when the events were applied, 0
-- when every one of them was applied before (then only updated_at and as_of_seq move:
-- the view is as of this delivery; and the ids are recorded again as of now), -1 when
-- some were and some were not. Then nothing was written to that generation: the
-- batch's figures include events it has, and the projector applies those events again
-- one call each.

local pack, unpack_packed = struct.pack, struct.unpack
local call = { unpack_packed('<ddddddddddddd', ARGV[1]) }
local now, horizon, buckets_ttl = call[1], call[2], call[7]
-- The applied sets are kept by Redis's clock, not by the projector's `now`: every
-- projector (on hosts whose clocks may differ) records, trims and renews them on one
-- clock. A projector whose clock ran a minute fast used to set a device's next trim a
-- minute ahead, so that the others never renewed the set's expiry and it expired under
-- ids they had recorded moments before, and their redeliveries counted twice.
local clock = redis.call('TIME')
local applied_now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local APPLIED_SCORE = string.format('%.0f', applied_now)
-- The oldest 10 s and 5 min buckets kept (contract::read_model,
-- `Resolution::oldest_kept`), by the earlier of the projector's clock and Redis's: a
-- projector whose clock ran ahead used to prune, and leave out, buckets still in a
-- window; one whose clock lags keeps them a little longer.
local kept_as_of = math.min(now, applied_now)
local function oldest_kept(width, retention)
  return math.floor((kept_as_of - retention) / width) + 1
end
local oldest_fine, oldest_coarse = oldest_kept(call[3], call[4]), oldest_kept(call[5], call[6])
-- The applied set is trimmed to the horizon this often (a tenth of it).
local TRIM_STEP = math.floor(horizon / 10)
local k, first_in, last_in, seq_in, M, B = call[8], call[9], call[10], call[11], call[12], call[13]
local IDS = 2
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

-- Lua 5.1 in Redis unpacks at most about 8,000 values at once ("too many results to
-- unpack"). A call's own arguments are bounded (apply.rs, FIELDS_PER_CALL_MAX), but what
-- the stored hashes hold is not (a device silent for an hour has thousands of buckets
-- to prune): every command with a variable number of arguments goes through
-- `call_chunked`, this many values at a time (even, so pairs stay together).
local CHUNK = 1000

-- Calls `command` on `key` with values[first..last], CHUNK values a call. Returns the
-- calls' replies, concatenated when they are lists (HMGET, ZMSCORE: one per value).
local function call_chunked(command, key, values, first, last)
  local replies = {}
  for from = first, last, CHUNK do
    local reply = redis.call(command, key, unpack(values, from, math.min(from + CHUNK - 1, last)))
    if type(reply) == 'table' then
      for i = 1, #reply do
        replies[#replies + 1] = reply[i]
      end
    end
  end
  return replies
end

-- How many of the batch's ids the applied set holds.
local function count_applied(applied)
  local scores = call_chunked('ZMSCORE', applied, ARGV, IDS, METRICS - 1)
  local present = 0
  for i = 1, k do
    if scores[i] then
      present = present + 1
    end
  end
  return present
end

-- Records the batch's ids in the applied set.
local function record_applied(applied)
  local entries = {}
  for i = IDS, METRICS - 1 do
    entries[#entries + 1] = APPLIED_SCORE
    entries[#entries + 1] = ARGV[i]
  end
  call_chunked('ZADD', applied, entries, 1, #entries)
end

-- Whether a bucket field (`f<bucket>:<metric>` or `c<bucket>:<metric>`) is of a bucket
-- past its retention.
local function past_retention(field)
  local tag, bucket = string.match(field, '^([fc])(%-?%d+):')
  bucket = tonumber(bucket)
  return bucket ~= nil and ((tag == 'f' and bucket < oldest_fine) or (tag == 'c' and bucket < oldest_coarse))
end

-- Drops the buckets that fell out of the retention: one HKEYS pass over the hash every
-- PRUNE_EVERY 10 s buckets. Returns the oldest 10 s bucket kept from now on.
local function prune(buckets, pruned)
  if oldest_fine - pruned < PRUNE_EVERY then
    return pruned
  end
  local stale = {}
  for _, field in ipairs(redis.call('HKEYS', buckets)) do
    if past_retention(field) then
      stale[#stale + 1] = field
    end
  end
  call_chunked('HDEL', buckets, stale, 1, #stale)
  return oldest_fine
end

-- The batch's bucket aggregates merged into the stored ones, as field-value pairs for
-- the buckets hash, and whether a bucket field is created (then the hash may need
-- pruning and a new expiry). Buckets past their retention are left out: in no window.
local function merge_buckets(buckets)
  local fields, batches = {}, {}
  -- Only a batch whose earliest reading is in a bucket past its retention has fields
  -- to leave out; the others (nearly every live one) are not parsed.
  local may_be_stale = math.floor(first_in / call[3]) < oldest_fine
    or math.floor(first_in / call[5]) < oldest_coarse
  for j = 0, B - 1 do
    local field = ARGV[BUCKETS + 2 * j]
    if not (may_be_stale and past_retention(field)) then
      fields[#fields + 1] = field
      batches[#batches + 1] = ARGV[BUCKETS + 2 * j + 1]
    end
  end
  local stored = call_chunked('HMGET', buckets, fields, 1, #fields)
  local updates, created = {}, false
  for j = 1, #fields do
    local batch = batches[j]
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
  return updates, created
end

-- Every event was applied before: the figures stay, the view is as of now. Returns the
-- header to write, if the device has one.
local function touched(device)
  local header = redis.call('HGET', device, 'h')
  if header then
    local first, last, count, seq, _, trim_at, pruned = unpack_packed('<ddddddd', header)
    if seq_in > seq then seq = seq_in end
    return pack('<ddddddd', first, last, count, seq, now, trim_at, pruned)
  end
  return nil
end

-- Reads what one generation holds and works out what the batch writes to it, writing
-- nothing yet but the prune (which drops only buckets out of the retention, harmless
-- whatever follows): a call that fails on the way, before `write_generation`, leaves the
-- generation as it was, and its retry applies the batch whole. Returns the generation's
-- result and, unless it is -1, its writes.
local function plan_generation(device, applied, buckets)
  local present = count_applied(applied)
  if present > 0 and present < k then
    return -1, nil
  end
  if present == k then
    return 0, { device = device, header = touched(device), refreshed = applied }
  end
  local wanted = { 'h' }
  for j = 0, M - 1 do
    wanted[j + 2] = ARGV[METRICS + 2 * j]
  end
  local stored = call_chunked('HMGET', device, wanted, 1, M + 1)
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
  local plan = { device = device, applied = applied, buckets = buckets, writes = writes }
  if B > 0 then
    local updates, created = merge_buckets(buckets)
    if created then
      pruned = prune(buckets, pruned)
      if redis.call('HLEN', buckets) >= HASH_TABLE_AT then
        updates[#updates + 1] = HASH_TABLE_FIELD
        updates[#updates + 1] = HASH_TABLE_NOTE
      end
    end
    plan.bucket_updates, plan.created = updates, created
  end
  -- The applied set is trimmed to the horizon a tenth of the horizon at a time; its
  -- expiry then outlasts every id recorded until the next trim by the horizon.
  if applied_now >= trim_at then
    plan.trim = true
    trim_at = applied_now + TRIM_STEP
  end
  writes[2] = pack('<ddddddd', first, last, count + k, seq, now, trim_at, pruned)
  return k, plan
end

-- Writes what `plan_generation` worked out.
local function write_generation(plan)
  if not plan.writes then
    if plan.header then
      redis.call('HSET', plan.device, 'h', plan.header)
    end
    -- Delivered again: the ids are recorded as of now, and the set outlasts them by the
    -- horizon, so an event delivered at least once a horizon stays recorded (a batch
    -- retried whole while another device's call in its pipeline fails, however long).
    record_applied(plan.refreshed)
    redis.call('PEXPIRE', plan.refreshed, horizon + TRIM_STEP)
    return
  end
  record_applied(plan.applied)
  if plan.bucket_updates then
    call_chunked('HSET', plan.buckets, plan.bucket_updates, 1, #plan.bucket_updates)
    if plan.created then
      -- A reading dated ahead (`ingest.max_future_secs` allows up to 12 h) is in a
      -- bucket that stays in the 24 h window that much longer: the hash outlasts the
      -- batch's latest reading, and a later batch never shortens its expiry. (It
      -- expired 24 h 20 min after its newest bucket was made, and readings dated more
      -- than 20 minutes ahead left their windows early.)
      local ttl = math.floor(buckets_ttl + math.max(0, last_in - now))
      if redis.call('PTTL', plan.buckets) < ttl then
        redis.call('PEXPIRE', plan.buckets, ttl)
      end
    end
  end
  if plan.trim then
    redis.call('ZREMRANGEBYSCORE', plan.applied, '-inf', applied_now - horizon)
    redis.call('PEXPIRE', plan.applied, horizon + TRIM_STEP)
  end
  call_chunked('HSET', plan.device, plan.writes, 1, #plan.writes)
end

-- Every generation is read and planned before any is written to.
local results, plans = {}, {}
for g = 1, GENERATION_KEYS, 3 do
  local result, plan = plan_generation(KEYS[g], KEYS[g + 1], KEYS[g + 2])
  results[#results + 1] = result
  if plan then
    plans[#plans + 1] = plan
  end
end
for _, plan in ipairs(plans) do
  write_generation(plan)
end
return results
