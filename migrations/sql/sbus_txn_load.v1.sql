-- The first half of a commit. Takes the idempotency lock, locks the session row
-- and every named key in one ordered pass, and returns what sbus.core.rules.decide needs.
-- Installed by migration 0002.
-- A released file never changes: a new behaviour is a new version.
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
