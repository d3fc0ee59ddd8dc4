-- Locks one run of shard rows, all FOR UPDATE or all FOR SHARE, in ascending
-- byte order. Called only by sbus_txn_load. Installed by migration 0002.
-- A released file never changes: a new behaviour is a new version.
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
