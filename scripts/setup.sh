#!/usr/bin/env bash
# Set up unmask on a fresh Debian/Ubuntu machine: system packages (where we may install them),
# a virtual environment with the CPU build of torch, and the package in strict editable mode.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}   # on this machine: the CPU wheel on local disk
DEB_ROOT=${UNMASK_DEB_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/unmask/deb}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo -n "$@"; else return 1; fi; }

# System packages: redis-server (queue tests), python3.11-doc (prose corpus), wamerican (eval),
# chromium + chromium-driver (the playground's browser test).
if command -v apt-get >/dev/null; then
  need=()
  command -v redis-server >/dev/null || need+=(redis-server)
  command -v chromium >/dev/null || need+=(chromium)
  command -v chromedriver >/dev/null || need+=(chromium-driver)
  [ -d /usr/share/doc/python3.11/html/_sources ] || need+=(python3.11-doc)
  [ -f /usr/share/dict/american-english ] || need+=(wamerican)  # text quality gate word list
  if [ ${#need[@]} -gt 0 ]; then
    echo "setup: installing ${need[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}" \
      || echo "setup: could not install ${need[*]} (not root?); the corpus skips what is missing"
  fi
  # Jane Austen's novels: the Debian package depends on R, which we do not need, so it is only
  # downloaded and unpacked (read later with the PyPI package rdata).
  if [ ! -f "$DEB_ROOT/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb" ]; then
    tmp=$(mktemp -d)
    if (cd "$tmp" && apt-get download r-cran-janeaustenr >/dev/null 2>&1); then
      mkdir -p "$DEB_ROOT" && dpkg-deb -x "$tmp"/r-cran-janeaustenr_*.deb "$DEB_ROOT"
      echo "setup: unpacked r-cran-janeaustenr into $DEB_ROOT"
    else
      echo "setup: could not download r-cran-janeaustenr; the corpus skips Jane Austen"
    fi
    rm -rf "$tmp"
  fi
else
  echo "setup: no apt-get; install redis-server and python3.11-doc yourself"
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "$TORCH_SPEC"
.venv/bin/python -m pip install -q -e '.[dev]' --config-settings editable_mode=strict
echo "setup: done"
