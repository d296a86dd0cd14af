#!/usr/bin/env bash
# The MongoDB test server: SecantusDB (a MongoDB wire-protocol server written in Python,
# installed in the venv by the dev extra) on 127.0.0.1:27017.
#
#   scripts/services/mongo.sh start   # start it in the background, wait until it answers
#   scripts/services/mongo.sh stop    # stop the one `start` started, forget its data
#   scripts/services/mongo.sh status  # say whether something answers on the port
#
# With MONGO_URL set, the tests use that server (a real mongod, say) and this script does
# nothing. If something already answers on the port, `start` leaves it alone.
# State (data, pid file, log) lives in $REPO/.services/mongo/.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
STATE="$REPO/.services/mongo"
PIDFILE="$STATE/secantusd.pid"
LOGFILE="$STATE/secantusd.log"
HOST=127.0.0.1
PORT=27017
WAIT_SECONDS=30

if [[ -x "$REPO/.venv/bin/python" ]]; then
    PYTHON="$REPO/.venv/bin/python"
else
    PYTHON="$(command -v python3 || command -v python)"
fi
if [[ -x "$REPO/.venv/bin/secantusd-py" ]]; then
    SECANTUSD="$REPO/.venv/bin/secantusd-py"
else
    SECANTUSD="$(command -v secantusd-py || true)"
fi

say() { echo "mongo.sh: $*" >&2; }

# True when a MongoDB server answers a ping on HOST:PORT.
answers() {
    "$PYTHON" - "$HOST" "$PORT" <<'EOF' >/dev/null 2>&1
import sys
from pymongo import MongoClient

client = MongoClient(host=sys.argv[1], port=int(sys.argv[2]), serverSelectionTimeoutMS=500,
                     connectTimeoutMS=500, directConnection=True)
try:
    client.admin.command("ping")
finally:
    client.close()
EOF
}

# The pid in the pid file, if that process is alive and still a secantusd-py.
running_pid() {
    [[ -f "$PIDFILE" ]] || return 1
    local pid
    pid="$(cat "$PIDFILE")"
    [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
    if [[ -r "/proc/$pid/cmdline" ]]; then
        tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q secantusd || return 1
    fi
    echo "$pid"
}

start() {
    local pid
    if [[ -n "${MONGO_URL:-}" ]]; then
        say "MONGO_URL is set; the tests use that server, nothing to start"
        return 0
    fi
    if answers; then
        say "a MongoDB server already answers on $HOST:$PORT"
        return 0
    fi
    if [[ -z "$SECANTUSD" ]]; then
        say "secantusd-py not found: pip install -e '.[dev]' (in $REPO/.venv)"
        return 1
    fi
    if pid="$(running_pid)"; then
        say "secantusd-py (pid $pid) is running but does not answer; see $LOGFILE"
        return 1
    fi
    mkdir -p "$STATE"
    # Its own session (where setsid exists), so it outlives the caller's terminal and jobs.
    local detach=()
    command -v setsid >/dev/null && detach=(setsid)
    "${detach[@]}" "$SECANTUSD" --host "$HOST" --port "$PORT" --storage-path "$STATE/data" \
        --log-level WARNING </dev/null >"$LOGFILE" 2>&1 &
    echo $! >"$PIDFILE"
    local deadline=$((SECONDS + WAIT_SECONDS))
    until answers; do
        if ! running_pid >/dev/null; then
            say "secantusd-py exited; its log ($LOGFILE):"
            tail -n 20 "$LOGFILE" >&2 || true
            rm -f "$PIDFILE"
            return 1
        fi
        if ((SECONDS >= deadline)); then
            say "secantusd-py did not answer within ${WAIT_SECONDS}s; see $LOGFILE"
            return 1
        fi
        sleep 0.2
    done
    say "SecantusDB (pid $(cat "$PIDFILE")) answers on $HOST:$PORT"
}

stop() {
    if [[ -n "${MONGO_URL:-}" ]]; then
        say "MONGO_URL is set; nothing was started, nothing to stop"
        return 0
    fi
    local pid
    if pid="$(running_pid)"; then
        kill "$pid"
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            say "pid $pid did not stop within 5s; killing it"
            kill -9 "$pid" 2>/dev/null || true
        fi
        say "stopped secantusd-py (pid $pid)"
    else
        say "no secantusd-py started by this script is running"
    fi
    rm -rf "$STATE"
}

status() {
    if answers; then
        say "a MongoDB server answers on $HOST:$PORT"
    else
        say "nothing answers on $HOST:$PORT"
        return 1
    fi
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *)
        echo "usage: $0 start|stop|status" >&2
        exit 2
        ;;
esac
