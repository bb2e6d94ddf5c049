#!/usr/bin/env bash
# Build the local base image of the testbed from Debian packages alone (no container
# registry needed): debootstrap a minimal bookworm with Python 3.11 and the network tools
# the roles use, then `docker import` it. Skips when the image exists (FORCE=1 rebuilds).
#
# Usage: compose/base-image.sh [TAG]      (default: edgepart/base:bookworm)
# Environment: DEBIAN_MIRROR (default http://deb.debian.org/debian), FORCE=1.
set -euo pipefail

TAG=${1:-edgepart/base:bookworm}
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# python3-venv brings ensurepip (pip and setuptools wheels) for the image's venv;
# iproute2 has tc for link shaping, iperf3 measures links, mosquitto is the broker.
PACKAGES=python3,python3-venv,ca-certificates,iproute2,iperf3,mosquitto,procps
LABEL=org.edgepart.base=debootstrap-$SUITE

say() { echo "base-image: $*" >&2; }

if [[ ${FORCE:-0} != 1 ]] && docker image inspect "$TAG" >/dev/null 2>&1; then
  say "$TAG exists; skipping (FORCE=1 rebuilds)"
  exit 0
fi

if ! command -v debootstrap >/dev/null; then
  say "installing debootstrap"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends debootstrap >/dev/null
fi

root=$(mktemp -d /var/tmp/edgepart-base.XXXXXX)
cleanup() {
  # a failed debootstrap can leave /proc or /sys mounted inside the tree: unmount first,
  # and never let rm cross into another file system
  findmnt -rn -o TARGET | grep -F "$root" | sort -r | xargs -r umount -l 2>/dev/null || true
  rm -rf --one-file-system "$root"
  rm -f "$root.log"
}
trap cleanup EXIT

started=$SECONDS
say "debootstrap $SUITE ($MIRROR) into $root"
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$root" "$MIRROR" \
  >"$root.log" 2>&1 || {
  say "debootstrap failed; last lines of its log:"
  tail -n 30 "$root.log" >&2
  tail -n 30 "$root/debootstrap/debootstrap.log" >&2 2>/dev/null || true
  rm -f "$root.log"
  exit 1
}
rm -f "$root.log"

# what a container does not need, and nothing taken from this host
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/debconf/*-old \
  "$root"/var/log/* "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
  "$root"/tmp/* "$root"/root/.cache
: >"$root/etc/resolv.conf"
: >"$root/etc/hostname"
rm -f "$root/etc/machine-id"

say "importing as $TAG"
tar --numeric-owner -C "$root" -c . | docker import \
  --change "LABEL $LABEL" \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["/bin/bash"]' \
  --message "debootstrap --variant=minbase $SUITE with $PACKAGES" \
  - "$TAG" >/dev/null
say "$TAG built in $((SECONDS - started)) s, $(docker image inspect -f '{{.Size}}' "$TAG" |
  awk '{printf "%.0f MB", $1 / 1e6}')"
