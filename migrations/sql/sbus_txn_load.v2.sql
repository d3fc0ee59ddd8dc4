-- The first half of a commit, as version 1 (the idempotency lock, then the session row
-- and every named key locked in one ordered pass, returning what sbus.core.rules.decide
-- needs) with less work per call: each run of keys taking one lock mode is locked and
-- read by the same statement (version 1 locked through sbus_lock_run, then read the rows
-- again), the DeliveryLog is read once, and generic plans are forced, because the
-- planner otherwise plans the array-parameter statements afresh on every call.
-- Installed by migration 0008.
-- A released file never changes: a new behaviour is a new version.
CREATE OR REPLACE FUNCTION sbus_txn_load(
  p_agent text, p_session text, p_writes text[], p_reads text[],
  p_rb_keys text[], p_rb_versions bigint[], p_idem_key text
) RETURNS jsonb LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan AS $$
DECLARE
  v_now bigint := sbus_now_ms();
  v_ori boolean;
  v_sess jsonb;
  v_entries jsonb;
  v_dl text[];
  v_keys text[];
  v_shards jsonb := '[]'::jsonb;
  v_write boolean;
  v_row jsonb;
  v_sources jsonb := '[]'::jsonb;
  v_idem jsonb;
  i int := 1;
  j int;
  n int;
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
  SELECT COALESCE(jsonb_agg(jsonb_build_array(key, version, served_ms)), '[]'::jsonb),
         COALESCE(array_agg(key), '{}'::text[])
    INTO v_entries, v_dl
    FROM sbus_dl_entries WHERE agent_id = p_agent AND session_id = p_session;
  SELECT array_agg(DISTINCT k COLLATE "C" ORDER BY k COLLATE "C") INTO v_keys
    FROM unnest(p_writes || p_reads || v_dl) AS u(k);
  -- Lock in ONE pass in ascending byte order, a run of consecutive keys taking the same
  -- mode per statement: ORDER BY under FOR UPDATE/SHARE locks the rows in sorted order,
  -- so the global order holds, and the rows come back as locked (under READ COMMITTED,
  -- the newest version of a row another commit changed while this one waited).
  -- Read-only rows come without their content, which decide never needs.
  n := COALESCE(cardinality(v_keys), 0);
  WHILE i <= n LOOP
    v_write := v_keys[i] = ANY(p_writes);
    j := i;
    WHILE j < n AND (v_keys[j + 1] = ANY(p_writes)) = v_write LOOP
      j := j + 1;
    END LOOP;
    IF v_write THEN
      SELECT v_shards || COALESCE(jsonb_agg(to_jsonb(r)), '[]'::jsonb) INTO v_shards
        FROM (SELECT * FROM sbus_shards WHERE key = ANY(v_keys[i:j])
               ORDER BY key COLLATE "C" FOR UPDATE) AS r;
    ELSE
      SELECT v_shards || COALESCE(jsonb_agg(to_jsonb(r) - 'content'), '[]'::jsonb)
        INTO v_shards
        FROM (SELECT * FROM sbus_shards WHERE key = ANY(v_keys[i:j])
               ORDER BY key COLLATE "C" FOR SHARE) AS r;
    END IF;
    i := j + 1;
  END LOOP;
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
