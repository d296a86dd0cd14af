-- cacheme: the table of a PostgreSQL tier.
--   Storage(url="postgresql://user:pw@host:5432/db", table="cacheme_data", pool_size=50)
-- To use another table name, replace every cacheme_data below with it (lower case:
-- cacheme quotes the name, so it is case-sensitive).
--
-- key     the full cache key {prefix}:{key}:{version}, as in Redis; keys over 255
--         characters (or ending in a space, or holding a NUL) are stored as their first
--         183 characters + ':sha256:' + the SHA-256 hex digest of the whole key, the same
--         on every SQL backend (see cacheme/storages/sql.py). cacheme refuses a key column
--         of type citext, char(n) or varchar(n) shorter than 255, or with a
--         nondeterministic collation (under which 'User' and 'user' can be one row).
-- value   the serializer's bytes (bytea: cacheme refuses another type)
-- expire  when the entry expires (timestamptz: an instant, shown in the session's time
--         zone); NULL = never. Reads skip expired rows; the storage deletes them in the
--         background.
--
-- A cache can be rebuilt, so CREATE UNLOGGED TABLE is a fair choice: faster writes, no
-- WAL, but emptied after a crash and not replicated.
--
-- Delete one entry by hand:  DELETE FROM cacheme_data WHERE key = 'myapp:user:42:v1';

CREATE TABLE IF NOT EXISTS cacheme_data (
    "key"    TEXT        NOT NULL PRIMARY KEY,
    "value"  BYTEA       NOT NULL,
    "expire" TIMESTAMPTZ NULL
);

CREATE INDEX IF NOT EXISTS cacheme_data_expire ON cacheme_data ("expire");
