#!lua flags=no-writes
-- One page of a walk through the devices index of one generation (see
-- contract::read_model::DevicesIndex), for GET /v1/devices.
--
-- READ ONLY: the query service never writes Redis (an ARCHITECTURE.md invariant), and
-- the no-writes flag above makes Redis refuse any write this script might attempt. It
-- is a script, not a few plain reads, for two reasons:
-- - Atomicity. The page finds its place in the log and reads on from there in one step.
--   Between separate round trips an index.lua call would move every rank behind its
--   insert (or its expiry) by one, and a page would list a device twice or skip one.
-- - One clock. index.lua stamps `created` and `retired` with Redis's TIME; the walk's
--   snapshot and the listing TTL check use the same clock, here.
--
-- KEYS[1] meta hash, KEYS[2] log, KEYS[3] created, KEYS[4] retired (of generation ARGV[1])
-- ARGV[1] generation, ARGV[2] key layout: the walk's, which the meta hash must name as live
-- ARGV[3] the walk's snapshot (ms), '' to begin a walk now
-- ARGV[4] listing TTL (ms)
-- ARGV[5] limit (devices per page), ARGV[6] budget (entries looked at, at most)
-- ARGV[7] granule (ms) and ARGV[8] entry the walk continues after ('' for the front)
--
-- Returns { GONE, generation, layout } (the meta hash's, nil for none) when the
-- generation is not the live one (a rebuild switched, the read model is gone), or
-- { EXPIRED } when the snapshot is not within the listing TTL of now; else
-- { PAGE, snapshot, entries looked at, entry to continue after ('' at the end of the
-- log), the visible entries (at most `limit`)... }.
--
-- Visibility. A move (index.lua) stamps the device's new entry as created and its old
-- entry as retired with one value t, Redis's TIME in ms when the call ran. An index
-- change "happened before the walk" when t < snapshot, strictly, for both stamps: then
-- the new entry is visible and the old one not; when t >= snapshot, the old one and not
-- the new one. So a device is visible at exactly one place. A call in the snapshot's
-- own millisecond counts as after the walk began, whether it ran before or after the
-- first page: any call after the first page is stamped at least the snapshot, so none
-- can change what the walk sees. Visible: created < snapshot and (not retired or
-- retired >= snapshot). Retired entries are deleted once retired at least the listing
-- TTL ago; a walk younger than the TTL needs none of those (they were retired before
-- its snapshot).
--
-- Position. Entries are ordered by score (the granule) descending, then by member
-- descending (Redis orders equal scores by bytes). The walk goes on after (granule,
-- entry) by that order alone, whether or not the entry is still in the log (it may be a
-- retired entry deleted since): past the entries of later granules (ZCOUNT), then a
-- binary search through the entries of the same granule by rank. O(log^2 n).
--
-- Budget. A page looks at `budget` entries at most (a script blocks Redis while it
-- runs); one that runs out before it found `limit` + 1 visible entries returns those it
-- found, possibly none, and continues after the last entry it looked at.

local PAGE, GONE, EXPIRED = 1, -1, -2
-- Entries read per ZRANGE at most: far below the values Lua unpacks at once.
local CHUNK_MAX = 1000

local live = redis.call('HMGET', KEYS[1], 'generation', 'layout')
if live[1] ~= ARGV[1] or live[2] ~= ARGV[2] then
  return { GONE, live[1], live[2] }
end

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local snapshot = now
if ARGV[3] ~= '' then
  snapshot = tonumber(ARGV[3])
  local age = now - snapshot
  if age < 0 or age >= tonumber(ARGV[4]) then
    return { EXPIRED }
  end
end

local log, created, retired = KEYS[2], KEYS[3], KEYS[4]
local limit, budget = tonumber(ARGV[5]), tonumber(ARGV[6])

-- Whether a comes before b byte by byte, as Redis orders members (Lua's < follows the
-- locale).
local function bytes_before(a, b)
  for i = 1, math.min(#a, #b) do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then
      return x < y
    end
  end
  return #a < #b
end

-- The rank (highest score first) of the first entry after the position.
local start = 0
if ARGV[8] ~= '' then
  local granule, after = ARGV[7], ARGV[8]
  local first = redis.call('ZCOUNT', log, '(' .. granule, '+inf')
  local last = first + redis.call('ZCOUNT', log, granule, granule)
  -- The granule's entries, ranks first .. last - 1, have members in descending order:
  -- find the first one below `after`.
  while first < last do
    local middle = math.floor((first + last) / 2)
    local member = redis.call('ZRANGE', log, middle, middle, 'REV')[1]
    if bytes_before(member, after) then
      last = middle
    else
      first = middle + 1
    end
  end
  start = first
end

local total = redis.call('ZCARD', log)
local wanted = limit + 1
local visible = {}
local looked = 0
local last_looked = ''
local rank = start
while #visible < wanted and looked < budget and rank < total do
  local count = math.min(budget - looked, math.max(2 * (wanted - #visible), 64), CHUNK_MAX)
  local entries = redis.call('ZRANGE', log, rank, rank + count - 1, 'REV')
  if #entries == 0 then
    break
  end
  local created_at = redis.call('HMGET', created, unpack(entries))
  local retired_at = redis.call('ZMSCORE', retired, unpack(entries))
  for i, entry in ipairs(entries) do
    looked = looked + 1
    last_looked = entry
    local made = created_at[i] and tonumber(created_at[i])
    local gone = retired_at[i] and tonumber(retired_at[i])
    if made and made < snapshot and (not gone or gone >= snapshot) then
      visible[#visible + 1] = entry
      if #visible == wanted then
        break
      end
    end
  end
  rank = rank + #entries
end

local continue_after = last_looked
if #visible == wanted then
  -- A full page and one more: the walk goes on after the page's last device.
  visible[wanted] = nil
  continue_after = visible[limit]
elseif rank >= total then
  continue_after = ''
end
return { PAGE, snapshot, looked, continue_after, unpack(visible) }
