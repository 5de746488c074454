#!/usr/bin/env bash
# Set up (if needed) and run the main job: the smallest real end-to-end path that exists.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
MCOMP=.venv/bin/mcomp
$MCOMP info
echo
echo "== a tiny image MLLM (built locally, random weights) answers about a real image file"
$MCOMP ask --tiny --media image=examples/red_circle.png --max-new-tokens 16 "What shape is in the image?"
$MCOMP ask --tiny --media image=examples/red_circle.png --options "circle,square,triangle" "What shape is in the image?"
