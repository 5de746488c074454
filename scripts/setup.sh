#!/usr/bin/env bash
# Set up a fresh machine for mcomp: system library for open3d, a virtual environment with the
# pinned dependencies, and mcomp itself (editable). Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages, installed with apt-get when missing. open3d needs libusb-1.0 at import time.
# (grep reads all of ldconfig's output: with -q it would stop at the first match, ldconfig could
# die of SIGPIPE, and pipefail would call that "missing".)
packages=()
if ! ldconfig -p 2>/dev/null | grep 'libusb-1.0.so.0' >/dev/null; then
  packages+=(libusb-1.0-0)
fi
# the leaderboard page's browser test and scripts/screenshot_leaderboard.sh need a headless Chromium
browser=""
for name in chromium-headless-shell chromium chromium-browser google-chrome; do
  command -v "$name" >/dev/null && { browser=$name; break; }
done
[ -z "$browser" ] && packages+=(chromium-headless-shell)
if [ ${#packages[@]} -gt 0 ]; then
  echo "[setup] installing ${packages[*]} (open3d needs libusb; the leaderboard test a headless Chromium)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.mcomp-requirements.sha256
want=$(cat requirements.txt pyproject.toml setup.py mcomp/merge/_native.c | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing pinned dependencies (about a minute on a fresh machine)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements.txt
  # the merge engine's C kernels (optional: without a compiler the NumPy path is used); a stale
  # in-place build would survive a change of compiler flags, so it goes first
  rm -f mcomp/merge/_native.*.so
  .venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
  echo "$want" > "$stamp"
fi
.venv/bin/python -c "import mcomp, open3d, torchaudio, torchvision" \
  || { echo "[setup] import check failed" >&2; exit 1; }
.venv/bin/python -c "from mcomp.merge import native; assert native.available()" 2>/dev/null \
  || echo "[setup] note: the merge engine's C kernels were not built; it runs on its NumPy path (slower)"
echo "[setup] ready: $(.venv/bin/mcomp --version)"
