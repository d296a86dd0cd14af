#!/usr/bin/env bash
# Create the MySQL/MariaDB test user and database (idempotent, no standard input).
#
#   database  test
#   user      cacheme@127.0.0.1 and cacheme@localhost, password "cacheme", ALL on test.*
#
# Connects as root over the unix socket (root has no password there). Override with
# MYSQL_SOCKET=/path/to/mysqld.sock or MYSQL_CLIENT=mysql.
set -euo pipefail

SOCKET="${MYSQL_SOCKET:-/run/mysqld/mysqld.sock}"
CLIENT="${MYSQL_CLIENT:-}"
if [[ -z "$CLIENT" ]]; then
    if command -v mariadb >/dev/null 2>&1; then
        CLIENT=mariadb
    elif command -v mysql >/dev/null 2>&1; then
        CLIENT=mysql
    else
        echo "mysql-user.sh: neither 'mariadb' nor 'mysql' client found" >&2
        exit 1
    fi
fi

if [[ ! -S "$SOCKET" ]]; then
    echo "mysql-user.sh: no server socket at $SOCKET (is MariaDB/MySQL running?)" >&2
    exit 1
fi

"$CLIENT" --protocol=socket --socket="$SOCKET" -uroot --batch </dev/null -e "
CREATE DATABASE IF NOT EXISTS \`test\` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin;
CREATE USER IF NOT EXISTS 'cacheme'@'127.0.0.1' IDENTIFIED BY 'cacheme';
CREATE USER IF NOT EXISTS 'cacheme'@'localhost' IDENTIFIED BY 'cacheme';
ALTER USER 'cacheme'@'127.0.0.1' IDENTIFIED BY 'cacheme';
ALTER USER 'cacheme'@'localhost' IDENTIFIED BY 'cacheme';
GRANT ALL PRIVILEGES ON \`test\`.* TO 'cacheme'@'127.0.0.1';
GRANT ALL PRIVILEGES ON \`test\`.* TO 'cacheme'@'localhost';
FLUSH PRIVILEGES;
"
echo "mysql-user.sh: user cacheme ready on database test"
