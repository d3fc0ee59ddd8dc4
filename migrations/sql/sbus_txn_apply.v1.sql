-- The second half of a commit. Writes counters, shards, history with retention
-- trimming, the DeliveryLog, the idempotency record and the consumed mandate. Measures a
-- history entry as the octets of its content. Installed by migration 0002.
-- A released file never changes: a new behaviour is a new version.
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
