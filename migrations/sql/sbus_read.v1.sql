-- Serves one shard and records the read in the DeliveryLog in one round trip,
-- creating or locking the session row so the bound holds under concurrent reads.
-- Installed by migration 0002.
-- A released file never changes: a new behaviour is a new version.
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
