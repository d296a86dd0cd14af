#!/usr/bin/env bash
# A six-node Redis Cluster (three primaries, three replicas) on 127.0.0.1:7000-7005 for the
# integration tests (REDIS_CLUSTER_URL defaults to redis://127.0.0.1:7000).
#
#   scripts/services/redis-cluster.sh start    bring it up (idempotent), wait for cluster_state:ok
#   scripts/services/redis-cluster.sh stop     shut the six nodes down, remove their state
#   scripts/services/redis-cluster.sh status   print whether it is up; exit 0 if it is
#
# State (nodes.conf, logs, pid files) lives in $REPO/.services/redis-cluster/<port>/. Works
# from any directory and never reads standard input. Only nodes whose working directory is
# that state directory are ever shut down, so an unrelated server on these ports is left
# alone (start then fails with a message instead).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
STATE="$REPO/.services/redis-cluster"
HOST=127.0.0.1
PORTS=(7000 7001 7002 7003 7004 7005)
WAIT_SECONDS="${REDIS_CLUSTER_WAIT:-60}"
REDIS_SERVER="${REDIS_SERVER:-redis-server}"
REDIS_CLI="${REDIS_CLI:-redis-cli}"

log() { printf 'redis-cluster: %s\n' "$*" >&2; }

cli() { # cli PORT ARGS...: one redis-cli call that can neither hang nor read stdin
    local port="$1"
    shift
    timeout 5 "$REDIS_CLI" -h "$HOST" -p "$port" "$@" </dev/null 2>/dev/null
}

responds() { [[ "$(cli "$1" ping || true)" == "PONG" ]]; }

ours() { # is the server on PORT one of our nodes (its dir is our state dir)?
    local dir
    dir="$(cli "$1" config get dir | sed -n 2p || true)"
    [[ "$dir" == "$STATE/$1" ]]
}

node_ok() { cli "$1" cluster info | tr -d '\r' | grep -qx 'cluster_state:ok'; }

all_ok() {
    local port
    for port in "${PORTS[@]}"; do
        responds "$port" && node_ok "$port" || return 1
    done
}

shutdown_ours() {
    local port waited
    for port in "${PORTS[@]}"; do
        if responds "$port" && ours "$port"; then
            cli "$port" shutdown nosave >/dev/null || true
        fi
    done
    for port in "${PORTS[@]}"; do
        waited=0
        while responds "$port" && ours "$port"; do
            if ((waited >= 100)); then
                log "node $port did not shut down within 10s"
                return 1
            fi
            sleep 0.1
            waited=$((waited + 1))
        done
    done
}

start() {
    command -v "$REDIS_SERVER" >/dev/null || { log "$REDIS_SERVER not found"; exit 1; }
    command -v "$REDIS_CLI" >/dev/null || { log "$REDIS_CLI not found"; exit 1; }
    if all_ok; then
        log "already up on $HOST:${PORTS[0]}-${PORTS[-1]}"
        return 0
    fi
    # Anything else (some nodes down, nodes up but never joined, stale nodes.conf from an
    # earlier run): start from scratch.
    local port
    for port in "${PORTS[@]}"; do
        if responds "$port" && ! ours "$port"; then
            log "port $port is taken by a Redis server that is not ours; stop it first"
            exit 1
        fi
    done
    shutdown_ours
    rm -rf "$STATE"
    for port in "${PORTS[@]}"; do
        mkdir -p "$STATE/$port"
        "$REDIS_SERVER" \
            --port "$port" --bind "$HOST" \
            --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 5000 \
            --dir "$STATE/$port" --logfile "$STATE/$port/redis.log" \
            --pidfile "$STATE/$port/redis.pid" --daemonize yes \
            --save "" --appendonly no </dev/null >/dev/null
    done
    local deadline=$((SECONDS + WAIT_SECONDS))
    for port in "${PORTS[@]}"; do
        until responds "$port"; do
            if ((SECONDS >= deadline)); then
                log "node $port did not start; see $STATE/$port/redis.log"
                exit 1
            fi
            sleep 0.1
        done
    done
    local nodes=()
    for port in "${PORTS[@]}"; do nodes+=("$HOST:$port"); done
    if ! timeout "$WAIT_SECONDS" "$REDIS_CLI" --cluster create "${nodes[@]}" \
        --cluster-replicas 1 --cluster-yes </dev/null >"$STATE/create.log" 2>&1; then
        log "cluster create failed:"
        cat "$STATE/create.log" >&2
        exit 1
    fi
    until all_ok; do
        if ((SECONDS >= deadline)); then
            log "cluster_state is not ok on every node after ${WAIT_SECONDS}s"
            for port in "${PORTS[@]}"; do
                log "$port: $(cli "$port" cluster info | tr -d '\r' | grep cluster_state || echo down)"
            done
            exit 1
        fi
        sleep 0.2
    done
    log "up on $HOST:${PORTS[0]}-${PORTS[-1]} (state in $STATE)"
}

stop() {
    shutdown_ours
    rm -rf "$STATE"
    log "stopped"
}

status() {
    if all_ok; then
        echo "redis-cluster: up ($HOST:${PORTS[0]}-${PORTS[-1]}, cluster_state:ok)"
        return 0
    fi
    local port up=()
    for port in "${PORTS[@]}"; do
        responds "$port" && up+=("$port")
    done
    if ((${#up[@]} == 0)); then
        echo "redis-cluster: down"
    else
        echo "redis-cluster: not ok (nodes answering: ${up[*]})"
    fi
    return 1
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
