"""The change log in Redis (sbus.core.changes): a stream under the deployment's hash
tag, ``T:changes``, appended by the create and commit scripts themselves (so a change
is in the stream exactly when its commit is), and the conflict ring ``T:conflicts``.

A stream id (``<ms>-<seq>``, Redis's own, increasing in the order the scripts ran) is
the commit order of every key, whatever replica ran the script. Only the purge removes
entries, always the oldest: by age (``XTRIM MINID``, on Redis's clock), then beyond the
count bound. Before it trims it records the greatest id it removes in ``T:changes:floor``
(Redis itself does not record trimmed ids: ``max-deleted-entry-id`` counts XDEL only),
so a cursor below the floor is known to have lost changes. The commit scripts do not trim
(``XADD MAXLEN ~`` would drop entries without a floor).
"""

from __future__ import annotations

# log_change(C, key, version, op, now): C is the payload's ``ch``, {x: stream key, a:
# agent, c: commit id}; absent, nothing is logged.
HELPER = r"""
local function log_change(C, key, version, op, now)
  if not C then return end
  redis.call('XADD', C.x, '*', 'k', key, 'v', s(version), 'op', op, 'a', C.a, 'c', C.c,
             't', s(now))
end
"""

# changes: KEYS: the stream, its floor.  ARGV: after (an id), count.
# Reply: {floor (the greatest id purged), last id, entries after ARGV[1] (<= count)}.
READ = r"""
local X = KEYS[1]
local floor = redis.call('GET', KEYS[2]) or '0-0'
if redis.call('EXISTS', X) == 0 then return {floor, '0-0', {}} end
local info = redis.call('XINFO', 'STREAM', X)
local last = '0-0'
for i = 1, #info, 2 do
  if info[i] == 'last-generated-id' then last = info[i + 1] end
end
local entries = {}
if tonumber(ARGV[2]) > 0 then
  entries = redis.call('XRANGE', X, '(' .. ARGV[1], '+', 'COUNT', ARGV[2])
end
return {floor, last, entries}
"""

# trim_changes: KEYS: the stream, its floor.  ARGV: retention ms, count bound.  Drops
# the entries older than the retention by Redis's clock (stream ids carry it), then the
# oldest beyond the bound; records the greatest id dropped; returns how many went.
TRIM = r"""
local X, FLOOR = KEYS[1], KEYS[2]
local t = redis.call('TIME')
local real = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local len = redis.call('XLEN', X)
if len == 0 then return 0 end
local minid = s(real - tonumber(ARGV[1]))
local old = redis.call('XRANGE', X, '-', '(' .. minid .. '-0', 'COUNT', 1)
local gone = 0
if #old > 0 then
  local upto = redis.call('XREVRANGE', X, '(' .. minid .. '-0', '-', 'COUNT', 1)[1][1]
  redis.call('SET', FLOOR, upto)
  gone = redis.call('XTRIM', X, 'MINID', minid)
  len = len - gone
end
local over = len - tonumber(ARGV[2])
if over > 0 then
  local batch = redis.call('XRANGE', X, '-', '+', 'COUNT', over)
  redis.call('SET', FLOOR, batch[#batch][1])
  gone = gone + redis.call('XTRIM', X, 'MAXLEN', ARGV[2])
end
return gone
"""

# conflict: KEYS: the ring's stream.  ARGV: ring size, key, agent, error, stale keys JSON.
CONFLICT = r"""
redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[1], '*', 'k', ARGV[2], 'a', ARGV[3],
           'e', ARGV[4], 's', ARGV[5])
return 1
"""
