#!/usr/bin/env bash
# A Debian 12 base image with Python, built from the Debian mirror (no container registry is reachable on our
# CI machines; ../shared/docs/CONTAINERS.md): debootstrap minbase + python3-dev and g++ (the CPU extension is
# compiled when the image is built), a venv at /opt/venv with its own pip (Debian forbids system pip), the host's
# CA certificates; no documentation, translations or static libraries.
#
#   docker/ci/base_image.sh [IMAGE]     (default local/debian-python:bookworm; skipped if it exists)
set -euo pipefail
IMAGE=${1:-local/debian-python:bookworm}
if podman image exists "$IMAGE"; then
  echo "base image $IMAGE exists"
  exit 0
fi
MIRROR=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1)
MIRROR=${MIRROR:-$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list 2>/dev/null)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
ROOTFS=$(mktemp -d /tmp/mamp-rootfs.XXXXXX)
trap 'rm -rf "$ROOTFS"' EXIT
echo "debootstrap from $MIRROR into $ROOTFS"
debootstrap --variant=minbase \
  --include=python3,python3-venv,python3-dev,g++,ca-certificates,python-is-python3 \
  bookworm "$ROOTFS" "$MIRROR" >/tmp/mamp-debootstrap.log 2>&1 \
  || { tail -20 /tmp/mamp-debootstrap.log; exit 1; }
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  cp /usr/local/share/ca-certificates/*.crt "$ROOTFS/usr/local/share/ca-certificates/"
  chroot "$ROOTFS" update-ca-certificates >/dev/null
fi
chroot "$ROOTFS" python3 -m venv /opt/venv
# What a server image never reads: package caches, documentation, translations, static libraries (the kernel
# build links shared objects only).
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/usr/share/doc/* \
  "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/* "$ROOTFS"/usr/share/locale/* \
  "$ROOTFS"/usr/lib/python3*/config-*/*.a
tar -C "$ROOTFS" -c . | podman import \
  --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' - "$IMAGE" >/dev/null
echo "base image $IMAGE built"
