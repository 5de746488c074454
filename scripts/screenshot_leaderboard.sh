#!/usr/bin/env bash
# Screenshot a leaderboard page (written by `mcomp leaderboard`) with headless Chromium, straight from disk:
#   scripts/screenshot_leaderboard.sh OUT_DIR/index.html shot.png [WIDTH,HEIGHT]
# Needs chromium (Debian: apt-get install -y chromium). Exit status 2 when no browser is installed.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 PAGE.html OUT.png [WIDTH,HEIGHT]" >&2
  exit 64
fi
page=$(realpath "$1")
out=$(realpath -m "$2")
size=${3:-1400,1600}
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
if [ -z "$browser" ]; then
  echo "no chromium/chrome found (Debian: apt-get install -y chromium)" >&2
  exit 2
fi
# --no-sandbox: Chromium refuses to run as root with its sandbox; the page is a local static file.
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --no-first-run --disable-extensions \
  --window-size="$size" --screenshot="$out" "file://$page" >/dev/null 2>&1
test -s "$out"
echo "$out"
