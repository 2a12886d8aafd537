#!lua flags=no-writes
-- Reads one device's figures and, per metric, the buckets its windows need, in one call.
--
-- KEYS[1] device hash, KEYS[2] 10 s buckets, KEYS[3] 5 min buckets
-- ARGV[1], ARGV[2] first and last 10 s bucket; ARGV[3], ARGV[4] first and last 5 min bucket
-- ARGV[5..] the metrics wanted (none: all)
--
-- Returns {} for an unknown device, else
-- { HGETALL of the device, metric names, then per metric: 10 s bucket values, 5 min bucket values }
-- where bucket values are in bucket order and nil for empty buckets.

local hash = redis.call('HGETALL', KEYS[1])
if #hash == 0 then
  return {}
end

local wanted = nil
if #ARGV > 4 then
  wanted = {}
  for i = 5, #ARGV do
    wanted[ARGV[i]] = true
  end
end

local names = {}
for i = 1, #hash, 2 do
  local name = string.match(hash[i], '^m:(.+):count$')
  if name and (wanted == nil or wanted[name]) then
    table.insert(names, name)
  end
end

local function bucket_values(key, first, last, name)
  local fields = {}
  for bucket = first, last do
    table.insert(fields, string.format('%d:%s', bucket, name))
  end
  return redis.call('HMGET', key, unpack(fields))
end

local reply = { hash, names }
for _, name in ipairs(names) do
  table.insert(reply, bucket_values(KEYS[2], tonumber(ARGV[1]), tonumber(ARGV[2]), name))
  table.insert(reply, bucket_values(KEYS[3], tonumber(ARGV[3]), tonumber(ARGV[4]), name))
end
return reply
