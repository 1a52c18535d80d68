#!/usr/bin/env bash
# Image builds where Docker Hub cannot be reached (and containers cannot reach PyPI): the local
# stand-in base (docker/base-offline.sh) and a wheelhouse built on the host, served on its loopback.
#   docker/offline.sh build TAG      docker build -t TAG ., offline when needed
#   docker/offline.sh run CMD...     CMD, with RAYSWEEP_BASE_IMAGE and RAYSWEEP_WHEELHOUSE_URL set when offline
#   docker/offline.sh wheelhouse     (re)build the wheelhouse: pyproject.toml's runtime ranges at constraints.txt's pins
# OFFLINE=auto (default): offline when the Dockerfile's base image is neither present nor pullable
# (Docker Hub does not answer); OFFLINE=1 / OFFLINE=0 force it. Preparing the offline path builds
# what is missing: the stand-in (root, debootstrap) and the wheelhouse (with the host's pip config).
set -euo pipefail
cd "$(dirname "$0")/.."

OFFLINE=${OFFLINE:-auto}
OFFLINE_BASE=${OFFLINE_BASE:-python-standin:3.11-bookworm-local}
WHEELHOUSE=${WHEELHOUSE:-.cache/docker/wheelhouse}
PORT=${WHEELHOUSE_PORT:-8731}  # fixed: the URL is a build arg, so it is part of the layer cache key
PYTHON=${WHEEL_PYTHON:-python3}
DOCKER=${DOCKER:-docker}

say() { echo "offline.sh: $*" >&2; }
# What the image's pip step installs (see the Dockerfile): the runtime ranges, at the lock's pins.
runtime_requirements() {
    "$PYTHON" -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')"
}
inputs() { runtime_requirements; cat constraints.txt; }
public_base() { sed -n 's/^ARG BASE_IMAGE=//p' Dockerfile; }

hub_answers() {  # any HTTP answer (401 included) from the registry counts
    "$PYTHON" - <<'PY' 2>/dev/null
import sys, urllib.error, urllib.request
try:
    urllib.request.urlopen("https://registry-1.docker.io/v2/", timeout=5)
except urllib.error.HTTPError:
    pass
except OSError:
    sys.exit(1)
PY
}

# 0: build offline; 1: build as usual (or no engine answers: nothing to build with).
offline_needed() {
    case "$OFFLINE" in
        1|yes|true) return 0 ;;
        0|no|false) return 1 ;;
    esac
    "$DOCKER" info >/dev/null 2>&1 || return 1
    if "$DOCKER" image inspect "$(public_base)" >/dev/null 2>&1 || hub_answers; then return 1; fi
    say "Docker Hub does not answer and $(public_base) is not here: building on $OFFLINE_BASE"
}

wheelhouse() {
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || {
        say "the wheelhouse needs the image's Python, 3.11 (WHEEL_PYTHON=$PYTHON is not)"; exit 2; }
    rm -rf "$WHEELHOUSE"
    mkdir -p "$WHEELHOUSE"
    runtime_requirements > "$WHEELHOUSE/.runtime.txt"
    "$PYTHON" -m pip wheel --quiet --wheel-dir "$WHEELHOUSE" -c constraints.txt -r "$WHEELHOUSE/.runtime.txt"
    inputs > "$WHEELHOUSE/.inputs"  # what it was built from
    say "wheelhouse: $(find "$WHEELHOUSE" -name "*.whl" | wc -l) wheels, $(du -sh "$WHEELHOUSE" | cut -f1)"
}

prepare() {
    "$DOCKER" image inspect "$OFFLINE_BASE" >/dev/null 2>&1 || docker/base-offline.sh "$OFFLINE_BASE"
    inputs | cmp -s - "$WHEELHOUSE/.inputs" || wheelhouse
}

# Runs "$@" while the wheelhouse is served on 127.0.0.1:$PORT (pip reads its directory listing).
serving() {
    "$PYTHON" -m http.server --bind 127.0.0.1 --directory "$WHEELHOUSE" "$PORT" >/dev/null 2>&1 &
    local server=$! status=0
    for _ in $(seq 50); do
        "$PYTHON" -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$PORT/', timeout=1)" 2>/dev/null && break
        kill -0 $server 2>/dev/null || { say "cannot serve the wheelhouse on 127.0.0.1:$PORT (taken?)"; exit 2; }
        sleep 0.2
    done
    "$@" || status=$?
    kill $server; wait $server 2>/dev/null || true
    return $status
}

case "${1:-}" in
    wheelhouse) wheelhouse ;;
    build)
        [ $# = 2 ] || { say "usage: docker/offline.sh build TAG"; exit 2; }
        if offline_needed; then
            prepare
            serving "$DOCKER" build --network host --build-arg "BASE_IMAGE=$OFFLINE_BASE" --build-arg PIP_NO_INDEX=1 \
                --build-arg "PIP_FIND_LINKS=http://127.0.0.1:$PORT/" -t "$2" .
        else
            "$DOCKER" build -t "$2" .
        fi ;;
    run)
        shift
        [ $# -gt 0 ] || { say "usage: docker/offline.sh run CMD [ARGS...]"; exit 2; }
        if offline_needed; then
            prepare
            RAYSWEEP_BASE_IMAGE=$OFFLINE_BASE RAYSWEEP_WHEELHOUSE_URL=http://127.0.0.1:$PORT/ serving "$@"
        else
            "$@"
        fi ;;
    *) say "usage: docker/offline.sh build TAG | run CMD... | wheelhouse"; exit 2 ;;
esac
