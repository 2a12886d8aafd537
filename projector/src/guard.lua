-- Opens apply.lua and index.lua (apply.rs joins them). A live projector applies each
-- batch with the generations it read last, not read anew for every batch: such a call
-- carries the meta hash as its last key and, as its last three arguments, the meta
-- hash's generation, layout and building fields as the projector read them ('' for
-- none). If any of them changed since (a rebuild began or switched over, the read model
-- was lost), the call writes nothing and returns STALE; the projector reads them again
-- and applies the batch once more, which the applied sets make safe.
local STALE = -2

-- Whether the meta hash (the last key) holds other fields than the last three
-- arguments: only for a guarded call.
local function generations_changed()
  local fields = redis.call('HMGET', KEYS[#KEYS], 'generation', 'layout', 'building')
  for i = 1, 3 do
    if (fields[i] or '') ~= ARGV[#ARGV - 3 + i] then
      return true
    end
  end
  return false
end

