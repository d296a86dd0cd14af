-- cacheme: the table of a MySQL (>= 5.7) or MariaDB (>= 10.3) tier.
--   Storage("mysql://user:pw@host:3306/db", table="cacheme_data", pool_size=50)
-- To use another table name, replace every cacheme_data below with it.
--
-- key     the full cache key {prefix}:{key}:{version}, as in Redis; utf8mb4_bin makes it
--         case-sensitive. Keys over 255 characters (the most an index takes in utf8mb4),
--         ending in a space (which utf8mb4_bin would ignore) or holding a NUL are stored as
--         their first 183 characters + ':sha256:' + the SHA-256 hex digest of the whole
--         key, the same on every SQL backend (see cacheme/storages/sql.py). cacheme refuses
--         a key column whose collation is not binary (utf8mb4_general_ci, the usual server
--         default, makes 'User' and 'user' one row), shorter than 255 or not in utf8mb4.
-- value   the serializer's bytes; values are sent as hex, so one must stay under half of
--         the server's max_allowed_packet (8 MiB with MariaDB's default of 16 MiB).
--         A BLOB type (cacheme refuses a value column that is not binary).
-- expire  when the entry expires, in UTC (compare with UTC_TIMESTAMP(6), not NOW());
--         NULL = never. Reads skip expired rows; the storage deletes them in the
--         background.
--
-- Delete one entry by hand:  DELETE FROM cacheme_data WHERE `key` = 'myapp:user:42:v1';

CREATE TABLE IF NOT EXISTS `cacheme_data` (
    `key`    VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    `value`  LONGBLOB     NOT NULL,
    `expire` DATETIME(6)  NULL DEFAULT NULL,
    PRIMARY KEY (`key`),
    KEY `cacheme_data_expire` (`expire`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
