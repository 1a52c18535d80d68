#!/usr/bin/env bash
# A Docker engine for the container tests: `docker/engine.sh run CMD...` runs CMD with an engine
# reachable, starting dockerd for it (and stopping it after) only where none answers and this
# machine can run one (root, `apt-get install docker.io`). An engine that already runs is left alone.
#   docker/engine.sh run CMD...   start if needed, run CMD, stop what was started; CMD's exit status
#   docker/engine.sh start | stop start dockerd (if none answers) / stop the dockerd this script started
set -euo pipefail

PIDFILE=${RAYSWEEP_DOCKERD_PIDFILE:-/run/raysweep-dockerd.pid}
LOG=${RAYSWEEP_DOCKERD_LOG:-${TMPDIR:-/tmp}/raysweep-dockerd.log}

say() { echo "engine.sh: $*" >&2; }

answers() { command -v docker >/dev/null && docker info --format '{{.ServerVersion}}' >/dev/null 2>&1; }

# Why this machine cannot start an engine (empty when it can).
why_not() {
    if [ -n "${DOCKER_HOST:-}" ]; then echo "DOCKER_HOST=$DOCKER_HOST is set and does not answer"
    elif [ "$(id -u)" != 0 ]; then echo "no engine answers, and only root can start dockerd here"
    elif ! command -v dockerd >/dev/null || ! command -v docker >/dev/null; then
        echo "no engine answers, and dockerd is not installed (apt-get install docker.io)"
    fi
}

# 0: started one (its pid in $PIDFILE); 1: one already answers; 2: cannot (reason on stderr).
start() {
    if answers; then return 1; fi
    local why; why=$(why_not)
    if [ -n "$why" ]; then say "$why"; return 2; fi
    say "starting dockerd (log: $LOG)"
    # setsid: its own session, so Ctrl-C in the caller's terminal reaches it only through stop().
    setsid dockerd >"$LOG" 2>&1 < /dev/null &
    echo $! > "$PIDFILE"
    for _ in $(seq 120); do
        if answers; then say "dockerd $(docker info --format '{{.ServerVersion}}') is up (pid $(cat "$PIDFILE"))"; return 0; fi
        if ! kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then break; fi
        sleep 0.5
    done
    say "dockerd did not come up; the last lines of $LOG:"; tail -n 15 "$LOG" >&2
    stop; return 2
}

# Stops only the dockerd whose pid this script recorded (and waits, so its containerd exits too).
stop() {
    [ -s "$PIDFILE" ] || { say "no dockerd started by this script"; return 0; }
    local pid; pid=$(cat "$PIDFILE")
    if kill -0 "$pid" 2>/dev/null && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = dockerd ]; then
        kill -TERM "$pid"
        for _ in $(seq 120); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        if kill -0 "$pid" 2>/dev/null; then say "dockerd (pid $pid) did not stop in 60 s"; return 1; fi
        say "stopped dockerd (pid $pid)"
    fi
    rm -f "$PIDFILE"
}

case "${1:-}" in
    start) start || [ $? = 1 ] ;;
    stop) stop ;;
    run)
        shift
        [ $# -gt 0 ] || { say "usage: docker/engine.sh run CMD [ARGS...]"; exit 2; }
        rc=0; start || rc=$?
        status=0
        if [ $rc = 0 ]; then
            trap 'stop' EXIT
            trap 'exit 130' INT TERM
        fi
        "$@" || status=$?
        exit $status ;;
    *) say "usage: docker/engine.sh run CMD [ARGS...] | start | stop"; exit 2 ;;
esac
