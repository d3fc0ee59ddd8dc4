-- The store clock in milliseconds: the server's wall clock plus the offset an
-- operator set (sbus_meta clock_offset_ms). Installed by migration 0002.
-- A released file never changes: a new behaviour is a new version.
CREATE OR REPLACE FUNCTION sbus_now_ms() RETURNS bigint LANGUAGE sql VOLATILE AS $$
  SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint
       + COALESCE((SELECT value FROM sbus_meta WHERE name = 'clock_offset_ms'), 0)
$$;
