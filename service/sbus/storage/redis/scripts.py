"""The Lua scripts of the Redis store: every state change is ONE of these.

Each script is built from a shared prelude (helpers) and a body. Scripts that change
state start with ``#!lua`` (Redis >= 7.0 function flags syntax): Redis then refuses
them up front, before any command runs, when it is out of memory, so an OOM answer
means "not applied". Read-only scripts carry ``flags=no-writes``.

Conventions shared with :mod:`sbus.storage.redis.store`:

- ``KEYS`` name every key a script touches where the caller can know it. Keys found
  only inside the script (the shards behind a session's DeliveryLog entries, the
  members of the index sets walked by purge, stats and reset) are derived from the
  deployment's hash tag, passed in ``ARGV``; they live in the same cluster slot.
- Numbers handed to ``redis.call`` are formatted with ``%d`` first (:func:`s`): Redis
  would otherwise format a Lua double itself, possibly as ``1.7e+12``.
- Lua's ``<`` on strings uses the server's collation locale, so the read set is
  ordered by :func:`bytes_lt`, the byte order that Python's ``sorted`` uses on keys.
- A script validates everything before its first write: Redis does not roll a
  script back when it fails midway.
- Replies are arrays whose first element is a tag: ``OK``, ``ERR`` (code, then field
  name/value pairs), ``REPLAY`` (the idempotency record under the request's key;
  nothing was written), ``RETRY`` (a head the caller hashed against moved, or its clock
  reading is too far off; nothing was written; the commit script adds its clock and the
  written rows as they are) or ``NOTFOUND``/``EXISTS``. The read, bulk read, create and
  commit scripts also answer their clock reading, which the caller carries forward to
  stamp its next commit (:mod:`sbus.storage.redis.heads`).

Shard hash fields: ``id content version goal mand created updated ac cc del head
hmin hbytes`` (``hmin`` is the oldest retained history version, ``hbytes`` the bytes
retained). History hash of a key: ``m<v>`` the entry's metadata JSON (built in
Python, with its chain hash), ``c<v>`` its content, ``z<v>`` what it counts against the
byte budget (:func:`sbus.core.rules.entry_bytes`, computed in Python). A DeliveryLog
session is a sorted set (key -> served ms) plus a hash (key -> version, and the markers
``#last`` and ``#over``, which no shard key can collide with: ``#`` is not a key
character).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from sbus.storage.redis import audit_lua, changes_lua

PRELUDE = r"""
local function s(n) return string.format('%d', n) end

local function bytes_lt(a, b)
  local n = math.min(#a, #b)
  for i = 1, n do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end

-- The store clock: Redis TIME plus the offset that only advance-clock moves.
-- Returns (store ms, real ms).
local function clock(meta)
  local t = redis.call('TIME')
  local real = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  return real + tonumber(redis.call('HGET', meta, 'offset') or '0'), real
end

local SHARD_FIELDS = {'version', 'del', 'mand', 'head', 'ac', 'cc', 'hmin', 'hbytes',
                      'id', 'goal', 'created', 'updated'}

-- A shard row without its content, or nil. Tombstones are rows with del = true.
local function load(key)
  local r = redis.call('HMGET', key, unpack(SHARD_FIELDS))
  if not r[1] then return nil end
  return {version = tonumber(r[1]), del = r[2] == '1', mand = r[3] == '1', head = r[4],
          ac = tonumber(r[5]), cc = tonumber(r[6]), hmin = tonumber(r[7]),
          hbytes = tonumber(r[8]), id = r[9], goal = r[10], created = tonumber(r[11]),
          updated = tonumber(r[12])}
end

-- Retained history entries with version != 0 (the compat delta_log_depth).
local function depth(version, hmin)
  return version - hmin + 1 - (hmin == 0 and 1 or 0)
end

-- Append a history entry of size bytes (rules.entry_bytes, computed by the caller)
-- and trim the oldest while more than max_depth entries or max_bytes bytes are
-- retained; the newest always stays. Returns (hmin, hbytes).
local function append_history(hkey, version, meta_json, content, size, hmin, hbytes,
                              max_depth, max_bytes)
  redis.call('HSET', hkey, 'm' .. s(version), meta_json, 'c' .. s(version), content,
             'z' .. s(version), s(size))
  hbytes = hbytes + size
  while hmin < version and (version - hmin + 1 > max_depth or hbytes > max_bytes) do
    local z = redis.call('HGET', hkey, 'z' .. s(hmin))
    -- an entry written before sizes were kept counted its content only
    hbytes = hbytes - (z and tonumber(z) or redis.call('HSTRLEN', hkey, 'c' .. s(hmin)))
    redis.call('HDEL', hkey, 'm' .. s(hmin), 'c' .. s(hmin), 'z' .. s(hmin))
    hmin = hmin + 1
  end
  return hmin, hbytes
end

-- The row fields a caller renders from (everything but the content).
local function row_reply(key, r)
  return {key, r.version, r.ac, r.cc, depth(r.version, r.hmin), r.id, r.goal,
          r.mand and 1 or 0, r.created, r.updated, r.del and 1 or 0, r.head}
end

-- protocol.md section 1 session states: empty | live | expired | overflowed.
local function session_state(dlt, dlv, now, ttl)
  local m = redis.call('HMGET', dlv, '#over', '#last')
  if m[1] == '1' then return 'overflowed' end
  if not m[2] then return 'empty' end
  if ttl <= 0 then
    return redis.call('ZCARD', dlt) > 0 and 'live' or 'empty'
  end
  local cutoff = now - ttl
  if redis.call('ZCOUNT', dlt, '(' .. s(cutoff), '+inf') > 0 then return 'live' end
  -- All entries are past the TTL; the marker keeps "expired" for one more TTL.
  if tonumber(m[2]) > cutoff - ttl then return 'expired' end
  return 'empty'
end

-- Live DL entries as an array of keys (all entries when the TTL is 0).
local function live_keys(dlt, now, ttl)
  if ttl <= 0 then return redis.call('ZRANGE', dlt, 0, -1) end
  return redis.call('ZRANGEBYSCORE', dlt, '(' .. s(now - ttl), '+inf')
end

-- rules.plan_read + its effect: record a read of key at version. Returns true if
-- recorded (false: served but not recorded: overflow, or already overflowed).
local function record_read(dlt, dlv, sessions, member, key, version, now, ttl, max)
  local state = session_state(dlt, dlv, now, ttl)
  if state == 'overflowed' then return false end
  if state ~= 'live' then
    -- expired or empty: old entries and markers go before recording afresh
    redis.call('DEL', dlt, dlv)
  else
    local n, score
    if ttl <= 0 then
      n = redis.call('ZCARD', dlt)
    else
      n = redis.call('ZCOUNT', dlt, '(' .. s(now - ttl), '+inf')
    end
    score = redis.call('ZSCORE', dlt, key)
    local is_live = score and (ttl <= 0 or tonumber(score) > now - ttl)
    if not is_live and n >= max then
      redis.call('HSET', dlv, '#over', '1')
      redis.call('ZADD', sessions, 0, member)
      return false
    end
  end
  redis.call('ZADD', dlt, s(now), key)
  redis.call('HSET', dlv, key, s(version), '#last', s(now))
  redis.call('ZADD', sessions, 0, member)
  return true
end

-- The live idempotency record under the request's key as a REPLAY reply, nil when
-- there is none. The script stops there, writing nothing; the caller replays the
-- record or refuses the reuse by its fingerprint (sbus.core.idempotency.replay).
local function idem_check(ikey, now)
  local rec = redis.call('HMGET', ikey, 'fp', 'exp', 'status', 'etag', 'body', 'ac', 'cc', 'dd')
  if not rec[1] or tonumber(rec[2]) <= now then return nil end
  return {'REPLAY', rec[1], rec[3], rec[4] or '', rec[5] or '', rec[6] or '', rec[7] or '',
          rec[8] or ''}
end

-- Record a successful outcome: a hash with its store-clock expiry, expired by Redis
-- at the matching real time (PEXPIREAT) and indexed for purge and reset.
local function idem_put(ikey, iidx, I, now, real, r)
  redis.call('HSET', ikey, 'fp', I.fp, 'exp', s(now + I.ttl), 'status', s(I.status),
             'etag', I.etag or '', 'body', I.body)
  if I.patch and r then
    redis.call('HSET', ikey, 'ac', s(r.ac), 'cc', s(r.cc), 'dd', s(depth(r.version, r.hmin)))
  end
  redis.call('PEXPIREAT', ikey, s(real + I.ttl))
  redis.call('ZADD', iidx, s(now + I.ttl), I.member)
end
"""

# ---------------------------------------------------------------------------------
# create / admin_create
# KEYS: meta, shard, hist, live index, all-shards index, idem, idem index
# ARGV[1]: JSON {now, skew, hv, hh, id, goal, mand, m, h, z, max_depth, max_bytes,
#                admin, idem?}; ARGV[2]: content
CREATE = r"""
local META, SHARD, HIST, LIVE, ALL, IKEY, IIDX = unpack(KEYS)
local P = cjson.decode(ARGV[1])
local content = ARGV[2]
local now, real = clock(META)
local t = now  -- this script's clock reading, returned: the caller's estimate follows it
if math.abs(now - P.now) > P.skew then return {'RETRY', 'clock'} end
if P.idem then
  local replay = idem_check(IKEY, now)
  if replay then return replay end
end
local old = load(SHARD)
if old and not old.del then
  if P.admin then return {'EXISTS'} end
  return {'ERR', 'ShardAlreadyExists', 'key', P.key}
end
-- The chain hash was computed in Python for the head it read; it must still be it.
if (old and (old.version ~= P.hv or old.head ~= P.hh)) or (not old and P.hv ~= -1) then
  return {'RETRY', 'head'}
end
local stamp = P.now  -- stamps what was hashed; the idempotency expiry runs on now
local version = old and old.version + 1 or 0
-- rules.created_require_mandate: a re-create keeps the tombstone's requirement. The
-- caller already folded it in for the head it read; the script that writes the row
-- holds the rule itself rather than trust that.
local mand = P.mand or (old ~= nil and old.mand)
local hmin, hbytes = append_history(HIST, version, P.m, content, P.z,
  old and old.hmin or version, old and old.hbytes or 0, P.max_depth, P.max_bytes)
redis.call('HSET', SHARD, 'id', P.id, 'content', content, 'version', s(version),
  'goal', P.goal, 'mand', mand and '1' or '0', 'created', s(stamp), 'updated', s(stamp),
  'ac', '0', 'cc', '0', 'del', '0', 'head', P.h, 'hmin', s(hmin), 'hbytes', s(hbytes))
redis.call('ZADD', LIVE, 0, P.key)
redis.call('ZADD', ALL, 0, P.key)
log_change(P.ch, P.key, version, 'create', stamp)
local r = load(SHARD)
if P.idem then idem_put(IKEY, IIDX, P.idem, now, real, r) end
return {'OK', row_reply(P.key, r), t}
"""

# ---------------------------------------------------------------------------------
# read (recorded GET)
# KEYS: meta, shard, dlt, dlv, sessions index
# ARGV: ttl, max_entries, key, session member
# Reply: {'OK', row, content, store ms} or {'NOTFOUND'}
READ = r"""
local META, SHARD, DLT, DLV, SESSIONS = unpack(KEYS)
local ttl, max = tonumber(ARGV[1]), tonumber(ARGV[2])
local r = load(SHARD)
if not r then return {'NOTFOUND'} end
local now = clock(META)
record_read(DLT, DLV, SESSIONS, ARGV[4], ARGV[3], r.version, now, ttl, max)
return {'OK', row_reply(ARGV[3], r), redis.call('HGET', SHARD, 'content'), now}
"""

# ---------------------------------------------------------------------------------
# read_many (recorded POST /read): the rows, each recorded in ARGV order exactly as the
# read script would one key at a time (rules.record_reads).
# KEYS: meta, dlt, dlv, sessions index, then one shard key per ARGV key
# ARGV: ttl, max_entries, session member, then the keys
# Reply: {'OK', rows, store ms}; rows[i] is {row_reply, content}, or false for a missing key.
READ_MANY = r"""
local META, DLT, DLV, SESSIONS = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local ttl, max, member = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local now = clock(META)
local rows = {}
for i = 4, #ARGV do
  local key = ARGV[i]
  local r = load(KEYS[i + 1])
  if r then
    record_read(DLT, DLV, SESSIONS, member, key, r.version, now, ttl, max)
    rows[#rows + 1] = {row_reply(key, r), redis.call('HGET', KEYS[i + 1], 'content')}
  else
    rows[#rows + 1] = false
  end
end
return {'OK', rows, now}
"""

# ---------------------------------------------------------------------------------
# register
# KEYS: meta, dlt, dlv, sessions index, then one shard key per ARGV key
# ARGV: ttl, max_entries, session member, then the keys
REGISTER = r"""
local META, DLT, DLV, SESSIONS = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local ttl, max, member = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local now = clock(META)
local live = {}
local state = session_state(DLT, DLV, now, ttl)
-- an empty or expired session restarts with the first read; an overflowed one keeps
-- its entries. A register on an expired session starts it afresh even when it
-- records nothing (protocol.md section 1).
if state == 'expired' then redis.call('DEL', DLT, DLV) end
if state == 'live' or state == 'overflowed' then
  for _, k in ipairs(live_keys(DLT, now, ttl)) do live[k] = true end
end
local registered, existing, missing = 0, {}, {}
for i = 4, #ARGV do
  local key = ARGV[i]
  local r = load(KEYS[i + 1])
  if live[key] then
    existing[#existing + 1] = key
  elseif not r or r.del then
    missing[#missing + 1] = key
  elseif record_read(DLT, DLV, SESSIONS, member, key, r.version, now, ttl, max) then
    registered = registered + 1
  end
end
return {'OK', registered, existing, missing}
"""

# ---------------------------------------------------------------------------------
# inject_stale
# KEYS: meta, shard, dlt, dlv, sessions index
# ARGV: ttl, version, key, session member
INJECT = r"""
local META, SHARD, DLT, DLV, SESSIONS = unpack(KEYS)
local ttl, version, key, member = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], ARGV[4]
local r = load(SHARD)
if not r or r.del then return {'ERR', 'ShardNotFound', 'key', key} end
if version > r.version then return {'ERR', 'ValidationFailed', 'max', r.version} end
local now = clock(META)
local state = session_state(DLT, DLV, now, ttl)
if state ~= 'live' and state ~= 'overflowed' then redis.call('DEL', DLT, DLV) end
redis.call('ZADD', DLT, s(now), key)
redis.call('HSET', DLV, key, s(version), '#last', s(now))
redis.call('ZADD', SESSIONS, 0, member)
return {'OK'}
"""

# ---------------------------------------------------------------------------------
# reset_session.  KEYS: dlt, dlv, sessions index.  ARGV: session member
RESET_SESSION = r"""
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[1])
return {'OK'}
"""

# ---------------------------------------------------------------------------------
# The commit protocol (protocol.md section 4 step 9), exactly rules.decide.
# KEYS: meta, counters, dlt, dlv, sessions index, live index, idem, idem index,
#       all-shards index, then per write (sorted by key) its shard and history key,
#       then per explicit read-set entry its shard key
# ARGV[1]: JSON {now, skew, ttl, op, mandate, member, prefix, max_depth, max_bytes,
#   writes: [{k, exp?, kind, t, hv, hh, m, h, z, id?, goal?, mand?}], reads: [[k, v]],
#   idem?, mref?}  (id, goal, mand: a create's row fields; mand is the policy it asks
#   for; mref {jti, exp, until, audit: [tag, agent, details JSON]}: a verified mandate
#   and the audit entry its consumption writes)
# ARGV[1 + i]: the content of write i (commit and create writes; '' otherwise)
# Reply: {'OK', rows, store ms}, {'ERR', ...}, {'REPLAY', ...} or {'RETRY', reason,
#   store ms, rows}: rows[i] is write i's row (row_reply) as it is now, false if absent,
#   so the caller can rehash against it without reading it first.
COMMIT = r"""
local META, COUNTERS, DLT, DLV, SESSIONS, LIVE, IKEY, IIDX, ALL =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local P = cjson.decode(ARGV[1])
local W, nw = P.writes, #P.writes
local now, real = clock(META)
local t = now  -- this script's clock reading, returned: the caller's estimate follows it

local shards = {}     -- key -> row (false when absent), loaded once
local function shard(key, skey)
  local r = shards[key]
  if r == nil then
    r = load(skey or (P.prefix .. key)) or false
    shards[key] = r
  end
  return r
end
-- Nothing written: the caller rehashes against these rows and this clock.
local function retry(reason)
  local rows = {}
  for i = 1, nw do
    local r = shard(W[i].k, KEYS[8 + 2 * i])
    rows[i] = r and row_reply(W[i].k, r) or false
  end
  return {'RETRY', reason, t, rows}
end

-- The chain hashes cover committed_at = P.now, the caller's estimate of this store's
-- clock; a caller that stalled (or an advance-clock in between) must redo them. That
-- estimate only stamps what was hashed (the rows' times, the change log): every time
-- rule below (mandate expiry, session TTL, idempotency expiry) is judged on this
-- script's own clock, which an estimate inside the skew can trail or lead.
if math.abs(now - P.now) > P.skew then return retry('clock') end
local stamp = P.now

if P.idem then
  local replay = idem_check(IKEY, now)
  if replay then return replay end
end
-- guarded: the written keys their own precondition guards (rules.decide, 9c): an
-- expected version, or a create's "not live"
local guarded = {}
for i = 1, nw do
  if W[i].exp ~= nil or W[i].kind == 'create' then guarded[W[i].k] = true end
  shard(W[i].k, KEYS[8 + 2 * i])
end

-- Effects kept in Lua until the decision: counters always, bumps on rejection.
local counters, bumps = {}, {}
local function reject(...)
  for name, delta in pairs(counters) do redis.call('HINCRBY', COUNTERS, name, delta) end
  for i = 1, nw do
    local b = bumps[W[i].k]
    if b then
      redis.call('HINCRBY', KEYS[8 + 2 * i], 'ac', b[1])
      if b[2] > 0 then redis.call('HINCRBY', KEYS[8 + 2 * i], 'cc', b[2]) end
    end
  end
  return {'ERR', ...}
end

-- 9a. mandates. The caller verified signature, holder, scope and context (P.mref);
-- expiry is re-checked on this clock and the jti consumed in this same script.
-- Consumed jtis live in one hash (P.mkey, same hash tag): jti -> retained until.
if not P.mandate then
  for i = 1, nw do
    local r = shard(W[i].k)
    -- a create needs no mandate (as POST /shard); the row keeps the requirement
    if r and r.mand and W[i].kind ~= 'create' then
      return reject('MandateRequired', 'key', W[i].k)
    end
  end
elseif not P.mref then
  return reject('MandateNotFound')
else
  if now >= P.mref.exp then return reject('MandateExpired', 'jti', P.mref.jti) end
  local held = redis.call('HGET', P.mkey, P.mref.jti)
  if held and tonumber(held) > now then
    return reject('MandateConsumed', 'jti', P.mref.jti)
  end
end

-- 9b. session state
local state = session_state(DLT, DLV, now, P.ttl)
if state == 'expired' then return reject('SessionExpired', 'reason', 'ttl') end
if state == 'overflowed' then return reject('SessionExpired', 'reason', 'overflow') end

-- 9c. effective read set: explicit entries plus live DL entries, guarded written keys
-- excluded (a rollback without an expected version is checked like any read); a key
-- in both is checked at both versions.
local checks = {}
local nr = #P.reads
for j = 1, nr do
  local e = P.reads[j]
  if not guarded[e[1]] then
    checks[#checks + 1] = {e[1], e[2], KEYS[9 + 2 * nw + j]}
  end
end
if state == 'live' then
  local keys = live_keys(DLT, now, P.ttl)
  if #keys > 0 then
    local versions = redis.call('HMGET', DLV, unpack(keys))
    for j, k in ipairs(keys) do
      if not guarded[k] then checks[#checks + 1] = {k, tonumber(versions[j])} end
    end
  end
end
local stale = {}
if #checks > 0 then
  table.sort(checks, function(a, b)
    if a[1] == b[1] then return a[2] < b[2] end
    return bytes_lt(a[1], b[1])
  end)
  local prev
  for _, c in ipairs(checks) do
    -- the same (key, version) from read_set and DL is one check; two versions of
    -- one key stay two checks
    if not (prev and prev[1] == c[1] and prev[2] == c[2]) then
      prev = c
      local r = shard(c[1], c[3])
      if not r then return reject('ShardNotFound', 'key', c[1]) end
      if r.version ~= c[2] then stale[#stale + 1] = {c[1], c[2], r.version} end
    end
  end
  -- 9d. count before deciding so ORI-on and ORI-off divergence rates compare.
  counters.view_checked_commits = 1
  if #stale > 0 then counters.view_divergent_commits = 1 end
end

-- 9e. ORI
if #stale > 0 and redis.call('HGET', META, 'ori') ~= '0' then
  counters.cross_shard_stale = 1
  return reject('CrossShardStale', 'stale_keys', stale)
end

-- 9f. written keys in ascending order (the caller sorted them)
local moved = false
local sources = {}
for i = 1, nw do
  local w = W[i]
  local r = shard(w.k)
  if w.kind == 'create' then
    -- POST /shard's rule: a live key refuses; absent or a tombstone proceeds, with no
    -- attempt counted. The entry was hashed against the absence (hv = -1) or the
    -- tombstone it read.
    if r and not r.del then return reject('ShardAlreadyExists', 'key', w.k) end
    if (r and (r.version ~= w.hv or r.head ~= w.hh)) or (not r and w.hv ~= -1) then
      moved = true
    end
  else
    if not r then return reject('ShardNotFound', 'key', w.k) end
    if r.del then return reject('ShardDeleted', 'key', w.k, 'version', r.version) end
    if w.exp ~= nil and w.exp ~= r.version then
      bumps[w.k] = {1, 1}
      counters.total_conflicts = 1
      return reject('VersionMismatch', 'key', w.k, 'expected', w.exp, 'found', r.version)
    end
    bumps[w.k] = {1, 0}
    if w.kind == 'rollback' then
      local hkey = KEYS[9 + 2 * i]
      local m = redis.call('HGET', hkey, 'm' .. s(w.t))
      if not m or cjson.decode(m).deleted then
        return reject('VersionNotFound', 'key', w.k, 'target_version', w.t)
      end
      sources[i] = redis.call('HGET', hkey, 'c' .. s(w.t))
    end
    if r.version ~= w.hv or r.head ~= w.hh then moved = true end
  end
end
-- The commit is admitted, but a written head is not the one its new history
-- entry was hashed against: write nothing, the caller rehashes and retries.
if moved then return retry('head') end

-- 9g. apply
counters.total_commits = 1
for name, delta in pairs(counters) do redis.call('HINCRBY', COUNTERS, name, delta) end
if state ~= 'live' then redis.call('DEL', DLT, DLV) end  -- expired or purged entries go
local rows, last = {}, nil
for i = 1, nw do
  local w = W[i]
  local r = shards[w.k]
  local skey, hkey = KEYS[8 + 2 * i], KEYS[9 + 2 * i]
  local content = ARGV[1 + i]
  local version
  if w.kind == 'create' then
    -- the CREATE script's row: version 0 or tombstone + 1, the tombstone's mandate
    -- requirement kept (rules.created_require_mandate)
    version = r and r.version + 1 or 0
    local mand = w.mand or (r and r.mand)
    local hmin, hbytes = append_history(hkey, version, w.m, content, w.z,
      r and r.hmin or version, r and r.hbytes or 0, P.max_depth, P.max_bytes)
    redis.call('HSET', skey, 'id', w.id, 'content', content, 'version', s(version),
      'goal', w.goal, 'mand', mand and '1' or '0', 'created', s(stamp), 'updated', s(stamp),
      'ac', '0', 'cc', '0', 'del', '0', 'head', w.h, 'hmin', s(hmin), 'hbytes', s(hbytes))
    redis.call('ZADD', LIVE, 0, w.k)
    redis.call('ZADD', ALL, 0, w.k)
  else
    version = r.version + 1
    if w.kind == 'rollback' then
      content = sources[i]
    elseif w.kind == 'delete' then
      content = ''
    end
    local hmin, hbytes = append_history(hkey, version, w.m, content, w.z, r.hmin, r.hbytes,
                                        P.max_depth, P.max_bytes)
    local del = w.kind == 'delete'
    redis.call('HSET', skey, 'content', content, 'version', s(version), 'updated', s(stamp),
               'ac', s(r.ac + 1), 'del', del and '1' or '0', 'head', w.h,
               'hmin', s(hmin), 'hbytes', s(hbytes))
    if del then redis.call('ZREM', LIVE, w.k) end
  end
  -- read-your-writes: the committer's DL entry for every written key
  redis.call('ZADD', DLT, s(now), w.k)
  redis.call('HSET', DLV, w.k, s(version))
  last = load(skey)
  rows[i] = row_reply(w.k, last)
  log_change(P.ch, w.k, version, w.kind, stamp)
end
redis.call('HSET', DLV, '#last', s(now))
redis.call('ZADD', SESSIONS, 0, P.member)
if P.mref then
  redis.call('HSET', P.mkey, P.mref.jti, s(P.mref['until']))
  -- the consumption's audit entry, in this same script: it exists iff the commit does
  local a = P.mref.audit
  audit_append(a[1], now, 'mandate_consume', a[2], a[3], '')
end
if P.idem then idem_put(IKEY, IIDX, P.idem, now, real, last) end
return {'OK', rows, t}
"""

# ---------------------------------------------------------------------------------
# purge: one batch of sessions after a cursor, or (mode "idem") expired records.
# KEYS: meta, sessions index, idem index.  ARGV: mode, ttl, tag prefix, cursor, batch
PURGE = r"""
local META, SESSIONS, IIDX = unpack(KEYS)
local mode, ttl, tag = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local now = clock(META)
local gone = 0
if mode == 'mandates' then
  -- consumed mandates past their retention (bounded by live mandates)
  local mkey = tag .. ':mandates'
  local all = redis.call('HGETALL', mkey)
  for i = 1, #all, 2 do
    if tonumber(all[i + 1]) <= now then
      redis.call('HDEL', mkey, all[i])
      gone = gone + 1
    end
  end
  return {gone, ''}
end
if mode == 'idem' then
  local expired = redis.call('ZRANGEBYSCORE', IIDX, '-inf', s(now), 'LIMIT', 0, tonumber(ARGV[5]))
  for _, m in ipairs(expired) do
    redis.call('DEL', tag .. ':i:' .. m)
    redis.call('ZREM', IIDX, m)
  end
  return {#expired, #expired == tonumber(ARGV[5]) and 'more' or ''}
end
local start = ARGV[4] == '' and '-' or ('(' .. ARGV[4])
local members = redis.call('ZRANGEBYLEX', SESSIONS, start, '+', 'LIMIT', 0, tonumber(ARGV[5]))
for _, member in ipairs(members) do
  local dlt, dlv = tag .. ':dlt:' .. member, tag .. ':dlv:' .. member
  if ttl > 0 then
    local old = redis.call('ZRANGEBYSCORE', dlt, '-inf', s(now - ttl))
    if #old > 0 then
      redis.call('ZREMRANGEBYSCORE', dlt, '-inf', s(now - ttl))
      redis.call('HDEL', dlv, unpack(old))
      gone = gone + #old
    end
  end
  if session_state(dlt, dlv, now, ttl) == 'empty' and redis.call('ZCARD', dlt) == 0 then
    redis.call('DEL', dlt, dlv)
    redis.call('ZREM', SESSIONS, member)
    gone = gone + 1
  end
end
return {gone, #members == tonumber(ARGV[5]) and members[#members] or ''}
"""

# ---------------------------------------------------------------------------------
# reset_all: every shard, tombstone, history, DL session, counter and idempotency
# record, and the test clock offset; keeps ori_enabled in the meta hash. One call clears at most
# ARGV[2] entries of each index, so a large namespace is cleared in several calls (one
# script must not block Redis for long); the counters go with the last call.
# KEYS: counters, live index, all-shards index, sessions index, idem index, meta.
# ARGV: tag prefix, batch size, "1" on the first call.
# Returns {shards cleared by this call, 1 if any index still has entries}.
RESET_ALL = r"""
local COUNTERS, LIVE, ALL, SESSIONS, IIDX, META = unpack(KEYS)
local tag, batch = ARGV[1], tonumber(ARGV[2])
if ARGV[3] == '1' then
  -- consumed mandates and rate buckets go (UNLINK frees large hashes in the
  -- background); revocations (':rv:') stay, and so does ori_enabled
  redis.call('UNLINK', tag .. ':mandates', tag .. ':buckets')
  redis.call('HDEL', META, 'offset')
end
local function drain(index, each)
  local members = redis.call('ZRANGE', index, 0, batch - 1)
  for _, m in ipairs(members) do each(m) end
  if #members > 0 then redis.call('ZREM', index, unpack(members)) end
  return members
end
local shards = drain(ALL, function(k)
  redis.call('DEL', tag .. ':s:' .. k, tag .. ':h:' .. k)
end)
if #shards > 0 then redis.call('ZREM', LIVE, unpack(shards)) end
drain(SESSIONS, function(m) redis.call('DEL', tag .. ':dlt:' .. m, tag .. ':dlv:' .. m) end)
drain(IIDX, function(m) redis.call('DEL', tag .. ':i:' .. m) end)
local more = redis.call('ZCARD', ALL) + redis.call('ZCARD', SESSIONS) + redis.call('ZCARD', IIDX)
if more == 0 then redis.call('DEL', COUNTERS, LIVE) return {#shards, 0} end
return {#shards, 1}
"""

# ---------------------------------------------------------------------------------
# Small state changes.  KEYS: meta.
# ARGV: ms, the cap (clock.offset_cap_ms). Checked and moved in one script, so two
# concurrent advances cannot together pass the cap. Returns {'OK', offset} or
# {'ERR', offset} (over the cap: nothing moved).
ADVANCE_CLOCK = r"""
local offset = tonumber(redis.call('HGET', KEYS[1], 'offset') or '0')
if offset + tonumber(ARGV[1]) > tonumber(ARGV[2]) then return {'ERR', offset} end
return {'OK', redis.call('HINCRBY', KEYS[1], 'offset', ARGV[1])}
"""

SET_ORI = r"""
redis.call('HSET', KEYS[1], 'ori', ARGV[1])
return 1
"""

# ---------------------------------------------------------------------------------
# Read-only scripts (consistent snapshots of several keys).
NOW = r"""
local now = clock(KEYS[1])
return now
"""

# KEYS: the jti's revocation key.  ARGV: deadline (store ms).  A later deadline already
# there stays; the key expires with its deadline (PXAT, on Redis's real clock).
REVOKE = r"""
local cur = redis.call('GET', KEYS[1])
if cur and tonumber(cur) >= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PXAT', ARGV[1])
return 1
"""

# KEYS: meta, the jti's revocation key.  Returns {store ms, deadline or nil}.
REVOCATION = r"""
return {clock(KEYS[1]), redis.call('GET', KEYS[2])}
"""

# KEYS: shard, hist.  ARGV: before (-1 = none), limit
HISTORY = r"""
local r = load(KEYS[1])
if not r then return {'NOTFOUND'} end
local top = r.version
local before = tonumber(ARGV[1])
if before >= 0 and before - 1 < top then top = before - 1 end
local limit = tonumber(ARGV[2])
local out = {}
local v = top
while v >= r.hmin and #out < limit do
  local e = redis.call('HMGET', KEYS[2], 'm' .. s(v), 'c' .. s(v))
  if e[1] then out[#out + 1] = {e[1], e[2]} end
  v = v - 1
end
return {'OK', out}
"""

# KEYS: meta, counters, live index, sessions index.  ARGV: ttl, tag prefix
STATS = r"""
local META, COUNTERS, LIVE, SESSIONS = unpack(KEYS)
local ttl, tag = tonumber(ARGV[1]), ARGV[2]
local now = clock(META)
local agents, n_agents, deliveries = {}, 0, 0
for _, member in ipairs(redis.call('ZRANGE', SESSIONS, 0, -1)) do
  local agent = string.match(member, '^[^%z]*')
  local dlt = tag .. ':dlt:' .. member
  local n
  if ttl <= 0 then n = redis.call('ZCARD', dlt)
  else n = redis.call('ZCOUNT', dlt, '(' .. s(now - ttl), '+inf') end
  if n > 0 then
    deliveries = deliveries + n
    if not agents[agent] then agents[agent] = true; n_agents = n_agents + 1 end
  end
end
return {redis.call('HGETALL', COUNTERS), redis.call('ZCARD', LIVE), n_agents, deliveries,
        redis.call('HGET', META, 'ori') ~= '0' and 1 or 0}
"""

# KEYS: meta, sessions index.  ARGV: ttl, tag prefix, cursor (agent, '' = first), limit
DUMP_DL = r"""
local META, SESSIONS = unpack(KEYS)
local ttl, tag, after, limit = tonumber(ARGV[1]), ARGV[2], ARGV[3], tonumber(ARGV[4])
local now = clock(META)
-- every member of an agent after the cursor sorts at or above after .. '\1'
local start = after == '' and '-' or ('[' .. after .. '\1')
local out, agents, n_agents = {}, {}, 0
for _, member in ipairs(redis.call('ZRANGEBYLEX', SESSIONS, start, '+')) do
  local agent = string.match(member, '^[^%z]*')
  local session = string.sub(member, #agent + 2)
  local dlt, dlv = tag .. ':dlt:' .. member, tag .. ':dlv:' .. member
  local entries = (ttl <= 0) and redis.call('ZRANGE', dlt, 0, -1, 'WITHSCORES')
    or redis.call('ZRANGEBYSCORE', dlt, '(' .. s(now - ttl), '+inf', 'WITHSCORES')
  if #entries > 0 then
    if not agents[agent] then
      if n_agents >= limit then return {out, 1, now} end
      agents[agent] = true
      n_agents = n_agents + 1
    end
    local keys, served = {}, {}
    for j = 1, #entries, 2 do
      keys[#keys + 1] = entries[j]
      served[#served + 1] = entries[j + 1]
    end
    local versions = redis.call('HMGET', dlv, unpack(keys))
    for j = 1, #keys do
      out[#out + 1] = {agent, session, keys[j], versions[j] or '0', served[j]}
    end
  end
end
return {out, 0, now}
"""


@dataclass(frozen=True, slots=True)
class Script:
    """One Lua script: its full source (shebang, prelude, body) and its SHA1 for
    EVALSHA. ``writes`` False marks a read-only script (``flags=no-writes``)."""

    name: str
    source: str
    sha: str
    writes: bool


def _script(name: str, body: str, *, writes: bool = True) -> Script:
    shebang = "#!lua\n" if writes else "#!lua flags=no-writes\n"
    source = shebang + PRELUDE + body
    return Script(name, source, hashlib.sha1(source.encode()).hexdigest(), writes)


# ---------------------------------------------------------------------------------
# take_token: the per-agent token bucket (rules.bucket_take in Lua).
# KEYS: meta, the buckets hash (fields t:<agent>, u:<agent>).  ARGV: per_ms, burst,
# agent.  Returns the wait in ms (0 = taken).
TAKE_TOKEN = r"""
local now = clock(KEYS[1])
local per_ms, burst, agent = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local b = redis.call('HMGET', KEYS[2], 't:' .. agent, 'u:' .. agent)
local level = burst
if b[1] then
  level = math.min(burst, tonumber(b[1]) + math.max(0, now - tonumber(b[2])) * per_ms)
end
local wait = 0
if level >= 1 then
  level = level - 1
else
  wait = math.max(1, math.ceil((1 - level) / per_ms))
end
redis.call('HSET', KEYS[2], 't:' .. agent, tostring(level), 'u:' .. agent, s(now))
return wait
"""

SCRIPTS: dict[str, Script] = {
    s.name: s
    for s in (
        _script("create", changes_lua.HELPER + CREATE),
        _script("read", READ),
        _script("read_many", READ_MANY),
        _script("register", REGISTER),
        _script("inject", INJECT),
        _script("reset_session", RESET_SESSION),
        _script("commit", audit_lua.HELPER + changes_lua.HELPER + COMMIT),
        _script("purge", PURGE),
        _script("reset_all", RESET_ALL),
        _script("advance_clock", ADVANCE_CLOCK),
        _script("set_ori", SET_ORI),
        _script("take_token", TAKE_TOKEN),
        _script("revoke", REVOKE),
        _script("now", NOW, writes=False),
        _script("revocation", REVOCATION, writes=False),
        _script("history", HISTORY, writes=False),
        _script("stats", STATS, writes=False),
        _script("dump_dl", DUMP_DL, writes=False),
        _script("audit", audit_lua.WRITE),
        _script("changes", changes_lua.READ, writes=False),
        _script("trim_changes", changes_lua.TRIM),
        _script("conflict", changes_lua.CONFLICT),
        _script("audit_purge", audit_lua.PURGE),
        _script("audit_page", audit_lua.PAGE, writes=False),
    )
}
