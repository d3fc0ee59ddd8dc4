-- The store clock in milliseconds, as version 1, in PL/pgSQL: PostgreSQL plans a
-- LANGUAGE sql function's body again on every call from a new transaction (about a
-- tenth of a millisecond here, twice per read+commit cycle), while PL/pgSQL keeps the
-- plan for the session. Installed by migration 0008.
-- A released file never changes: a new behaviour is a new version.
CREATE OR REPLACE FUNCTION sbus_now_ms() RETURNS bigint LANGUAGE plpgsql VOLATILE AS $$
BEGIN
  RETURN (extract(epoch FROM clock_timestamp()) * 1000)::bigint
       + COALESCE((SELECT value FROM sbus_meta WHERE name = 'clock_offset_ms'), 0);
END $$;
