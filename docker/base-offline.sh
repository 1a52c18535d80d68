#!/usr/bin/env bash
# A local stand-in for the Dockerfile's base image (python:3.11-slim-bookworm) where Docker Hub
# cannot be reached: Debian bookworm plus Debian's CPython 3.11, from the Debian archive.
#   docker/base-offline.sh [TAG]     (root, debootstrap and a running engine; `make docker-base-offline`)
# It plays the same role: `python` and `pip` on PATH, pip installs into the system Python as in
# the official image (Debian's PEP 668 marker is removed), no compilers. Never push it.
set -euo pipefail

TAG=${1:-python-standin:3.11-bookworm-local}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}

[ "$(id -u)" = 0 ] || { echo "base-offline.sh: debootstrap needs root" >&2; exit 2; }
command -v debootstrap >/dev/null || { echo "base-offline.sh: apt-get install debootstrap" >&2; exit 2; }

root=$(mktemp -d "${TMPDIR:-/tmp}/raysweep-rootfs.XXXXXX")
trap 'rm -rf "$root"' EXIT

# minbase: essential packages and apt only. Recommends are not installed, so python3-pip brings
# no compiler (build-essential, python3-dev), as in the official slim image.
debootstrap --variant=minbase --include=python3,python3-pip,python-is-python3,ca-certificates \
    bookworm "$root" "$MIRROR" >&2
cat > "$root/etc/apt/sources.list" <<LIST
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb $SECURITY bookworm-security main
LIST
# The security and point updates the official image is rebuilt with.
cp /etc/resolv.conf "$root/etc/resolv.conf"
chroot "$root" apt-get -qq update
chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get -qq -y upgrade >&2
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* "$root"/usr/share/man/* \
    "$root"/usr/share/info/* "$root"/var/log/*.log "$root"/var/cache/debconf/*-old
rm -f "$root"/usr/lib/python3.*/EXTERNALLY-MANAGED "$root/etc/resolv.conf"
find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +

tar -C "$root" --numeric-owner -c . | docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'LABEL org.opencontainers.image.description="LOCAL STAND-IN for python:3.11-slim-bookworm, built by docker/base-offline.sh from the Debian archive; do not push"' \
    --change 'CMD ["python3"]' \
    - "$TAG" >/dev/null
echo "base-offline.sh: built $TAG ($(docker run --rm "$TAG" python --version), $(docker image inspect -f '{{.Size}}' "$TAG" | numfmt --to=iec))" >&2
