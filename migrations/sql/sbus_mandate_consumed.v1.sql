-- Takes the mandate's advisory lock, then checks for a consumed record in a
-- statement of its own (a fresh snapshot sees a winner that committed during the wait).
-- Installed by migration 0004.
-- A released file never changes: a new behaviour is a new version.
CREATE OR REPLACE FUNCTION sbus_mandate_consumed(p_jti text, p_now bigint)
RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
BEGIN
  PERFORM pg_advisory_xact_lock(hashtextextended(p_jti, 2));
  RETURN EXISTS (
    SELECT 1 FROM sbus_consumed_mandates WHERE jti = p_jti AND retain_until_ms > p_now
  );
END $$;
