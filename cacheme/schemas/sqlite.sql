-- cacheme: the table of a SQLite tier.
--   Storage(url="sqlite:///path/to/file.db", table="cacheme_data")
-- To use another table name, replace every cacheme_data below with it.
--
-- key     the full cache key {prefix}:{key}:{version}, as in Redis; keys over 255
--         characters (or ending in a space, or holding a NUL) are stored as their first
--         183 characters + ':sha256:' + the SHA-256 hex digest of the whole key, the same
--         on every SQL backend (see cacheme/storages/sql.py). No COLLATE: cacheme refuses
--         NOCASE or RTRIM on this column or in an index on it ('User' = 'user').
-- value   the serializer's bytes
-- expire  when the entry expires, UTC, as 'YYYY-MM-DD HH:MM:SS.ffffff'; NULL = never.
--         Reads skip expired rows; the storage deletes them in the background.
--
-- Delete one entry by hand:  DELETE FROM cacheme_data WHERE "key" = 'myapp:user:42:v1';

CREATE TABLE IF NOT EXISTS cacheme_data (
    "key"    TEXT NOT NULL PRIMARY KEY,
    "value"  BLOB NOT NULL,
    "expire" TEXT NULL
);

CREATE INDEX IF NOT EXISTS cacheme_data_expire ON cacheme_data ("expire");
