#!/usr/bin/env bash
# The single-node servers the tests use: Redis 6379, PostgreSQL 5432, MariaDB 3306.
# On the project's machines they run already; this starts any that is installed but stopped.
set -uo pipefail
cmd=${1:-status}
STATE="$(cd "$(dirname "$0")/../.." && pwd)/.services/standalone.started"

redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }
pg_up() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }
mysql_up() { mysqladmin --socket=/run/mysqld/mysqld.sock -uroot ping >/dev/null 2>&1 ||
             mariadb-admin --socket=/run/mysqld/mysqld.sock -uroot ping >/dev/null 2>&1; }

wait_for() {  # wait_for NAME CHECK: up to 30 s
  local i
  for i in $(seq 1 60); do "$2" && return 0; sleep 0.5; done
  echo "standalone: $1 did not come up" >&2; return 1
}

case "$cmd" in
  status)
    ok=0
    redis_up || { echo "redis: down"; ok=1; }
    pg_up || { echo "postgresql: down"; ok=1; }
    mysql_up || { echo "mariadb: down"; ok=1; }
    exit $ok ;;
  start)
    rc=0
    mkdir -p "$(dirname "$STATE")"; : > "$STATE"
    if ! redis_up && command -v redis-server >/dev/null; then
      mkdir -p /var/lib/redis /var/log/redis
      redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
        --dir /var/lib/redis --logfile /var/log/redis/ci.log && echo redis >> "$STATE" &&
        wait_for redis redis_up || rc=1
    fi
    if ! pg_up && command -v pg_ctlcluster >/dev/null; then
      pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start &&
        echo postgresql >> "$STATE" && wait_for postgresql pg_up || rc=1
    fi
    if ! mysql_up && [ -x /usr/sbin/mariadbd ]; then
      start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd &&
        echo mariadb >> "$STATE" && wait_for mariadb mysql_up || rc=1
    fi
    exit $rc ;;
  stop)
    # Stop only what `start` started (recorded in $STATE).
    [ -f "$STATE" ] || exit 0
    grep -qx redis "$STATE" && redis-cli -h 127.0.0.1 -p 6379 shutdown nosave >/dev/null 2>&1
    grep -qx postgresql "$STATE" &&
      pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main stop
    grep -qx mariadb "$STATE" && start-stop-daemon --stop --oknodo --exec /usr/sbin/mariadbd
    rm -f "$STATE"
    exit 0 ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
