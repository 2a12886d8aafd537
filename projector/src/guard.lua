-- Opens apply.lua and index.lua (apply.rs joins them). A live projector applies each
-- batch with the generations it read last, not read anew for every batch: such a call
-- carries the meta hash as its last key and the meta hash's generation, layout and
-- building fields as the projector read them ('' for none) as three arguments. If
-- any of them changed since (a rebuild began or switched over, the read model was
-- lost), the call writes nothing and returns STALE; the projector reads them again and
-- applies the batch once more, which the applied sets make safe.
local STALE = -2

-- Whether the meta hash's fields differ from the three arguments from `at` on.
local function generations_changed(meta, at)
  local fields = redis.call('HMGET', meta, 'generation', 'layout', 'building')
  for i = 1, 3 do
    if (fields[i] or '') ~= ARGV[at + i - 1] then
      return true
    end
  end
  return false
end

