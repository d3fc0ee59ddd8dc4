"""The audit log in Redis (sbus.core.audit): the Lua bodies, registered in
:data:`sbus.storage.redis.scripts.SCRIPTS`.

Layout under the deployment's hash tag ``T`` (docs/redis.md): ``T:audit:seq`` the last
id given (INCR), ``T:audit:r:<id>`` one hash per entry (``at kind agent details count
grp``), ``T:audit:ids`` a sorted set of the ids by id (paging, the row cap),
``T:audit:at`` the same ids by store-clock time (retention), and ``T:audit:groups``
the aggregated entries' group keys -> id. /admin/reset leaves them all.
"""

from __future__ import annotations

# audit_append(tag, now, kind, agent, details JSON, group or ''): audit.group_key is
# group .. '|' .. minute of the store clock; an entry of that key counts one more.
HELPER = r"""
local function audit_append(tag, now, kind, agent, details, group)
  local gkey = ''
  if group ~= '' then
    gkey = group .. '|' .. s(math.floor(now / 60000))
    local id = redis.call('HGET', tag .. ':audit:groups', gkey)
    if id then
      redis.call('HINCRBY', tag .. ':audit:r:' .. id, 'count', 1)
      return
    end
  end
  local id = redis.call('INCR', tag .. ':audit:seq')
  redis.call('HSET', tag .. ':audit:r:' .. id, 'at', s(now), 'kind', kind, 'agent', agent,
             'details', details, 'count', '1', 'grp', gkey)
  redis.call('ZADD', tag .. ':audit:ids', id, id)
  redis.call('ZADD', tag .. ':audit:at', s(now), id)
  if gkey ~= '' then redis.call('HSET', tag .. ':audit:groups', gkey, id) end
end
"""

# audit.  KEYS: meta.  ARGV: tag, kind, agent, details JSON, group ('' for none)
WRITE = (
    HELPER
    + r"""
local now = clock(KEYS[1])
audit_append(ARGV[1], now, ARGV[2], ARGV[3], ARGV[4], ARGV[5])
return {'OK'}
"""
)

# audit_page.  KEYS: ids index.  ARGV: tag, after id, limit.
# Returns {{id, at, kind, agent, details, count}, ...} in ascending id order.
PAGE = r"""
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[2], '+inf', 'LIMIT', 0,
                       tonumber(ARGV[3]))
local out = {}
for _, id in ipairs(ids) do
  local r = redis.call('HMGET', ARGV[1] .. ':audit:r:' .. id, 'at', 'kind', 'agent', 'details',
                       'count')
  if r[1] then out[#out + 1] = {id, r[1], r[2], r[3], r[4], r[5]} end
end
return out
"""

# audit_purge: entries past the retention, then the oldest beyond the row cap, at most
# ARGV[4] of each per call.  KEYS: meta, ids index, time index, groups.
# ARGV: tag, ttl ms (0: none), max rows, batch.  Returns {entries removed, 1 if more}.
PURGE = r"""
local META, IDS, AT, GROUPS = unpack(KEYS)
local tag, ttl, cap, batch = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local now = clock(META)
local gone, more = 0, 0
local function drop(id)
  local rk = tag .. ':audit:r:' .. id
  local g = redis.call('HGET', rk, 'grp')
  if g and g ~= '' then redis.call('HDEL', GROUPS, g) end
  redis.call('DEL', rk)
  redis.call('ZREM', IDS, id)
  redis.call('ZREM', AT, id)
  gone = gone + 1
end
if ttl > 0 then
  local old = redis.call('ZRANGEBYSCORE', AT, '-inf', s(now - ttl), 'LIMIT', 0, batch)
  for _, id in ipairs(old) do drop(id) end
  if #old == batch then more = 1 end
end
local over = redis.call('ZCARD', IDS) - cap
if over > 0 then
  local n = math.min(over, batch)
  for _, id in ipairs(redis.call('ZRANGE', IDS, 0, n - 1)) do drop(id) end
  if over > n then more = 1 end
end
return {gone, more}
"""
