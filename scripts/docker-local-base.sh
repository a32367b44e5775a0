#!/usr/bin/env bash
# Local stand-ins for the two Docker Hub images the stack starts from, for machines that reach the
# Debian package registry but not Docker Hub:
#
#   unmask-local/debian:bookworm   debootstrap --variant=minbase bookworm, then `docker import`
#   unmask-local/python:3.11       + python3.11 and its venv module (Debian packages)
#   unmask-local/redis:7           + redis-server 7 (Debian package), /data owned by the redis user
#
#   scripts/docker-local-base.sh            # build the ones that are missing
#   UNMASK_LOCAL_BASE_REBUILD=1 scripts/docker-local-base.sh   # rebuild all three
#
# Then: UNMASK_BASE_IMAGE=unmask-local/python:3.11 UNMASK_REDIS_IMAGE=unmask-local/redis:7
# docker compose --profile cpu up -d --build   (scripts/compose-up-local.sh does all of it).
# Needs root (debootstrap; installed with apt-get when missing) and a Docker daemon.
set -euo pipefail

SUITE=bookworm
MIRROR=${UNMASK_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY=${UNMASK_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
DEBIAN_IMAGE=${UNMASK_LOCAL_DEBIAN_IMAGE:-unmask-local/debian:bookworm}
PYTHON_IMAGE=${UNMASK_LOCAL_PYTHON_IMAGE:-unmask-local/python:3.11}
REDIS_IMAGE=${UNMASK_LOCAL_REDIS_IMAGE:-unmask-local/redis:7}
REBUILD=${UNMASK_LOCAL_BASE_REBUILD:-0}

log() { printf '[local-base %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
have_image() { [ "$REBUILD" != 1 ] && docker image inspect "$1" >/dev/null 2>&1; }
elapsed() { echo "$(($(date +%s) - $1))s"; }

if ! have_image "$DEBIAN_IMAGE"; then
  [ "$(id -u)" = 0 ] || { echo "local-base: debootstrap needs root" >&2; exit 1; }
  if ! command -v debootstrap >/dev/null && command -v apt-get >/dev/null; then
    log "apt-get install debootstrap"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends debootstrap >/dev/null
  fi
  command -v debootstrap >/dev/null || { echo "local-base: needs debootstrap" >&2; exit 1; }
  t0=$(date +%s)
  root=$(mktemp -d /tmp/unmask-rootfs.XXXXXX)
  trap 'rm -rf "$root"' EXIT
  log "debootstrap --variant=minbase $SUITE from $MIRROR"
  debootstrap --variant=minbase "$SUITE" "$root" "$MIRROR" >"$root.log" 2>&1 \
    || { tail -20 "$root.log" >&2; exit 1; }
  cat >"$root/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $SECURITY $SUITE-security main
EOF
  # the same slimming as Debian's own images: no apt caches, docs or recommends in layers on top
  cat >"$root/etc/apt/apt.conf.d/90unmask-slim" <<'EOF'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Acquire::Languages "none";
EOF
  cat >"$root/etc/dpkg/dpkg.cfg.d/90unmask-nodoc" <<'EOF'
path-exclude=/usr/share/doc/*
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
path-include=/usr/share/locale/locale.alias
EOF
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* \
    "$root"/usr/share/man/* "$root"/usr/share/info/*
  log "docker import -> $DEBIAN_IMAGE"
  tar -C "$root" --numeric-owner -c . | docker import \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["bash"]' - "$DEBIAN_IMAGE" >/dev/null
  rm -rf "$root" "$root.log"
  trap - EXIT
  log "$DEBIAN_IMAGE built in $(elapsed "$t0")"
else
  log "$DEBIAN_IMAGE present"
fi

build_on_debian() {  # build_on_debian IMAGE  (Dockerfile on stdin)
  local t0
  t0=$(date +%s)
  docker build --network host -q -t "$1" - >/dev/null
  log "$1 built in $(elapsed "$t0")"
}

if ! have_image "$PYTHON_IMAGE"; then
  log "building $PYTHON_IMAGE (python3.11 from Debian packages)"
  build_on_debian "$PYTHON_IMAGE" <<EOF
FROM $DEBIAN_IMAGE
RUN apt-get update \\
 && apt-get install -y python3.11 python3.11-venv ca-certificates \\
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \\
 && ln -s /usr/bin/python3.11 /usr/local/bin/python
CMD ["python3"]
EOF
else
  log "$PYTHON_IMAGE present"
fi

if ! have_image "$REDIS_IMAGE"; then
  log "building $REDIS_IMAGE (redis-server from Debian packages)"
  # Docker Hub's redis image is built with protected mode off (it is reached over the container
  # network, never published); Debian's redis-server needs that said on its command line.
  build_on_debian "$REDIS_IMAGE" <<EOF
FROM $DEBIAN_IMAGE
RUN apt-get update \\
 && apt-get install -y redis-server \\
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \\
 && mkdir -p /data && chown redis:redis /data
WORKDIR /data
USER redis
EXPOSE 6379
CMD ["redis-server", "--protected-mode", "no"]
EOF
else
  log "$REDIS_IMAGE present"
fi
