"""PostgreSQL server-side functions for the commit protocol and recorded reads.

The commit is one READ COMMITTED transaction of two calls: ``sbus_txn_load`` takes the
idempotency lock, locks the session row, then locks every written key FOR UPDATE and every
read-only key FOR SHARE in ONE pass in ascending byte order (so the write-skew ring cannot
deadlock), and returns what ``sbus.core.rules.decide`` needs; ``sbus_txn_apply`` writes
what it decided. ``sbus_read`` serves and records a read in one round trip. A no-op on
SQLite.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

NOW = """
CREATE OR REPLACE FUNCTION sbus_now_ms() RETURNS bigint LANGUAGE sql VOLATILE AS $$
  SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint
       + COALESCE((SELECT value FROM sbus_meta WHERE name = 'clock_offset_ms'), 0)
$$;
"""

LOCK_RUN = """
CREATE OR REPLACE FUNCTION sbus_lock_run(p_keys text[], p_write boolean)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
  v_n bigint;
BEGIN
  -- count(*) over the locking subquery makes every row of the run get locked.
  IF p_write THEN
    SELECT count(*) INTO v_n FROM (
      SELECT 1 FROM sbus_shards WHERE key = ANY(p_keys) ORDER BY key COLLATE "C" FOR UPDATE
    ) AS locked;
  ELSE
    SELECT count(*) INTO v_n FROM (
      SELECT 1 FROM sbus_shards WHERE key = ANY(p_keys) ORDER BY key COLLATE "C" FOR SHARE
    ) AS locked;
  END IF;
END $$;
"""

LOAD = """
CREATE OR REPLACE FUNCTION sbus_txn_load(
  p_agent text, p_session text, p_writes text[], p_reads text[],
  p_rb_keys text[], p_rb_versions bigint[], p_idem_key text
) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
  v_now bigint := sbus_now_ms();
  v_ori boolean;
  v_sess jsonb;
  v_entries jsonb;
  v_keys text[];
  v_key text;
  v_row jsonb;
  v_shards jsonb;
  v_run text[] := '{}'::text[];
  v_run_write boolean;
  v_write boolean;
  v_sources jsonb := '[]'::jsonb;
  v_idem jsonb;
  i int;
BEGIN
  IF p_idem_key IS NOT NULL THEN
    -- Serializes concurrent requests with one key: the loser sees the winner's record.
    PERFORM pg_advisory_xact_lock(hashtextextended(p_agent || chr(31) || p_idem_key, 0));
    SELECT jsonb_build_array(fingerprint, status, body, etag) INTO v_idem
      FROM sbus_idempotency
     WHERE agent_id = p_agent AND idem_key = p_idem_key AND expires_ms > v_now;
    IF v_idem IS NOT NULL THEN
      RETURN jsonb_build_object('now', v_now, 'idem', v_idem);
    END IF;
  END IF;
  SELECT value <> 0 INTO v_ori FROM sbus_meta WHERE name = 'ori_enabled';
  SELECT jsonb_build_array(overflowed, last_served_ms) INTO v_sess
    FROM sbus_dl_sessions WHERE agent_id = p_agent AND session_id = p_session FOR UPDATE;
  SELECT COALESCE(jsonb_agg(jsonb_build_array(key, version, served_ms)), '[]'::jsonb)
    INTO v_entries
    FROM sbus_dl_entries WHERE agent_id = p_agent AND session_id = p_session;
  SELECT array_agg(k ORDER BY k COLLATE "C") INTO v_keys FROM (
    SELECT unnest(p_writes) UNION SELECT unnest(p_reads)
    UNION SELECT key FROM sbus_dl_entries WHERE agent_id = p_agent AND session_id = p_session
  ) AS u(k);
  -- Lock in ONE pass in ascending byte order. Consecutive keys that take the same
  -- mode are locked by one statement: ORDER BY under FOR UPDATE/SHARE locks the rows
  -- in sorted order, so the global order holds and a commit with one written key and
  -- N read keys costs at most three statements, not N + 1.
  FOREACH v_key IN ARRAY COALESCE(v_keys, '{}'::text[]) LOOP
    v_write := v_key = ANY(p_writes);
    IF cardinality(v_run) > 0 AND v_write <> v_run_write THEN
      PERFORM sbus_lock_run(v_run, v_run_write);
      v_run := '{}'::text[];
    END IF;
    v_run_write := v_write;
    v_run := v_run || v_key;
  END LOOP;
  IF cardinality(v_run) > 0 THEN
    PERFORM sbus_lock_run(v_run, v_run_write);
  END IF;
  -- Then read every locked row in one set-based query (read-only rows without their
  -- content, which decide never needs).
  SELECT COALESCE(jsonb_agg(CASE WHEN s.key = ANY(p_writes) THEN to_jsonb(s)
                                 ELSE to_jsonb(s) - 'content' END), '[]'::jsonb)
    INTO v_shards
    FROM sbus_shards s WHERE s.key = ANY(v_keys);
  FOR i IN 1 .. COALESCE(array_length(p_rb_keys, 1), 0) LOOP
    SELECT to_jsonb(h) INTO v_row FROM sbus_history h
     WHERE h.key = p_rb_keys[i] AND h.version = p_rb_versions[i];
    IF v_row IS NOT NULL THEN
      v_sources := v_sources || jsonb_build_array(v_row);
    END IF;
  END LOOP;
  RETURN jsonb_build_object(
    'now', v_now, 'ori', v_ori, 'session', v_sess, 'entries', v_entries,
    'shards', v_shards, 'sources', v_sources
  );
END $$;
"""

APPLY = """
CREATE OR REPLACE FUNCTION sbus_txn_apply(p jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
  v_mins jsonb := '{}'::jsonb;
  c record;
  s jsonb;
  h jsonb;
  v_min bigint;
  v_bytes bigint;
  v_size bigint;
  v_dropped bigint;
BEGIN
  FOR c IN SELECT key AS name, value::bigint AS delta FROM jsonb_each_text(p->'counters') LOOP
    INSERT INTO sbus_counters (name, slot, value) VALUES (c.name, (p->>'slot')::int, c.delta)
    ON CONFLICT (name, slot) DO UPDATE SET value = sbus_counters.value + excluded.value;
  END LOOP;
  FOR s IN SELECT * FROM jsonb_array_elements(COALESCE(p->'bumps', '[]'::jsonb)) LOOP
    UPDATE sbus_shards SET attempt_count = attempt_count + (s->>1)::bigint,
                           conflict_count = conflict_count + (s->>2)::bigint
     WHERE key = s->>0;
  END LOOP;
  FOR i IN 0 .. COALESCE(jsonb_array_length(p->'shards'), 0) - 1 LOOP
    s := p->'shards'->i;
    h := p->'history'->i;
    v_size := octet_length(h->>'content');
    SELECT hist_min_version, hist_bytes INTO v_min, v_bytes FROM sbus_shards WHERE key = s->>'key';
    IF NOT FOUND THEN
      v_min := (h->>'version')::bigint;
      v_bytes := 0;
    END IF;
    v_bytes := v_bytes + v_size;
    INSERT INTO sbus_history (key, version, agent_id, committed_ms, content, deleted, rationale,
                              commit_id, prev_hash, hash, size)
    VALUES (h->>'key', (h->>'version')::bigint, h->>'agent_id', (h->>'committed_ms')::bigint,
            h->>'content', (h->>'deleted')::boolean, h->>'rationale', h->>'commit_id',
            h->>'prev_hash', h->>'hash', v_size);
    WHILE v_min < (h->>'version')::bigint
          AND ((h->>'version')::bigint - v_min + 1 > (p->>'depth')::bigint
               OR v_bytes > (p->>'max_bytes')::bigint) LOOP
      DELETE FROM sbus_history WHERE key = s->>'key' AND version = v_min RETURNING size
        INTO v_dropped;
      v_bytes := v_bytes - COALESCE(v_dropped, 0);
      v_min := v_min + 1;
    END LOOP;
    INSERT INTO sbus_shards (key, id, content, version, goal_tag, require_mandate, created_ms,
                             updated_ms, attempt_count, conflict_count, deleted, head_hash,
                             hist_min_version, hist_bytes)
    VALUES (s->>'key', s->>'id', s->>'content', (s->>'version')::bigint, s->>'goal_tag',
            (s->>'require_mandate')::boolean, (s->>'created_ms')::bigint,
            (s->>'updated_ms')::bigint, (s->>'attempt_count')::bigint,
            (s->>'conflict_count')::bigint, (s->>'deleted')::boolean, s->>'head_hash',
            v_min, v_bytes)
    ON CONFLICT (key) DO UPDATE SET
      id = excluded.id, content = excluded.content, version = excluded.version,
      goal_tag = excluded.goal_tag, require_mandate = excluded.require_mandate,
      created_ms = excluded.created_ms, updated_ms = excluded.updated_ms,
      attempt_count = excluded.attempt_count, conflict_count = excluded.conflict_count,
      deleted = excluded.deleted, head_hash = excluded.head_hash,
      hist_min_version = excluded.hist_min_version, hist_bytes = excluded.hist_bytes;
    v_mins := v_mins || jsonb_build_object(s->>'key', v_min);
  END LOOP;
  IF p ? 'agent' THEN
    IF (p->>'clear_dl')::boolean THEN
      DELETE FROM sbus_dl_entries WHERE agent_id = p->>'agent' AND session_id = p->>'session';
    END IF;
    INSERT INTO sbus_dl_entries (agent_id, session_id, key, version, served_ms)
    SELECT p->>'agent', p->>'session', e->>0, (e->>1)::bigint, (e->>2)::bigint
      FROM jsonb_array_elements(COALESCE(p->'dl', '[]'::jsonb)) AS e
    ON CONFLICT (agent_id, session_id, key) DO UPDATE
      SET version = excluded.version, served_ms = excluded.served_ms;
    INSERT INTO sbus_dl_sessions (agent_id, session_id, overflowed, last_served_ms)
    VALUES (p->>'agent', p->>'session', (p->>'overflowed')::boolean,
            (p->>'last_served')::bigint)
    ON CONFLICT (agent_id, session_id) DO UPDATE
      SET overflowed = excluded.overflowed, last_served_ms = excluded.last_served_ms;
  END IF;
  IF p->'idem' IS NOT NULL AND jsonb_typeof(p->'idem') = 'array' THEN
    DELETE FROM sbus_idempotency WHERE expires_ms <= (p->>'now')::bigint;
    INSERT INTO sbus_idempotency (agent_id, idem_key, fingerprint, status, body, etag,
                                  expires_ms)
    VALUES (p->'idem'->>0, p->'idem'->>1, p->'idem'->>2, (p->'idem'->>3)::int,
            p->'idem'->>4, (p->'idem'->>5)::bigint, (p->'idem'->>6)::bigint)
    ON CONFLICT (agent_id, idem_key) DO UPDATE SET
      fingerprint = excluded.fingerprint, status = excluded.status, body = excluded.body,
      etag = excluded.etag, expires_ms = excluded.expires_ms;
  END IF;
  IF p ? 'consume' AND jsonb_typeof(p->'consume') = 'array' THEN
    -- Table from migration 0003; PL/pgSQL resolves it when this runs.
    INSERT INTO sbus_consumed_mandates (jti, retain_until_ms)
    VALUES (p->'consume'->>0, (p->'consume'->>1)::bigint)
    ON CONFLICT (jti) DO UPDATE SET retain_until_ms = excluded.retain_until_ms;
  END IF;
  RETURN v_mins;
END $$;
"""

READ = """
CREATE OR REPLACE FUNCTION sbus_read(
  p_key text, p_agent text, p_session text, p_record boolean, p_ttl bigint, p_max bigint
) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
  v_now bigint;
  v_shard jsonb;
  v_over boolean;
  v_last bigint;
  v_live bigint;
  v_has_key boolean;
  v_any boolean;
  v_cutoff bigint;
  v_recorded boolean := false;
BEGIN
  SELECT to_jsonb(s) INTO v_shard FROM sbus_shards s WHERE s.key = p_key;
  IF v_shard IS NULL OR p_agent IS NULL OR NOT p_record THEN
    RETURN jsonb_build_object('shard', v_shard, 'recorded', false);
  END IF;
  v_now := sbus_now_ms();
  -- Create-or-lock the session row: serializes concurrent reads of one session so the
  -- overflow bound holds.
  INSERT INTO sbus_dl_sessions (agent_id, session_id, overflowed, last_served_ms)
  VALUES (p_agent, p_session, false, NULL) ON CONFLICT DO NOTHING;
  SELECT overflowed, last_served_ms INTO v_over, v_last FROM sbus_dl_sessions
   WHERE agent_id = p_agent AND session_id = p_session FOR UPDATE;
  IF v_over THEN
    RETURN jsonb_build_object('shard', v_shard, 'recorded', false);
  END IF;
  v_cutoff := CASE WHEN p_ttl > 0 THEN v_now - p_ttl ELSE NULL END;
  SELECT count(*), bool_or(key = p_key), count(*) > 0 INTO v_live, v_has_key, v_any
    FROM sbus_dl_entries
   WHERE agent_id = p_agent AND session_id = p_session
     AND (v_cutoff IS NULL OR served_ms > v_cutoff);
  IF v_live = 0 THEN
    -- empty, expired or purged: start afresh
    DELETE FROM sbus_dl_entries WHERE agent_id = p_agent AND session_id = p_session;
  ELSIF NOT COALESCE(v_has_key, false) AND v_live >= p_max THEN
    UPDATE sbus_dl_sessions SET overflowed = true
     WHERE agent_id = p_agent AND session_id = p_session;
    RETURN jsonb_build_object('shard', v_shard, 'recorded', false);
  END IF;
  INSERT INTO sbus_dl_entries (agent_id, session_id, key, version, served_ms)
  VALUES (p_agent, p_session, p_key, (v_shard->>'version')::bigint, v_now)
  ON CONFLICT (agent_id, session_id, key) DO UPDATE
    SET version = excluded.version, served_ms = excluded.served_ms;
  UPDATE sbus_dl_sessions SET last_served_ms = v_now
   WHERE agent_id = p_agent AND session_id = p_session;
  RETURN jsonb_build_object('shard', v_shard, 'recorded', true);
END $$;
"""

FUNCTIONS = ("sbus_read", "sbus_txn_apply", "sbus_txn_load", "sbus_lock_run", "sbus_now_ms")


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for ddl in (NOW, LOCK_RUN, LOAD, APPLY, READ):
        op.execute(ddl)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for name in FUNCTIONS:
        op.execute(f"DROP FUNCTION IF EXISTS {name} CASCADE")
