#!/usr/bin/env bash
# Screenshot a leaderboard page (written by `mcomp leaderboard`) with headless Chromium, straight from disk:
#   scripts/screenshot_leaderboard.sh OUT_DIR/index.html shot.png [WIDTH,HEIGHT] [STATE]
# WIDTH,HEIGHT defaults to 1300,900 (the overview fits it); STATE is a view of the page's URL hash, e.g.
# "sort=c0:desc&drill=r3:c0" (docs/leaderboard.md). Needs a headless Chromium (Debian: apt-get install -y
# chromium-headless-shell, or chromium). Exit status 2 when no browser is installed.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 PAGE.html OUT.png [WIDTH,HEIGHT] [STATE]" >&2
  exit 64
fi
page=$(realpath "$1")
out=$(realpath -m "$2")
size=${3:-1300,900}
state=${4:-}
browser=$(command -v chromium-headless-shell || command -v chromium || command -v chromium-browser \
  || command -v google-chrome || true)
if [ -z "$browser" ]; then
  echo "no headless Chromium found (Debian: apt-get install -y chromium-headless-shell)" >&2
  exit 2
fi
rm -f "$out"
# --no-sandbox: Chromium refuses to run as root with its sandbox; the page is a local static file.
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --no-first-run --disable-extensions \
  --virtual-time-budget=3000 --window-size="$size" --screenshot="$out" "file://$page${state:+#$state}" >/dev/null 2>&1
test -s "$out"
echo "$out"
