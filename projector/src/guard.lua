-- Opens apply.lua and index.lua (apply.rs joins them). A live projector applies each
-- batch with the generations it read last, not read anew for every batch: such a call
-- carries the meta hash as its last key and, as its last four arguments, the meta
-- hash's generation, layout, building and replay_last fields as the projector read
-- them ('' for none). If any of them changed since (a rebuild began, its replay began
-- or it switched over, the read model was lost), the call writes nothing and returns
-- STALE; the projector reads them again and applies the batch once more, which the
-- applied sets make safe.
local STALE = -2

-- Whether the meta hash (the last key) holds other fields than the last four
-- arguments: only for a guarded call.
local function generations_changed()
  local fields = redis.call('HMGET', KEYS[#KEYS], 'generation', 'layout', 'building', 'replay_last')
  for i = 1, 4 do
    if (fields[i] or '') ~= ARGV[#ARGV - 4 + i] then
      return true
    end
  end
  return false
end

